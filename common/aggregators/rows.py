"""`Rows`: the n vectors a rule aggregates, kept as a lazy product M · X.

Wrappers (nnm, bucketing) replace the inputs by averages of inputs, i.e. by M · X for a small
row-stochastic M (n × n0). Materialising M · X would cost a full write and read of n × d floats;
instead every rule asks `Rows` for what it needs, and each request costs at most one pass over X:

* `gram()`         M G Mᵀ, from the centred Gram G of X (computed once and cached);
* `gram_around(p)` the same for [M · X; p], centred on the point p a rule iterates from (cclip);
* `far()`          which rows are non-finite, i.e. infinitely far from everything;
* `combine(w)`     (wᵀ M) · X, a single vector–matrix product;
* `band_mean(a,b)` the coordinate-wise order statistics of M · X, mixing block by block in cache
                   — nnm's rows by complement, w · (Σ all − Σ excluded), in the columns where
                   that is exact (`ops.complement`), member by member elsewhere.

Because every row of M sums to one, mixed rows are affine combinations of the inputs, so distances
computed from the centred Gram are exact whatever centre was used — up to rounding, which grows
with the rows' distance from the centre. Hence three safeguards:

* **Far rows.** A row holding ±inf or NaN (or, in float64, values so large that squared distances
  overflow) has no usable distance. Such rows are *far*: infinitely far from every row, itself
  included. Their Gram rows and columns are zeroed (so mixing never computes 0 · NaN) and every
  rule reads `far()` instead: weight 0 in gm and cclip, never chosen by krum, never a neighbour
  of a finite row in nnm. A mixed row with any weight on a far input is itself far.
* **A robust centre when the mean is not good enough.** The first Gram is centred on the column
  mean: one pass, exact enough when all rows are of comparable size. One huge row (3e38, say)
  drags the mean along, every honest row is then ~1e37 from the centre, and float64 rounding of
  ~ε·1e74 drowns the honest distances. So the first Gram is checked (`imprecise`): if it is not
  finite, or if for some row its rounding error bound γ·G_ii could exceed a fraction ρ of that
  row's distance to its ⌈n/2⌉−1-th nearest other row (the honest scale: an honest row has at
  least that many honest rows within the honest diameter), the Gram is recomputed around the
  coordinate-wise median, which no minority can move outside the honest rows' range. Only then
  are the two extra passes (median, second Gram) paid; the all-finite common case makes one.
* **Materialised mixing when mixing cancels.** A mixed row's Gram entries carry the rounding of
  its parts, γ · (Σ_k |M_ik| ‖y_k‖)². A bucket holding +1e38 and −1e38 averages to something
  small, but its Gram position is then noise of size ~√γ · 1e38 — and where the noise looks
  close to the honest rows, a rule would weight (or select) the bucket by its noisy position and
  output its true one, which the attacker chose freely. When any mixed row's rounding exceeds ρ
  times the inputs' median kth distance (the honest scale again), the mixed rows are computed
  (`ops.mix_rows`, float64 sums rounded to the inputs' dtype, like `band_mean`'s mixing) and the
  rule sees them as plain inputs, with a Gram consistent with what `combine` returns. The same
  holds at a finer scale for cclip, whose clipping needs distances resolved down to τ: its Gram
  is centred on its old centre, and mixed rows are computed when their rounding exceeds ρ τ².
"""

from __future__ import annotations

import math

import numpy as np
from torch import Tensor

from byzps.common.aggregators import _kernels, collective, ops
from byzps.common.aggregators.gram import honest_rank, honest_scale, pairwise_sq_dists
from byzps.common.aggregators.verdict import Banded, Verdict, Weighted

#: Squared distances from the centre at or beyond this make a row far: non-finite values, or
#: float64 values so large (‖x − centre‖ ≳ 1e150) that sums of squared distances would overflow.
FAR_SQ_NORM = 2.0**1000
#: Relative accuracy wanted on squared distances at the honest scale (the kth-nearest distance).
RESOLUTION = 2.0**-20
_EPS64 = float(np.finfo(np.float64).eps)


