"""Bulyan: iterated Krum to select θ = n − 2f inputs, then a coordinate-wise trimmed mean
around the median of the selection."""

from __future__ import annotations

import numpy as np
from torch import Tensor

from byzps.common.aggregators.rows import Rows
from byzps.common.aggregators.rule import RowsAggregator, register, require


def iterated_krum(dists: np.ndarray, far: np.ndarray, f: int, count: int) -> np.ndarray:
    """`count` row indices chosen one by one by Krum on the rows not yet chosen: with r rows
    left, score_j = Σ of the max(1, r − f − 2) smallest ‖x_i − x_j‖² over other rows left;
    the lowest score wins (the lower index on ties), non-finite rows only when nothing else is
    left."""
    n = dists.shape[0]
    left = np.ones(n, np.bool_)
    order = np.empty(count, np.int64)
    for step in range(count):
        r = n - step
        sub = dists[np.ix_(left, left)].copy()
        np.fill_diagonal(sub, np.inf)
        neighbours = min(max(1, r - f - 2), r - 1)
        scores = np.sort(sub, axis=1)[:, :neighbours].sum(axis=1) if r > 1 else np.zeros(1)
        members = np.flatnonzero(left)
        scores = np.where(far[members], np.inf, scores)
        pick = members[np.lexsort((members, far[members], scores))[0]]
        order[step] = pick
        left[pick] = False
    return order


@register("bulyan")
class Bulyan(RowsAggregator):
    """Bulyan (El Mhamdi, Guerraoui, Rouault, "The hidden vulnerability of distributed learning
    in Byzantium", ICML 2018):

        S = θ = n − 2f inputs chosen by Krum one at a time, each removed before the next choice;
        x̂_t = mean of the β = θ − 2f values of {x_{i,t} : i ∈ S} closest to their median,

    a tie between values equally far below and above the median keeping the lower (as meamed).
    Needs n ≥ 4f + 3.

    Krum's neighbour count is the paper's (and byzps krum's) r − f − 2 with r inputs left,
    raised to 1 for the last choices where it would be ≤ 0 (r = 2f + 1, f ≤ 1); ByzFL 0.0.11
    has no Bulyan, and its Krum would use r − f − 1. Non-finite rows score +inf: with at least
    n − f ≥ θ finite rows none is selected, and the output is finite.

    Guarantee, coordinate-wise (n ≥ 4f + 3; [lo_t, hi_t] the honest rows' range, w_t = hi_t − lo_t):
    S holds at most f Byzantine rows and θ ≥ 2f + 1, so the median m_t lies in [lo_t, hi_t];
    at least θ − f ≥ β honest values lie within w_t of m_t, so every value in the window does,
    and x̂_t ∈ [lo_t − w_t, hi_t + w_t] — plus Krum's guarantee that each selected row is within
    √(r − f − 2) · D_H + r_H of μ_H while r > 2f + 2.

    Shardable: Krum needs only the Gram (a sum over coordinate shards: one n × n all-reduce),
    and the second stage is coordinate-wise.
    """

    def check(self, n: int, f: int) -> None:
        require(n >= 4 * f + 3, self.name, "n ≥ 4f + 3", f, n)

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        self.check(n, f)
        theta = n - 2 * f
        beta = theta - 2 * f
        chosen = iterated_krum(rows.pairwise_sq_dists(), rows.far(), f, theta)
        selection = np.zeros((theta, n))
        selection[np.arange(theta), chosen] = 1.0
        # Per coordinate, the β of θ sorted values nearest the median: meamed's sliding window
        # (`_kernels.band_mean`), here sliding 2f ranks past a window of β.
        return rows.mixed(selection).band_mean(0, beta, slide=theta - beta)
