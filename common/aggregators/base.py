"""The robust-aggregator interface: (n, d) rows in, one (d,) vector out."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from torch import Tensor

from byzps.common.aggregators.verdict import Verdict
from byzps.common.registry import Registry

AGGREGATORS: Registry[Aggregator] = Registry("aggregator", supplied=("f", "seed"))


class Aggregator(ABC):
    """Aggregates n vectors of which at most `f` may be Byzantine.

    Stateful rules (centered clipping's centre, bucketing's generator) expose their memory through
    `state_dict()` / `load_state_dict()` so a checkpoint restores the exact next output.
    """

    name: ClassVar[str]
    #: True when output coordinate t depends only on input column t (mean, cm, cwtm — never a
    #: wrapper, which mixes whole rows). Such a rule can be re-run on just the columns whose
    #: inputs changed (`aggregate_columns`), which is what the server's incremental round uses.
    coordinatewise: ClassVar[bool] = False
    #: The largest share |U| / d of the columns up to which `aggregate_columns` on U is faster
    #: than a full call (n = 20, d = 1e6 and 1e7): the server's incremental round takes it up to
    #: there (server/engine.py). Gathering U costs more than the mean's whole pass beyond ~1 %.
    column_share: ClassVar[float] = 0.01
    #: What the last call's output did to each input (`verdict.Verdict`), for suspicion scores;
    #: None before the first call, or for a rule that does not say.
    last_verdict: Verdict | None = None

    def __init__(self, f: int = 0) -> None:
        if f < 0:
            raise ValueError(f"f must be non-negative, got {f}")
        self.f = f

    @abstractmethod
    def __call__(self, x: Tensor) -> Tensor:
        """Aggregate the rows of `x` (shape (n, d)) into one vector of shape (d,)."""

    def aggregate_columns(self, x: Tensor, columns: Tensor) -> Tensor:
        """self(x)[columns], computed from those columns alone (coordinate-wise rules only).

        Exact, not an approximation: a coordinate-wise rule does the same floating-point
        operations on a column whatever the other columns hold, so the result is bit-identical
        to the full aggregate's entries (tests/test_incremental.py checks it bitwise).
        """
        if not self.coordinatewise:
            raise TypeError(f"{self.name} is not coordinate-wise: it cannot aggregate columns")
        from byzps.common.aggregators.ops import take_columns  # ops imports this module's users

        return self(take_columns(x, columns))

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
