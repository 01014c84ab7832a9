"""The one exception type the runtime raises for bad input (files, configs, arguments)."""

from __future__ import annotations


class GPT2Error(Exception):
    """A problem with the user's input: a model folder, a prompt, an option.

    The message is one line meant for a human; the CLI prints it and exits non-zero. `field`, when
    set, names what was wrong in the core's terms (an `Options` field, or "prompt"), so that a
    front door can name it in its own (the server maps it onto OpenAI's `param`).
    """

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


def missing_extra(command: str, extra: str, error: ImportError) -> GPT2Error:
    """What a command says when the libraries of its pip extra are not installed."""
    return GPT2Error(f"{command} needs the extra '{extra}' ({error.name} is not installed): "
                     f"pip install 'gpt2np[{extra}]'")
