"""Implementations chosen by name in config (engine backends, runtimes): one small registry.

Built-in entries register themselves when their module is imported; `load_builtins` imports
them on first use, so importing the registry pulls no optional dependency.
"""

from __future__ import annotations

from typing import Callable, Generic, TypeVar

F = TypeVar("F", bound=Callable[..., object])


class Registry(Generic[F]):
    def __init__(self, kind: str, load_builtins: Callable[[], None]) -> None:
        self.kind = kind
        self._load_builtins = load_builtins
        self._entries: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def decorator(factory: F) -> F:
            self._entries[name] = factory
            return factory

        return decorator

    def names(self) -> list[str]:
        self._load_builtins()
        return sorted(self._entries)

    def get(self, name: str) -> F:
        """The entry called `name`; an unknown name lists the valid ones."""
        if name not in self.names():
            raise ValueError(f"unknown {self.kind} {name!r}; valid: {', '.join(self.names())}")
        return self._entries[name]
