"""Pre-aggregation wrappers: nnm (nearest-neighbour mixing) and bucketing.

Both replace the n inputs by averages of inputs, i.e. by M · X for a row-stochastic M, and hand
those rows to a base rule. They only build M (in n-dimensional space, from the Gram matrix or a
permutation); `Rows` keeps M · X lazy, so the wrapper adds no pass over the data — unless mixing
would cancel huge inputs, where `Rows` computes the mixed rows once (see `rows`).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators import _kernels
from byzps.common.aggregators._networks import band_network
from byzps.common.aggregators.rows import Rows
from byzps.common.aggregators.rule import RowsAggregator, register, require
from byzps.common.registry import Registry
from byzps.common.seeding import generator

WRAPPERS: Registry[RowsAggregator] = Registry("aggregator wrapper", supplied=("base", "f", "seed"))


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

    Non-finite inputs are infinitely far from everything, so they are never in a finite row's
    N_i while n − f inputs are finite; their own y_i includes them and is non-finite itself
    (`Rows.far`), which the base rule treats as such.

    Guarantee: n − f honest inputs lie within D_H (their diameter) of each honest x_i, so all of
    N_i does, and at most min(f, n − f − 1) members are not honest; each honest y_i is then
    within r_H + min(f, n − f − 1)/(n − f) · D_H < 2 D_H of μ_H (r_H, μ_H: the honest inputs'
    radius and mean). The base rule's guarantee applies to these n − f rows.
    """

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        return self.base.aggregate(rows.mixed(self.mixing(rows, f)), f)

    def check(self, n: int, f: int) -> None:
        """f < n, and the base rule's own condition on the same n mixed rows."""
        require(f < n, self.name, "f < n", f, n)
        self.base.check(n, f)

    def mixing(self, rows: Rows, f: int) -> np.ndarray:
        """The (n, n) row-stochastic M with y = M x: 1/(n − f) on each row's N_i.

        Each N_i is the first n − f of row i of the distance matrix in a stable sort: x_i
        first (its own entry counted as −inf), then its nearest, ties to the lower index; far
        rows' +inf distances sort last (`nearest_mix`).
        """
        self.check(rows.n, f)
        return nearest_mix(rows.pairwise_sq_dists(), f)

    @property
    def batches_runs(self) -> bool:  # type: ignore[override]
        """Mixing asks only for distances, which `RunsRows` serves: as the base rule batches."""
        return self.base.batches_runs


def nearest_mix(dists: np.ndarray, f: int) -> np.ndarray:
    """nnm's mix from squared distances (n, n), or from a stack of them (R, n, n) (each its own
    mix, as alone): 1/(n − f) on each row's n − f nearest, the row itself first, then by
    distance, ties to the lower index — the order of a stable sort (`_kernels.nearest_mixes`)."""
    n = dists.shape[-1]
    stack = np.ascontiguousarray(dists, np.float64).reshape(-1, n, n)
    return _kernels.nearest_mixes(stack, f, band_network(n, 0, n - f)).reshape(dists.shape)


@register("bucketing", WRAPPERS)
class Bucketing(Wrapper):
    """π = a seeded random permutation; y_b = mean of x_{π(bs)}, …, x_{π(bs+s−1)} (the last bucket
    may be smaller); x̂ = base(y_1, …, y_n') with n' = ⌈n/s⌉, told the same f.

    Tolerance: f Byzantine inputs spoil at most f buckets, so the base rule must tolerate f of
    n' — checked (`check`): at n = 20, s = 2 a median needs f < 5, where it alone tolerates
    f < 10. (An earlier version clamped f to ⌈n'/2⌉ − 1 to keep the call legal; at n = 20, f = 8
    that told the base rule 4 of 10 buckets were bad while 8 could be, and under large-norm
    attacks every base rule failed. Such a pairing is now refused before the run.)

    Guarantee: every unspoiled bucket is a mean of honest inputs — within r_H of their mean μ_H,
    within D_H of each other, inside their coordinate-wise range — and the base rule's guarantee
    applies on (n', f) with those constants. A bucket holding a non-finite input is non-finite
    (`Rows.far`); one whose members cancel (+1e38 and −1e38) is computed rather than mixed lazily
    (`rows`), so the base rule sees the value it will output.

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

    def check(self, n: int, f: int) -> None:
        """The base rule must tolerate f spoiled buckets among ⌈n/s⌉."""
        self.base.check(math.ceil(n / self.bucket_size), f)

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n, s = rows.n, self.bucket_size
        self.check(n, f)
        buckets = math.ceil(n / s)
        mix = np.zeros((buckets, n))
        for b, members in enumerate(np.array_split(self.permutation(n), range(s, n, s))):
            mix[b, members] = 1.0 / len(members)
        out = self.base.aggregate(rows.mixed(mix), f)
        self.calls += 1
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls, **super().state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
        super().load_state_dict(state)
