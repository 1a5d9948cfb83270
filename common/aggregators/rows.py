"""`Rows`: the n vectors a rule aggregates, kept as a lazy product M · X.

Wrappers (nnm, bucketing) replace the inputs by averages of inputs, i.e. by M · X for a small
row-stochastic M (n × n0). Materialising M · X would cost a full write and read of n × d floats;
instead every rule asks `Rows` for what it needs, and each request costs at most one pass over X:

* `gram()`         M G Mᵀ, from the centred Gram G of X (computed once and cached);
* `combine(w)`     (wᵀ M) · X, a single vector–matrix product;
* `band_mean(a,b)` the coordinate-wise order statistics of M · X, mixing block by block in cache.

Because every row of M sums to one, mixed rows are affine combinations of the inputs, so distances
computed from the centred Gram are exact whatever centre was used.
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from byzps.common.aggregators import ops


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


class _Inputs:
    """The raw inputs of one aggregation call and their centred Gram, computed at most once."""

    def __init__(self, x: Tensor) -> None:
        self.x = x
        self._gram: np.ndarray | None = None

    def gram(self) -> np.ndarray:
        if self._gram is None:
            self._gram = ops.centred_gram(self.x)
        return self._gram


class Rows:
    """n = M.shape[0] rows  M · x  over raw inputs x (n0, d); M = None means the identity."""

    def __init__(self, x: Tensor | _Inputs, mix: np.ndarray | None = None) -> None:
        # Mixed views share their parent's `_Inputs`, so nnm∘gm makes a single pass for its Gram.
        self._inputs = x if isinstance(x, _Inputs) else _Inputs(x)
        self.x = self._inputs.x
        self.mix = mix

    @property
    def n(self) -> int:
        return self.x.shape[0] if self.mix is None else self.mix.shape[0]

    def mixed(self, mix: np.ndarray) -> Rows:
        """The rows  mix · self  (mix: (n', n), rows summing to one), without touching the data."""
        if mix.shape[1] != self.n:
            raise ValueError(f"mixing matrix of shape {mix.shape} cannot mix {self.n} rows")
        total = mix if self.mix is None else mix @ self.mix
        return Rows(self._inputs, np.ascontiguousarray(total, dtype=np.float64))

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
        """float64 (n, n) Gram of the rows after centring (one pass over x, then cached)."""
        return self._mix_gram(self._inputs.gram())

    def gram_with(self, extra: Tensor) -> np.ndarray:
        """float64 Gram of [rows; extra] (extra: (k, d)), centred on x's mean: one pass over x."""
        extra = extra.to(self.x.device, self.x.dtype).contiguous()
        return self._mix_gram(ops.centred_gram(self.x, extra), extra.shape[0])

    def combine(
        self,
        weights: np.ndarray,
        extra: Tensor | None = None,
        extra_weights: np.ndarray | None = None,
    ) -> Tensor:
        """Σ_i weights[i] · row_i (+ Σ_k extra_weights[k] · extra_k), in x's dtype and device."""
        coefficients = weights if self.mix is None else weights @ self.mix
        return ops.combine(self.x, coefficients, extra, extra_weights)

    def mean(self) -> Tensor:
        return self.combine(np.full(self.n, 1.0 / self.n))

    def band_mean(self, a: int, b: int) -> Tensor:
        """Per coordinate, the mean of the rows' order statistics of rank a..b-1 (0-based)."""
        idx, wts = self._sparse_mix()
        return ops.band_mean(self.x, idx, wts, a, b)

    def _sparse_mix(self) -> tuple[np.ndarray, np.ndarray]:
        """M as padded (index, weight) lists per row; nnm and bucketing mixes are sparse."""
        if self.mix is None:
            return np.empty((0, 0), np.int64), np.empty((0, 0), np.float64)
        support = [np.flatnonzero(row) for row in self.mix]
        width = max(len(s) for s in support)
        idx = np.zeros((self.n, width), np.int64)
        wts = np.zeros((self.n, width), np.float64)
        for i, s in enumerate(support):
            idx[i, : len(s)] = s
            wts[i, : len(s)] = self.mix[i, s]
        return idx, wts
