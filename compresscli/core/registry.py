"""A small name -> object registry whose failed lookups list what exists ("did you mean")."""
from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from compresscli.core.errors import CompressError

T = TypeVar("T")


def did_you_mean(name: str, choices: list[str] | tuple[str, ...]) -> str:
    """A hint naming the closest choices, or listing them all when none is close."""
    close = difflib.get_close_matches(name, list(choices), n=3, cutoff=0.5)
    if close:
        return "did you mean " + " or ".join(repr(c) for c in close) + "?"
    shown = ", ".join(sorted(choices)[:12])
    more = f" (+{len(choices) - 12} more)" if len(choices) > 12 else ""
    return f"choose one of: {shown}{more}"


class Registry(Generic[T]):
    """Maps names to objects; a duplicate name is a programming error, an unknown one a user error."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._items:
            raise CompressError(f"unknown {self.kind} {name!r}", did_you_mean(name, self.names()))
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)
