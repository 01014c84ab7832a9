"""Stop strings in a stream of text: the text up to the first stop string, never part of one."""

from __future__ import annotations

from typing import Sequence


class StopStrings:
    """Passes text through, holding back any tail that might be the start of a stop string.

    Generation stops at the stop string that is completed first (the earliest end; of those, the
    earliest start), which a stream can decide as it goes: the result does not depend on how the
    text is cut into pieces.
    """

    def __init__(self, stops: Sequence[str]):
        self.stops = list(stops)
        self.held = ""

    def feed(self, text: str) -> tuple[str, bool]:
        """(text now safe to show, whether a stop string was reached). The stop string is not shown."""
        text = self.held + text
        hits = [(i + len(s), i) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            self.held = ""
            return text[:min(hits)[1]], True
        # The longest tail of the text that begins a stop string, longest first; only prefixes
        # that end in the text's last character are compared.
        last = text[-1:]
        keep = max((next((k for k in range(min(len(s), len(text)), 0, -1)
                          if s[k - 1] == last and text.endswith(s[:k])), 0) for s in self.stops), default=0)
        self.held = text[len(text) - keep:]
        return text[:len(text) - keep], False

    def flush(self) -> str:
        text, self.held = self.held, ""
        return text
