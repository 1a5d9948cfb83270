"""Pre-aggregation wrappers: nnm (nearest-neighbour mixing) and bucketing.

Both replace the n inputs by averages of inputs, i.e. by M · X for a row-stochastic M, and hand
those rows to a base rule. They only build M (in n-dimensional space, from the Gram matrix or a
permutation); `Rows` keeps M · X lazy, so the wrapper adds no pass over the data.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators.gram import pairwise_sq_dists
from byzps.common.aggregators.rows import Rows
from byzps.common.aggregators.rule import RowsAggregator, register, require
from byzps.common.registry import Registry
from byzps.common.seeding import generator

WRAPPERS: Registry[RowsAggregator] = Registry("aggregator wrapper")


class Wrapper(RowsAggregator):
    """Turns the rows into mixed rows, then applies `base`; its state nests the base's state."""

    def __init__(self, base: RowsAggregator, f: int = 0) -> None:
        super().__init__(f)
        self.base = base

    def state_dict(self) -> dict[str, Any]:
        return {"base": self.base.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.base.load_state_dict(state["base"])


@register("nnm", WRAPPERS)
class NearestNeighborMixing(Wrapper):
    """y_i = (1/(n−f)) Σ_{j ∈ N_i} x_j,  N_i = the n − f inputs nearest to x_i (x_i included),
    then x̂ = base(y_1, …, y_n) with the same f.

    x_i is always in N_i, even when duplicates tie with it; other ties go to the lower index.
    Needs f < n.
    """

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        require(f < n, self.name, "f < n", f, n)
        dists = pairwise_sq_dists(rows.gram())
        np.fill_diagonal(dists, -np.inf)
        nearest = np.argsort(dists, axis=1, kind="stable")[:, : n - f]
        mix = np.zeros((n, n))
        np.put_along_axis(mix, nearest, 1.0 / (n - f), axis=1)
        return self.base.aggregate(rows.mixed(mix), f)


@register("bucketing", WRAPPERS)
class Bucketing(Wrapper):
    """π = a seeded random permutation; y_b = mean of x_{π(bs)}, …, x_{π(bs+s−1)} (the last bucket
    may be smaller); x̂ = base(y_1, …, y_n') with n' = ⌈n/s⌉ and f' = min(f, ⌈n'/2⌉ − 1).

    Why f': f Byzantine inputs can spoil at most f buckets, so f stays a valid bound; but with
    n' = ⌈n/s⌉ buckets the base rule may not accept that many, and ⌈n'/2⌉ − 1 is the most a
    majority-based rule tolerates — a clamp that keeps the call legal, not a robustness guarantee.

    π is drawn from a generator keyed by (seed, "bucketing", call counter), so a run is
    reproducible from its seed alone; the counter is the state, so a checkpoint restores the exact
    next permutation.
    """

    def __init__(
        self, base: RowsAggregator, f: int = 0, bucket_size: int = 2, seed: int = 0
    ) -> None:
        super().__init__(base, f)
        if bucket_size < 1:
            raise ValueError(f"bucket_size must be at least 1, got {bucket_size}")
        self.bucket_size = bucket_size
        self.seed = seed
        self.calls = 0

    def permutation(self, n: int) -> np.ndarray:
        """The permutation the next call will use for n inputs."""
        gen = generator(self.seed, "bucketing", self.calls)
        return torch.randperm(n, generator=gen).numpy()

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n, s = rows.n, self.bucket_size
        buckets = math.ceil(n / s)
        mix = np.zeros((buckets, n))
        for b, members in enumerate(np.array_split(self.permutation(n), range(s, n, s))):
            mix[b, members] = 1.0 / len(members)
        out = self.base.aggregate(rows.mixed(mix), min(f, math.ceil(buckets / 2) - 1))
        self.calls += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        super().load_state_dict(state)
