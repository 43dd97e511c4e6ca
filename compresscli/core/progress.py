"""A progress interface the library reports to; the CLI plugs rich into it, library users get silence."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Protocol


class ProgressTask(Protocol):
    def advance(self, n: int = 1, **info: float) -> None: ...


class Progress(Protocol):
    def task(self, description: str, total: int | None = None) -> "contextmanager[ProgressTask]": ...


class _SilentTask:
    def advance(self, n: int = 1, **info: float) -> None:
        pass


class SilentProgress:
    """The default: no output, so library code never prints."""

    @contextmanager
    def task(self, description: str, total: int | None = None) -> Iterator[ProgressTask]:
        yield _SilentTask()
