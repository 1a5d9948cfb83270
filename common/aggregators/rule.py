"""`RowsAggregator`: the common shape of every rule here, so that wrappers can nest any of them.

A rule implements `aggregate(rows, f)` on a lazy `Rows` view rather than on a tensor, and takes f
per call: a wrapper hands its base rule mixed rows (n' of them) and an adjusted f', without
materialising the mixed data.
"""

from __future__ import annotations

from abc import abstractmethod
from collections.abc import Callable
from typing import ClassVar, TypeVar

from torch import Tensor

from byzps.common.aggregators.base import AGGREGATORS, Aggregator
from byzps.common.aggregators.columns import ColumnRows
from byzps.common.aggregators.rows import Rows, as_matrix
from byzps.common.aggregators.runs import NotBatched, RunsRows
from byzps.common.aggregators.verdict import Verdict
from byzps.common.registry import Registry

A = TypeVar("A", bound=type[Aggregator])


class RowsAggregator(Aggregator):
    """An aggregator whose work is done by `aggregate(rows, f)`; `__call__` validates and wraps."""

    #: True when `aggregate` asks only what `RunsRows` serves (a band of the rows, nnm's
    #: distances) and keeps no state, so `aggregate_runs` can aggregate several runs at once.
    batches_runs: ClassVar[bool] = False

    def __call__(self, x: Tensor) -> Tensor:
        rows = Rows(as_matrix(x))
        out = self.aggregate(rows, self.f)
        self.last_verdict = rows.verdict()
        return out

    def aggregate_columns(self, x: Tensor, columns: Tensor) -> Tensor:
        """self(x)[columns] from those columns alone (`Aggregator.aggregate_columns`), through
        `ColumnRows`: the band rules read the columns in place."""
        if not self.coordinatewise:
            raise TypeError(f"{self.name} is not coordinate-wise: it cannot aggregate columns")
        rows = ColumnRows(as_matrix(x), columns)
        out = self.aggregate(rows, self.f)  # type: ignore[arg-type]
        self.last_verdict = rows.verdict()
        return out

    def aggregate_runs(self, x: Tensor) -> tuple[Tensor, list[Verdict | None]]:
        """(R, d) the aggregates of R runs' inputs x (R, n, d), each bitwise `self(x[r])`, and
        each run's verdict (what `last_verdict` would be); `NotBatched` when this rule, these
        inputs or one run's values need the one-run path (byzps.common.aggregators.runs)."""
        if not self.batches_runs:
            raise NotBatched(f"{self.name} aggregates one run at a time")
        rows = RunsRows(x)
        out = self.aggregate(rows, self.f)  # type: ignore[arg-type]
        return out, rows.verdicts()

    def check(self, n: int, f: int) -> None:
        """ValueError, naming f and n, when f Byzantine inputs among n exceed what the rule
        tolerates. Called by `aggregate` on every call, and by the config check before a run
        starts (`build_aggregator(..., n=)`), so an impossible pairing fails in seconds, not at
        the first round. The default accepts any f (the plain mean: not robust, never refused).
        """
        del n, f

    @abstractmethod
    def aggregate(self, rows: Rows, f: int) -> Tensor:
        """Aggregate `rows` (n of them, at most f Byzantine) into one (d,) vector."""


class MajorityRule(RowsAggregator):
    """A rule whose guarantee needs an honest majority, 2f < n, and nothing more."""

    def check(self, n: int, f: int) -> None:
        require(2 * f < n, self.name, "2f < n", f, n)


def require(holds: bool, rule: str, condition: str, f: int, n: int) -> None:
    """Raise the ValueError every rule uses when f is too large for n inputs."""
    if not holds:
        raise ValueError(f"{rule} needs {condition}, got f={f}, n={n}")


def register(name: str, registry: Registry = AGGREGATORS) -> Callable[[A], A]:
    """Register a class under `name` in `registry` (aggregators by default, or the wrappers);
    the registry records the name on it (`cls.name`)."""
    return registry.register(name)
