"""Name → class registries, so aggregators, compressors, estimators, attacks and tasks are built
from configuration by name, with errors that name what is wrong.

A registry also describes its components (`parameters`, `summary`), read from the constructors
themselves, so `byzps components` and docs/config.md cannot drift from the code. Constructor
arguments that byzps fills in itself (an estimator's `dim`, an aggregator's `f`) are declared as
`supplied` when the registry is created and left out of every listing: a user cannot set them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

T = TypeVar("T")
C = TypeVar("C", bound=Callable[..., Any])

#: The default of a parameter that has none (it must be given).
REQUIRED = inspect.Parameter.empty


@dataclass(frozen=True)
class Param:
    """One settable constructor parameter of a component."""

    name: str
    #: The annotation as written in the source ("float | None"), "" when there is none.
    annotation: str
    default: Any = REQUIRED

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def describe(self) -> str:
        """`eta: float = 0.1`, or `k: int (required)`."""
        text = f"{self.name}: {self.annotation}" if self.annotation else self.name
        return f"{text} (required)" if self.required else f"{text} = {self.default!r}"


def _annotation(parameter: inspect.Parameter) -> str:
    annotation = parameter.annotation
    if annotation is inspect.Parameter.empty:
        return ""
    if isinstance(annotation, str):  # `from __future__ import annotations` keeps the source text
        return annotation
    return getattr(annotation, "__name__", repr(annotation))


def _signature_params(factory: Callable[..., Any]) -> tuple[list[inspect.Parameter], bool]:
    """(keyword parameters `factory` accepts, True if it accepts any keyword at all).

    For a class, constructors that pass `**kwargs` up are followed along the MRO (a subclass's
    `__init__(self, *, eta, **common)` also takes its base's `seed`), and a subclass's default
    wins over its base's. A class accepts nothing beyond what the walk finds: an `**kwargs`
    that reaches `object.__init__` would fail there.
    """
    if not isinstance(factory, type):
        params = list(inspect.signature(factory).parameters.values())
        return _keywords(params), any(p.kind is p.VAR_KEYWORD for p in params)
    found: dict[str, inspect.Parameter] = {}
    for klass in factory.__mro__:
        if klass is object:
            break
        init = klass.__dict__.get("__init__")
        if init is None:
            continue
        params = list(inspect.signature(init).parameters.values())[1:]  # drop self
        for p in _keywords(params):
            found.setdefault(p.name, p)
        if not any(p.kind is p.VAR_KEYWORD for p in params):
            break
    return list(found.values()), False


def _keywords(params: Iterable[inspect.Parameter]) -> list[inspect.Parameter]:
    return [p for p in params if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)]


class Registry(Generic[T]):
    """Maps names to constructors of one kind of component (e.g. "aggregator").

    `supplied` names the constructor arguments that the code building this kind passes itself
    (e.g. "dim", "f"): they are accepted, but never listed as settable parameters.
    """

    def __init__(self, kind: str, *, supplied: Iterable[str] = ()) -> None:
        self.kind = kind
        self.supplied = frozenset(supplied)
        self._entries: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[C], C]:
        """Register a constructor under `name`; a class also gets it as its `name` attribute,
        so a component's name is written once, in its decorator."""

        def decorate(cls: C) -> C:
            if name in self._entries:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._entries[name] = cls
            if isinstance(cls, type):
                cls.name = name  # type: ignore[attr-defined]
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

    def parameters(self, name: str) -> tuple[Param, ...]:
        """The parameters a configuration may set for `name`, in signature order (those in
        `supplied` left out)."""
        params, _ = _signature_params(self.get(name))
        return tuple(
            Param(p.name, _annotation(p), p.default) for p in params if p.name not in self.supplied
        )

    def summary(self, name: str) -> str:
        """The first paragraph of `name`'s docstring, on one line ("" without a docstring),
        ending as a sentence: a paragraph that introduces a formula (":") or that breaks off
        before one ends with "." instead."""
        doc = inspect.getdoc(self.get(name)) or ""
        text = " ".join(doc.split("\n\n", 1)[0].split())
        if text.endswith(":"):
            return text[:-1] + "."
        return text + "." if text[-1:].isalnum() else text

    def check(self, name: str, params: Mapping[str, Any]) -> None:
        """Raise ValueError unless `name` exists and accepts every key of `params`, without
        constructing anything (arguments the builder supplies itself may be missing).

        An unknown key's error lists the parameters `name` does take, so a typo is one look away
        from its fix: "attack 'alie' has no parameter 'zz' (parameters: z)".
        """
        factory = self.get(name)
        accepted, accepts_any = _signature_params(factory)
        if not accepts_any:
            unknown = sorted(set(params) - {p.name for p in accepted})
            if unknown:
                raise ValueError(
                    f"{self.kind} {name!r} has no parameter {unknown[0]!r} ({self._settable(name)})"
                )
        try:
            inspect.signature(factory).bind_partial(**params)
        except TypeError as exc:
            raise ValueError(f"{self.kind} {name!r}: {exc}") from None

    def _settable(self, name: str) -> str:
        settable = [p.name for p in self.parameters(name)]
        return f"parameters: {', '.join(settable)}" if settable else "it takes no parameters"

    def build(self, name: str, /, **params: Any) -> T:
        """Construct `name` from `params`; an unknown or missing parameter is a ValueError."""
        self.check(name, params)
        try:
            inspect.signature(self.get(name)).bind(**params)
        except TypeError as exc:
            raise ValueError(f"{self.kind} {name!r}: {exc}") from None
        return self.get(name)(**params)
