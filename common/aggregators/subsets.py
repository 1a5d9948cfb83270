"""Rules that output the mean of a chosen subset of n − f inputs: mda, smea and monna.

Each chooses the subset from the n × n centred Gram alone (`Rows.gram`: one pass over the data)
and outputs its mean with `Rows.combine` (a second pass), so like krum each could run in a
sharded parameter server: the Gram is a sum over coordinate shards (one all-reduce of n × n
floats), the choice is made once on it, and every shard then averages its own coordinates.

Non-finite rows (`Rows.far`) are never chosen: while at least n − f rows are finite the subset
holds finite rows only and the output is finite. With fewer, no subset of finite rows exists and
the output is the plain mean (it cannot be finite anyway).

Notation for the guarantees: H the honest rows (at least n − f, all finite), μ_H their mean,
r_H = max_{i∈H} ‖x_i − μ_H‖, D_H = max_{i,j∈H} ‖x_i − x_j‖.
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from byzps.common.aggregators import _search_kernels
from byzps.common.aggregators.gram import densest
from byzps.common.aggregators.rows import RESOLUTION, Rows
from byzps.common.aggregators.rule import MajorityRule, register

#: Default cap on C(n, f), the subsets an exact search may have to visit: n = 20, f = 8
#: (125,970) takes milliseconds; the cap keeps a misconfigured n = 60, f = 25 (5e16) from
#: running for years.
MAX_SUBSETS = 2_000_000


def _mean_of(rows: Rows, subset: np.ndarray) -> Tensor:
    weights = np.zeros(rows.n)
    weights[subset] = 1.0 / subset.size
    return rows.combine(weights)


class _SubsetSearch(MajorityRule):
    """Exact search, by branch and bound (`_search_kernels.min_subset`), for the subset of
    n − f finite inputs with the smallest score; the output is its mean."""

    spectral: bool

    def __init__(self, f: int = 0, max_subsets: int = MAX_SUBSETS) -> None:
        super().__init__(f)
        if not (isinstance(max_subsets, int) and max_subsets >= 1):
            raise ValueError(f"max_subsets must be a positive integer, got {max_subsets!r}")
        self.max_subsets = max_subsets

    def check(self, n: int, f: int) -> None:
        super().check(n, f)
        count = math.comb(n, f)
        if count > self.max_subsets:
            raise ValueError(
                f"{self.name} would search C(n, f) = {count:,} subsets for n={n}, f={f}, more "
                f"than max_subsets={self.max_subsets:,}; raise max_subsets or lower f"
            )

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        self.check(n, f)
        k = n - f
        gram = np.ascontiguousarray(rows.gram())
        dists = rows.pairwise_sq_dists()
        candidates = np.flatnonzero(~rows.far()).astype(np.int64)
        if candidates.size < k:
            return rows.mean()
        bound = self._start_bound(gram, dists, candidates, k)
        subset, _ = _search_kernels.min_subset(gram, dists, candidates, k, bound, self.spectral)
        if subset.size == 0:  # the guess's score, recomputed in another order, rounded lower
            subset, _ = _search_kernels.min_subset(
                gram, dists, candidates, k, np.inf, self.spectral
            )
        return _mean_of(rows, subset)

    def _start_bound(
        self, gram: np.ndarray, dists: np.ndarray, candidates: np.ndarray, k: int
    ) -> float:
        """The best score among the balls {i and its k − 1 nearest candidates}: a good subset
        found in O(n · k²), whose score lets the search cut most branches from the start."""
        local = dists[np.ix_(candidates, candidates)]
        balls = candidates[np.argsort(local, axis=1, kind="stable")[:, :k]]
        return float(
            min(
                _search_kernels.subset_score(gram, dists, np.sort(ball), self.spectral)
                for ball in balls
            )
        )


@register("mda")
class MinimumDiameterAveraging(_SubsetSearch):
    """x̂ = (1/(n − f)) Σ_{i∈S*} x_i,  S* = argmin_{|S| = n − f} max_{i,j∈S} ‖x_i − x_j‖.

    Minimum-Diameter Averaging (El Mhamdi, Guerraoui, Rouault, "Distributed momentum for
    Byzantine-resilient stochastic gradient descent", ICLR 2021; ByzFL `MDA`, which cites
    El Mhamdi, Guerraoui, Guirguis, Hoang, Rouault, "Genuinely distributed Byzantine machine
    learning", PODC 2020). Exact: the search
    runs over the C(n, f) subsets with branch and bound on the distance matrix (a diameter only
    grows as rows are added), started from the best ball of a row and its n − f − 1 nearest;
    ties go to the first subset in lexicographic order, as in ByzFL. Refused when
    C(n, f) > `max_subsets` (the worst case visits them all, e.g. when all rows coincide).

    Guarantee (2f < n): H holds n − f rows of diameter ≤ D_H, so diam(S*) ≤ D_H; S* holds
    ≥ n − 2f ≥ 1 honest rows, so each of its members is within D_H of an honest row and
    ‖x̂ − μ_H‖ ≤ D_H + r_H.
    """

    spectral = False


@register("smea")
class SmallestMaxEigenvalueAveraging(_SubsetSearch):
    """x̂ = mean of S* = argmin_{|S| = n − f} λ_max(Σ_S),
    Σ_S = (1/|S|) Σ_{i∈S} (x_i − x̄_S)(x_i − x̄_S)ᵀ.

    Smallest Maximum Eigenvalue Averaging (Allouah, Guerraoui, Gupta, Pinot, Stephan, "On the
    privacy-robustness-utility trilemma in distributed learning", ICML 2023; ByzFL `SMEA`). The
    nonzero eigenvalues of the d × d Σ_S are those of the subset's centred Gram P G_S P / |S|
    (|S| × |S|), so no d-dimensional work is needed. Exact: branch and bound over the C(n, f)
    subsets (λ_max only grows as rows are added), refused above `max_subsets`. ByzFL estimates
    each λ_max by one power step from a random vector, so its choice is random where this one
    is exact.

    Guarantee (2f < n): every (n − f)-subset T of H has λ_max(Σ_T) ≤ r_H² (its points are
    within r_H of μ_H), so λ* := λ_max(Σ_{S*}) ≤ r_H². S* holds a share α ≥ (n − 2f)/(n − f) of
    honest rows; along any unit u, Var_S ≥ α δ² + α²δ²/(1 − α) = α δ²/(1 − α) for δ the gap
    between the honest part's mean and x̂, so δ ≤ √(λ* (1 − α)/α) and
    ‖x̂ − μ_H‖ ≤ r_H (1 + √(f/(n − 2f))).
    """

    spectral = True


@register("monna")
class MoNNA(MajorityRule):
    """x̂ = (1/(n − f)) Σ_{i∈N(z)} x_i,  N(z) = the n − f inputs nearest to the pivot z.

    Mean of the nearest neighbours (Farhadkhani, Guerraoui, Gupta, Hoang, Pinot, Stephan,
    "Robust collaborative learning with linear gradient overhead", ICML 2023; ByzFL `MoNNA`;
    the nnm wrapper of "Fixing by mixing", AISTATS 2023, is the same step around every input).
    In the paper z is the honest node's own vector (it is trusted by itself); ByzFL
    takes input `idx` (0 by default). A parameter server has no trusted input — a Byzantine
    row 0 would be the pivot and choose its n − f − 1 accomplices' neighbourhood — so the
    default `pivot="densest"` is the input whose ⌈n/2⌉−1-th nearest other input is nearest (the
    mean of those that tie; gm's start, `gram.densest`). `pivot=<int>` is ByzFL's convention.
    Ties among neighbours go to the lower index.

    Guarantee (2f < n, densest pivot): k = ⌈n/2⌉ − 1 ≥ f, an honest row's k nearest others are
    within D_H, so the pivot's are too and include an honest row: z is within D_H + r_H of μ_H,
    every honest row within ρ = D_H + 2 r_H of z, hence so are its n − f nearest, and
    ‖x̂ − μ_H‖ ≤ ρ + D_H + r_H = 2 D_H + 3 r_H. With a fixed pivot that is honest: D_H + r_H.
    """

    def __init__(self, f: int = 0, pivot: str | int = "densest") -> None:
        super().__init__(f)
        if pivot != "densest" and not (
            isinstance(pivot, int) and not isinstance(pivot, bool) and pivot >= 0
        ):
            raise ValueError(f"pivot must be 'densest' or a non-negative index, got {pivot!r}")
        self.pivot = pivot

    def check(self, n: int, f: int) -> None:
        super().check(n, f)
        if isinstance(self.pivot, int) and self.pivot >= n:
            raise ValueError(f"{self.name}: pivot={self.pivot} is not an index of n={n} inputs")

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        self.check(n, f)
        gram = rows.gram()
        far = rows.far()
        if far.all():
            return rows.mean()
        if self.pivot == "densest":
            alpha = densest(gram, ~far, RESOLUTION)
        else:
            alpha = np.zeros(n)
            alpha[self.pivot] = 1.0
        if (alpha[far] != 0.0).any():  # a non-finite pivot is infinitely far from everything
            return rows.mean()
        g_alpha = gram @ alpha
        sq = np.maximum(np.diag(gram) - 2.0 * g_alpha + alpha @ g_alpha, 0.0)
        sq[far] = np.inf
        nearest = np.argsort(sq, kind="stable")[: n - f]
        return _mean_of(rows, nearest)
