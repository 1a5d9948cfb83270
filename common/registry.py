"""Name → class registries, so aggregators, compressors, estimators, attacks and tasks are built
from configuration by name, with errors that name what is wrong."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    """Maps names to constructors of one kind of component (e.g. "aggregator")."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def decorate(cls: Callable[..., T]) -> Callable[..., T]:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = cls
            return cls

        return decorate

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> Callable[..., T]:
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(self.names())
            raise ValueError(f"unknown {self.kind} {name!r}; known: {known}") from None

    def check(self, name: str, params: Mapping[str, Any]) -> None:
        """Raise ValueError unless `name` exists and accepts every key of `params`, without
        constructing anything (arguments the builder supplies itself may be missing)."""
        signature = inspect.signature(self.get(name))
        accepts_any = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        if not accepts_any:
            unknown = sorted(set(params) - set(signature.parameters))
            if unknown:
                raise ValueError(f"{self.kind} {name!r} has no parameter {unknown[0]!r}")
        try:
            signature.bind_partial(**params)
        except TypeError as exc:
            raise ValueError(f"{self.kind} {name!r}: {exc}") from None

    def build(self, name: str, /, **params: Any) -> T:
        """Construct `name` from `params`; an unknown or missing parameter is a ValueError."""
        self.check(name, params)
        try:
            inspect.signature(self.get(name)).bind(**params)
        except TypeError as exc:
            raise ValueError(f"{self.kind} {name!r}: {exc}") from None
        return self.get(name)(**params)
