"""Name -> object registries. Algorithms, rewards and engines are picked by name from a recipe."""
from __future__ import annotations

import difflib
from typing import Any, Callable, Generic, TypeVar

from rlhf.errors import UserError

T = TypeVar("T")


class UnknownNameError(UserError, ValueError):
    """Raised for a name that is not registered; the message lists the valid names."""


class Registry(Generic[T]):
    """A named collection of functions (or classes) of one kind, with per-entry metadata.

    `register(name, **meta)` is a decorator; `meta` declares what an entry needs
    (for example `needs_values=True` for advantages that need a critic), so that a
    bad combination fails when a trainer is built, before any generation.
    """

    def __init__(self, kind: str, entry_points: str | None = None):
        self.kind = kind
        self._items: dict[str, T] = {}
        self._meta: dict[str, dict[str, Any]] = {}
        self._group, self._plugins_loaded = entry_points, entry_points is None

    def _load_plugins(self) -> None:
        """Register what installed packages declare under the entry-point group (once, on the first miss):
        how a package that builds on rlhf (reward_models, a user's own) adds names without rlhf importing it."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=self._group):
            if ep.name not in self._items:
                self._items[ep.name] = ep.load()
                self._meta[ep.name] = {"plugin": ep.value}

    def register(self, name: str, **meta: Any) -> Callable[[T], T]:
        def deco(obj: T) -> T:
            if name in self._items:
                raise ValueError(f"{self.kind} '{name}' is already registered")
            self._items[name] = obj
            self._meta[name] = meta
            return obj

        return deco

    def get(self, name: str) -> T:
        if name not in self._items:
            self._load_plugins()
        if name not in self._items:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise UnknownNameError(
                f"unknown {self.kind} '{name}'{hint}; valid names: {', '.join(self.names())}"
            )
        return self._items[name]

    def meta(self, name: str) -> dict[str, Any]:
        self.get(name)
        return self._meta[name]

    def names(self) -> list[str]:
        self._load_plugins()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        if name not in self._items:
            self._load_plugins()
        return name in self._items

    def __repr__(self) -> str:
        return f"Registry({self.kind}: {', '.join(self.names())})"