def as_matrix(x: Tensor) -> Tensor:
    """Validate an aggregator input: a non-empty (n, d) floating tensor, returned contiguous."""
    if not isinstance(x, Tensor):
        raise TypeError(f"aggregators take a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 2 or x.shape[0] < 1:
        raise ValueError(
            f"aggregators take an (n, d) tensor with n >= 1, got shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise ValueError(f"aggregators take floating-point rows, got {x.dtype}")
    return x.detach().contiguous()


def gram_rounding(d: int) -> float:
    """γ: the float64 Gram's error on ‖y_i − y_j‖² is at most about γ (G_ii + G_jj).

    A bound for dot products summed in blocks of ≈√d terms (the numba kernel's blocks are shorter,
    BLAS's comparable), plus a floor for small d.
    """
    return _EPS64 * (64.0 + 2.0 * math.sqrt(d))


def imprecise(gram: np.ndarray, d: int) -> bool:
    """True when `gram` (over raw rows) is non-finite or may not resolve the honest distances:
    some row's rounding γ·G_ii exceeds ρ times its `honest_scale`. A row whose kth distance is
    itself lost in rounding reads as (near) zero there and fails too."""
    gram = np.ascontiguousarray(gram, np.float64)
    k = honest_rank(gram.shape[0])
    return bool(_kernels.imprecise_gram(gram, gram_rounding(d), RESOLUTION, FAR_SQ_NORM, k))


def imprecise_runs(grams: np.ndarray, d: int) -> np.ndarray:
    """(R,) bool: `imprecise` of each Gram of a stack (R, n, n), in one call. A Gram that is
    not imprecise has no far row either (its diagonal is below FAR_SQ_NORM)."""
    grams = np.ascontiguousarray(grams, np.float64)
    k = honest_rank(grams.shape[1])
    return _kernels.imprecise_grams(grams, gram_rounding(d), RESOLUTION, FAR_SQ_NORM, k)


def far_rows(gram: np.ndarray, n: int) -> np.ndarray:
    """(n,) bool: the first n rows of `gram` whose squared distance from the (finite) centre is
    not below FAR_SQ_NORM — non-finite rows, or float64 rows beyond ~1e150."""
    return ~(np.diag(gram)[:n] < FAR_SQ_NORM)


def sanitise(gram: np.ndarray, far: np.ndarray) -> np.ndarray:
    """`gram` with the far rows' rows and columns zeroed: their entries are inf/NaN or
    meaningless, and zeros keep every product with them (mixing, Gα) finite; `far` marks them."""
    if not far.any():
        return gram
    gram = gram.copy()
    bad = np.flatnonzero(far)
    gram[bad, :] = 0.0
    gram[:, bad] = 0.0
    return gram


class _Inputs:
    """The raw inputs of one aggregation call, their centre, far rows and sanitised Gram.

    The Gram is computed at most once per call (twice when the mean proves a poor centre), and
    mixed views share it.
    """

    def __init__(self, x: Tensor, origin: tuple[_Inputs, np.ndarray] | None = None) -> None:
        self.x = x
        #: (parent inputs, mix) when x was computed as mix · parent (`Rows._materialise`): a
        #: verdict recorded here is passed on to the parent, over the parent's rows.
        self.origin = origin
        #: What the last reduction over these inputs did to each of them (`record`).
        self.verdict: Verdict | None = None
        self._gram: np.ndarray | None = None
        self._far: np.ndarray | None = None
        self._scale: float | None = None

    def record(self, verdict: Verdict) -> None:
        """Keep `verdict` (the last reduction wins: it is the output) and pass it up the chain
        of inputs these rows were computed from."""
        self.verdict = verdict
        if self.origin is not None:
            parent, mix = self.origin
            parent.record(verdict.through(mix))

    def gram(self) -> np.ndarray:
        """The sanitised Gram of the raw rows, centred on their mean or, when that is imprecise,
        on their coordinate-wise median."""
        if self._gram is None:
            n0, d = self.x.shape[0], collective.total_columns(self.x.shape[1])
            gram = ops.centred_gram(self.x)
            if imprecise(gram, d):
                gram = ops.centred_gram(self.x, centre=ops.coordinate_median(self.x))
            self._far = far_rows(gram, n0)
            self._gram = sanitise(gram, self._far)
        return self._gram

    def far(self) -> np.ndarray:
        """(n0,) bool: the raw rows with no finite distance (computes the Gram if not yet)."""
        if self._far is None:
            self.gram()
        assert self._far is not None
        return self._far

    def scale(self) -> float:
        """The median over finite rows of `honest_scale`: the honest rows' squared spread."""
        if self._scale is None:
            finite = ~self.far()
            scales = honest_scale(self.gram(), self.far())[finite]
            self._scale = float(np.median(scales)) if scales.size else 0.0
        return self._scale


class Rows:
    """n = M.shape[0] rows  M · x  over raw inputs x (n0, d); M = None means the identity."""

    def __init__(
        self, x: Tensor | _Inputs, mix: np.ndarray | None = None, affine: bool = True
    ) -> None:
        # Mixed views share their parent's `_Inputs`, so nnm∘gm makes a single pass for its Gram.
        self._inputs = x if isinstance(x, _Inputs) else _Inputs(x)
        self.x = self._inputs.x
        self.mix = mix
        #: False when the rows of `mix` need not sum to one (clipping scales rows): the centred
        #: Gram then does not mix, so a distance request computes the rows (`_resolve`).
        self.affine = affine
        #: The mixed rows computed, when lazy mixing would lose their geometry (`_resolve`).
        self._concrete: Rows | None = None
        self._mixed_gram: np.ndarray | None = None
        self._resolved = mix is None

    @property
    def n(self) -> int:
        return self.x.shape[0] if self.mix is None else self.mix.shape[0]

    def mixed(self, mix: np.ndarray, affine: bool = True) -> Rows:
        """The rows  mix · self  (mix: (n', n), non-negative), without touching the data. Rows of
        `mix` sum to one unless `affine` is False (a scaling): then the first distance request
        computes the rows, since the centred Gram only mixes under affine combinations."""
        if mix.shape[1] != self.n:
            raise ValueError(f"mixing matrix of shape {mix.shape} cannot mix {self.n} rows")
        if self._concrete is not None:
            return self._concrete.mixed(mix, affine)
        total = mix if self.mix is None else mix @ self.mix
        mix64 = np.ascontiguousarray(total, dtype=np.float64)
        return Rows(self._inputs, mix64, affine and self.affine)

    def _resolve(self) -> Rows | None:
        """The computed mixed rows if lazy mixing cancels (module docstring), else None.

        Decided at the first request for a distance, from the raw Gram. A finite mixed row keeps
        its lazy geometry when its rounding γ (Σ_k |M_ik| ‖y_k‖)² is within ρ times the larger of
        the honest scale and its own kth distance: honest mixed rows pass on the former, rows
        that are far for real on the latter, and only a row whose distances are lost in the
        rounding of its parts — a cancellation — fails both.
        """
        if not self._resolved:
            self._resolved = True
            assert self.mix is not None
            if not self.affine:
                return self._materialise()
            raw, far = self._inputs.gram(), self._inputs.far()
            self._mixed_gram = self._mix_gram(raw)
            finite = ~(self.mix[:, far] != 0.0).any(axis=1)
            parts = self.mix @ np.sqrt(np.diag(raw))  # M ≥ 0: |M| = M
            rounding = gram_rounding(collective.total_columns(self.x.shape[1])) * parts**2
            mixed_far = ~finite
            scale = np.maximum(self._inputs.scale(), honest_scale(self._mixed_gram, mixed_far))
            if np.any((rounding > RESOLUTION * scale)[finite]):
                self._materialise()
        return self._concrete

    def _materialise(self) -> Rows:
        """Compute the mixed rows once and use them from now on as plain inputs; their verdicts
        are passed back to these rows' inputs through the mix."""
        assert self.mix is not None
        computed = _Inputs(ops.mix_rows(self.x, self.mix), origin=(self._inputs, self.mix))
        self._concrete = Rows(computed)
        self._resolved = True
        return self._concrete

    def _mix_gram(self, raw: np.ndarray, extra: int = 0) -> np.ndarray:
        """Apply diag(M, I_extra) on both sides of a Gram over [x; extra rows]."""
        if self.mix is None:
            return raw
        n0 = self.x.shape[0]
        left = np.zeros((self.n + extra, n0 + extra))
        left[: self.n, :n0] = self.mix
        left[self.n :, n0:] = np.eye(extra)
        return left @ raw @ left.T

    def gram(self) -> np.ndarray:
        """float64 (n, n) Gram of the rows after centring (one pass over x, then cached).

        Far rows' entries are zero, not their distances: read `far()` alongside.
        """
        if self.mix is None:
            return self._inputs.gram()
        concrete = self._resolve()
        return self._mixed_gram if concrete is None else concrete.gram()

    def gram_around(self, point: Tensor, resolution: float) -> tuple[np.ndarray, np.ndarray]:
        """(Gram of [rows; point] centred on `point`, far mask of the rows): one pass over x.

        For a rule that iterates from `point` (cclip, from its old centre): centred there, every
        distance from it is resolved relative to its own size, however far the rows are from
        their mean. A mixed row stays lazy only if its rounding γ (Σ_k |M_ik| ‖x_k − point‖)² is
        within ρ times the larger of its own squared distance to `point` and `resolution`, the
        squared distance the rule needs resolved (cclip: τ²); else the mixed rows are computed.
        """
        point = point.to(self.x.device, self.x.dtype).contiguous()
        if not self.affine:
            self._resolve()
        if self._concrete is not None:
            return self._concrete.gram_around(point, resolution)
        n0, d = self.x.shape[0], collective.total_columns(self.x.shape[1])
        raw = ops.centred_gram(self.x, point[None], point)
        far = far_rows(raw, n0)
        raw = sanitise(raw, far)
        if self.mix is None:
            return raw, far
        mixed = self._mix_gram(raw, 1)
        mixed_far = (self.mix[:, far] != 0.0).any(axis=1)
        parts = self.mix @ np.sqrt(np.diag(raw)[:n0])  # M ≥ 0: |M| = M
        needed = np.maximum(resolution, np.diag(mixed)[: self.n])
        if np.any((gram_rounding(d) * parts**2 > RESOLUTION * needed)[~mixed_far]):
            return self._materialise().gram_around(point, resolution)
        return mixed, mixed_far

    def far(self) -> np.ndarray:
        """(n,) bool: rows with no finite distance — raw inputs holding ±inf/NaN (or overflowing
        float64), and mixed rows with any weight on one. Computes the Gram if not yet done."""
        raw = self._inputs.far()
        if self.mix is None:
            return raw
        concrete = self._resolve()
        if concrete is not None:
            return concrete.far()
        return (self.mix[:, raw] != 0.0).any(axis=1)

    def verdict(self) -> Verdict | None:
        """What the last reduction (`combine`, `band_mean`) over any view of these rows' raw
        inputs did to each input (byzps.common.aggregators.verdict); None before one ran."""
        return self._inputs.verdict

    def pairwise_sq_dists(self) -> np.ndarray:
        """(n, n) ‖row_i − row_j‖², +inf wherever a far row is involved (its diagonal included)."""
        return pairwise_sq_dists(self.gram(), self.far())

    def combine(
        self,
        weights: np.ndarray,
        extra: Tensor | None = None,
        extra_weights: np.ndarray | None = None,
    ) -> Tensor:
        """Σ_i weights[i] · row_i (+ Σ_k extra_weights[k] · extra_k), in x's dtype and device.

        Rows with weight 0 are skipped, so a zero weight on a far row never computes 0 · inf.
        """
        if self._concrete is not None:
            return self._concrete.combine(weights, extra, extra_weights)
        coefficients = weights if self.mix is None else weights @ self.mix
        self._inputs.record(Weighted(np.asarray(coefficients, np.float64)))
        return ops.combine(self.x, coefficients, extra, extra_weights)

    def mean(self) -> Tensor:
        return self.combine(np.full(self.n, 1.0 / self.n))

    def band_mean(self, a: int, b: int, slide: int = 0) -> Tensor:
        """Per coordinate, the mean of the rows' order statistics of rank a..b-1 (0-based), NaN
        ranking as +inf; with slide > 0, of the ranks a+s..b+s-1 nearest the median, s ≤ slide
        (`ops.band_mean`)."""
        if self._concrete is not None:
            return self._concrete.band_mean(a, b, slide)
        self._inputs.record(Banded(self.mix, a, b, slide))
        return ops.band_mean(self.x, *ops.sparse_mix(self.mix), a, b, slide)
