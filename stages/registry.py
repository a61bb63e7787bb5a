"""A named registry: the one place where the names of interchangeable parts live.

A plain mapping from name to implementation. ``get`` fails on an unknown name and lists the allowed ones,
so params validation (``stages.config``) reads the allowed names from here and nowhere else.
"""
from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Iterator, Mapping
from typing import Generic, TypeVar

T = TypeVar("T")


class Registry(Mapping[str, T], Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def add(self, name: str, item: T) -> T:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")
        self._items[name] = item
        return item

    def get(self, name: str) -> T:  # type: ignore[override]
        try:
            return self._items[name]
        except KeyError:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}") from None

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def import_optional(*modules: str) -> None:
    """Import the modules that exist (they register their parts on import); absent ones are skipped."""
    for module in modules:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
