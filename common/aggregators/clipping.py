"""Clipping pre-aggregators: clip (a static radius c) and arc (adaptive robust clipping).

Both replace each input by its projection on a ball about the origin,

    y_i = min(1, τ/‖x_i‖) · x_i,

and hand the y_i to a base rule. The projection is 1-Lipschitz, so clipping never spreads the
honest inputs further apart (their diameter D_H can only shrink), and every clipped row has norm
≤ τ: a Byzantine row's reach shrinks to τ while honest rows within τ are untouched.

Why the rows are scaled lazily, and computed only on demand. A scaling is y = diag(s) · x, not
an affine combination (its rows do not sum to one), so the centred Gram of x does not give the
centred Gram of y — `Rows`' exact lazy mixing does not apply. Instead the wrapper hands on the
view diag(s) · (rows) marked non-affine (`Rows.mixed(..., affine=False)`): what is linear in the
rows (`combine`: mean, and the output of every rule; `band_mean`: cm, cwtm, meamed) reads it
lazily at no extra pass, and the first distance request (krum, gm, nnm, …) computes the clipped
rows once and works on them as plain inputs. The norms cost one pass (`norms.sq_norms`).

Non-finite rows. A row holding ±inf or NaN (or float64 beyond ~1e150) has no finite norm and no
direction: its scale would be τ/∞ = 0 and 0 · inf = NaN. It is left as it is — still non-finite,
so still *far* for the base rule (never selected by krum, weight 0 in gm and cclip, NaN ranking
as +inf in cm), exactly as without the wrapper. It is not mapped to a finite point (0, say): that
would hide from the base rule a row it knows how to discard.
"""

from __future__ import annotations

import math
from abc import abstractmethod

import numpy as np
from torch import Tensor

from byzps.common.aggregators.norms import sq_norms
from byzps.common.aggregators.rows import Rows
from byzps.common.aggregators.rule import RowsAggregator, register, require
from byzps.common.aggregators.wrappers import WRAPPERS, Wrapper


def clip_scales(sq: np.ndarray, far: np.ndarray, radius: float) -> np.ndarray:
    """(n,) min(1, radius/‖x_i‖) from squared norms; 1 for far rows (left as they are)."""
    norms = np.sqrt(sq)
    scale = np.ones(sq.shape[0])
    over = (norms > radius) & ~far
    scale[over] = radius / norms[over]
    return scale


class _Clipping(Wrapper):
    """Scales each row onto the ball of radius `radius(...)` about the origin, then applies base."""

    @abstractmethod
    def radius(self, sq: np.ndarray, far: np.ndarray, f: int) -> float:
        """τ for this call, from the rows' squared norms (far rows: +inf)."""

    def resolution(self) -> float:
        """The squared norm the radius must be resolved at (mixed rows only, `norms.sq_norms`)."""
        return 0.0

    def check(self, n: int, f: int) -> None:
        self.base.check(n, f)

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        self.check(rows.n, f)
        sq, far = sq_norms(rows, self.resolution())
        scale = clip_scales(sq, far, self.radius(sq, far, f))
        clipped = rows if np.all(scale == 1.0) else rows.mixed(np.diag(scale), affine=False)
        return self.base.aggregate(clipped, f)


@register("clip", WRAPPERS)
class StaticClipping(_Clipping):
    """y_i = min(1, c/‖x_i‖) · x_i, then x̂ = base(y_1, …, y_n) with the same f.

    Static clipping, as ByzFL's `Clipping` (same parameter name, c, and default 2.0; ByzFL
    accepts c = 0, here c must be positive and finite: c = 0 maps every input to 0). Adds no
    tolerance condition of its own: the base rule's on (n, f) applies.

    Guarantee: every finite output row has norm ≤ c, the honest rows' diameter does not grow
    (projection on a ball is 1-Lipschitz), honest rows of norm ≤ c are unchanged, and
    coordinate t of a clipped honest row lies between 0 and its original value, i.e. in
    [min(lo_t, 0), max(hi_t, 0)]. The base rule's guarantee applies to the clipped honest rows.
    """

    def __init__(self, base: RowsAggregator, f: int = 0, c: float = 2.0) -> None:
        super().__init__(base, f)
        if not (c > 0 and math.isfinite(c)):
            raise ValueError(f"c must be positive and finite, got {c}")
        self.c = float(c)

    def radius(self, sq: np.ndarray, far: np.ndarray, f: int) -> float:
        return self.c

    def resolution(self) -> float:
        return self.c**2


def arc_clipped(n: int, f: int) -> int:
    """k = ⌊2 (f/n)(n − f)⌋, in integers: how many of the largest inputs ARC clips."""
    return 2 * f * (n - f) // n


@register("arc", WRAPPERS)
class AdaptiveRobustClipping(_Clipping):
    """y_i = min(1, τ/‖x_i‖) · x_i with τ = the (k+1)-th largest norm, k = ⌊2 (f/n)(n − f)⌋,
    then x̂ = base(y_1, …, y_n) with the same f.

    Adaptive robust clipping (Allouah, Guerraoui, Gupta, Jellouli, Rizk, Stephan 2024, "The vital
    role of gradient clipping in Byzantine-resilient distributed learning", arXiv:2405.14432;
    ByzFL's `ARC`): the k largest inputs are clipped to the norm of the next one. k is the
    paper's, computed exactly in integers; ByzFL computes int((2f/n)(n − f)) in floating point,
    which agrees whenever f < n/2 and n < 242, and elsewhere is at times one less (where the
    product is an exact integer that rounds below it: n = 242, f = 33 gives 57 here, 56 there).
    Far rows count as the largest (norm +inf) and stay as they are; with more than k of them τ is
    +inf and no finite row is clipped.

    Tolerance: f < n, and the base rule's condition on (n, f).

    Guarantee: for f ≤ n/2, k ≥ f (as 2(n − f)/n ≥ 1), so τ is at most the (f+1)-th largest
    norm, which is at most R_H = max_{i∈H} ‖x_i‖ (at most f inputs are not honest): every finite
    output row, Byzantine ones included, has norm ≤ R_H, the honest rows' diameter does not
    grow (1-Lipschitz projection), and the base rule's guarantee applies to the clipped honest
    rows.
    """

    def check(self, n: int, f: int) -> None:
        require(f < n, self.name, "f < n", f, n)
        super().check(n, f)

    def radius(self, sq: np.ndarray, far: np.ndarray, f: int) -> float:
        n = sq.shape[0]
        k = arc_clipped(n, f)
        return float(np.sqrt(np.sort(sq)[n - k - 1]))
