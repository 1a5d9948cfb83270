"""Norm-based selection: each row's Euclidean norm about the origin, and cge, the rule that keeps
the n − f smallest.

Norms are about the origin, not about the rows' mean, so the centred Gram that the distance rules
read (`Rows.gram`) does not give them. For raw rows one pass of squares does (`ops.sq_norms`); for
mixed rows, the Gram of [rows; 0] centred on the origin (`Rows.gram_around`), which resolves each
mixed row's norm relative to its own size — or computes the mixed rows where their parts would
round it away. Either way a row with no finite norm (±inf, NaN, or float64 beyond ~1e150, whose
square overflows) is *far*: its norm reads +inf.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators import ops
from byzps.common.aggregators.rows import FAR_SQ_NORM, Rows
from byzps.common.aggregators.rule import RowsAggregator, register, require


def sq_norms(rows: Rows, resolution: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """((n,) float64 ‖row_i‖², (n,) bool far): far rows' squared norms read +inf.

    `resolution` is the squared norm a caller must tell apart (clip: c²), for mixed rows only:
    below it, rounding of their parts may stand (`Rows.gram_around`).
    """
    if rows.mix is None:
        sq = ops.sq_norms(rows.x)
        far = ~(sq < FAR_SQ_NORM)
    else:
        x = rows.x
        origin = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        gram, far = rows.gram_around(origin, resolution)
        sq = np.diag(gram)[: rows.n].copy()
    sq[far] = np.inf
    return sq, far


@register("cge")
class ComparativeGradientElimination(RowsAggregator):
    """x̂ = (1/(n−f)) Σ_{i ∈ S} x_i,  S = the n − f inputs of smallest Euclidean norm ‖x_i‖.

    Comparative gradient elimination (Gupta, Liu, Vaidya 2021, "Byzantine fault-tolerant
    distributed machine learning with norm-based comparative gradient elimination"; Liu, Gupta,
    Vaidya 2021, "Approximate Byzantine fault-tolerance in distributed optimization"). The paper
    steps along the *sum* of the kept gradients; ByzPy's `ComparativeGradientElimination` and
    Garfield's `cge` return their mean, as here — the sum is (n − f)× it, a step-size factor.
    Ties in norm go to the lower index. One pass for the norms (`sq_norms`), one for the mean.

    Tolerance: 3f < n. The paper's guarantee needs α = 1 − (f/n)(1 + 2μ/γ) > 0 for a μ-smooth,
    γ-strongly convex cost; μ ≥ γ always, so that is possible only when f < n/3 — the part of the
    condition that does not depend on the loss, and the part checked here.

    Guarantee: the n − f honest inputs all have norm ≤ R_H = max_{i∈H} ‖x_i‖, so the (n − f)-th
    smallest norm is ≤ R_H and every kept input, hence x̂ (a convex combination), has
    ‖x̂‖ ≤ R_H — about the origin, not about μ_H: a Byzantine input of small norm is always kept.
    Non-finite rows have norm +inf and are never kept while n − f rows are finite (with fewer,
    the finite ones alone are averaged, like multikrum).
    """

    def check(self, n: int, f: int) -> None:
        require(3 * f < n, self.name, "3f < n", f, n)

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        self.check(n, f)
        sq, far = sq_norms(rows)
        eligible = np.flatnonzero(~far)
        if eligible.size == 0:  # nothing finite to keep: the output cannot be finite anyway
            eligible = np.arange(n)
        chosen = eligible[np.argsort(sq[eligible], kind="stable")[: n - f]]
        weights = np.zeros(n)
        weights[chosen] = 1.0 / chosen.size
        return rows.combine(weights)
