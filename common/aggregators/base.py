"""The robust-aggregator interface: (n, d) rows in, one (d,) vector out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from byzps.common.registry import Registry

AGGREGATORS: Registry[Aggregator] = Registry("aggregator")


class Aggregator(ABC):
    """Aggregates n vectors of which at most `f` may be Byzantine.

    Stateful rules (centered clipping's centre, bucketing's generator) expose their memory through
    `state_dict()` / `load_state_dict()` so a checkpoint restores the exact next output.
    """

    name: ClassVar[str]

    def __init__(self, f: int = 0) -> None:
        if f < 0:
            raise ValueError(f"f must be non-negative, got {f}")
        self.f = f

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """Aggregate the rows of `x` (shape (n, d)) into one vector of shape (d,)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
