"""A named registry: the one place where the names of interchangeable parts live.

A mapping from name to implementation. An entry is either the object itself (``add``) or a lazy reference
``"package.module:attribute"`` (``add_lazy``) imported on first ``get``: the names are known, and params can be
validated against them, without importing any implementation (no family, LLM stack or detector at start-up).
``get`` fails on an unknown name and lists the allowed ones.
"""
from __future__ import annotations

import importlib
from collections.abc import Iterator, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


def resolve(spec: str) -> Any:
    """Import ``"package.module:attribute"`` (the attribute may be dotted) and return the attribute."""
    module, _, attr = spec.partition(":")
    obj: Any = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj


class Registry(Mapping[str, T], Generic[T]):
    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T | str] = {}
        self._lazy: set[str] = set()

    def add(self, name: str, item: T) -> T:
        self._claim(name)
        self._items[name] = item
        return item

    def add_lazy(self, name: str, spec: str) -> None:
        """Register ``name`` as ``"package.module:attribute"``, imported when first looked up."""
        if ":" not in spec:
            raise ValueError(f"{self.kind} {name!r}: lazy entry {spec!r} must read 'package.module:attribute'")
        self._claim(name)
        self._items[name] = spec
        self._lazy.add(name)

    def _claim(self, name: str) -> None:
        if name in self._items:
            raise ValueError(f"{self.kind} {name!r} is registered twice")

    def get(self, name: str) -> T:  # type: ignore[override]
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}")
        if name in self._lazy:
            self._items[name] = resolve(self._items[name])  # type: ignore[arg-type]
            self._lazy.discard(name)
        return self._items[name]  # type: ignore[return-value]

    def check(self, name: str) -> str:
        """``name`` if registered (nothing is imported), else ValueError listing the allowed names."""
        if name not in self._items:
            raise ValueError(f"unknown {self.kind} {name!r}; allowed: {', '.join(sorted(self._items))}")
        return name

    def __getitem__(self, name: str) -> T:
        return self.get(name)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)
