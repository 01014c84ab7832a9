"""A one-line progress bar on stderr: bytes done, speed and time left."""

from __future__ import annotations

import sys
import time


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError


def _duration(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Redraws one line in a terminal; elsewhere (logs, pipes) prints only the final line."""

    def __init__(self, label: str, total: int | None, done: int = 0, enabled: bool = True, stream=None):
        self.label, self.total, self.done = label, total, done
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.live = enabled and self.stream.isatty()
        self._start_done, self._start = done, time.monotonic()
        self._last_draw = 0.0

    def update(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.live and now - self._last_draw >= 0.1:
            self._last_draw = now
            self._draw("\r")

    def _line(self) -> str:
        elapsed = max(time.monotonic() - self._start, 1e-9)
        speed = (self.done - self._start_done) / elapsed
        if self.total:
            pct = 100 * self.done / self.total
            left = (self.total - self.done) / speed if speed > 0 else 0
            return (f"{self.label}  {pct:5.1f}%  {_size(self.done)} / {_size(self.total)}  "
                    f"{_size(speed)}/s  {_duration(left)} left")
        return f"{self.label}  {_size(self.done)}  {_size(speed)}/s"

    def _draw(self, prefix: str) -> None:
        self.stream.write(prefix + self._line() + "\033[K")
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            self.stream.write(("\r" if self.live else "") + self._line() + ("\033[K" if self.live else "") + "\n")
            self.stream.flush()
