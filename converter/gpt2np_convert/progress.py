"""How the converter reports progress: the library calls a `Progress`, the command line draws it
(the library never draws, so a caller that only converts, such as a benchmark, needs no CLI)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, ContextManager, Iterator, Protocol


class Progress(Protocol):
    def transfer(self, label: str, total: int | None, done: int = 0) -> ContextManager[Callable[[int], None]]:
        """A transfer of `total` bytes (None: unknown) named `label`, `done` of them already there:
        a context that yields `advance(n)`, called as each n bytes arrive or are written."""

    def note(self, message: str) -> None:
        """A line for the person waiting (another conversion holds the cache; the folder is written)."""


class Silent:
    """No progress shown: the library's default."""

    @contextmanager
    def transfer(self, label: str, total: int | None, done: int = 0) -> Iterator[Callable[[int], None]]:
        yield lambda n: None

    def note(self, message: str) -> None:
        pass


SILENT = Silent()
