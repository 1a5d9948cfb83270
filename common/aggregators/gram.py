"""Distances from a Gram matrix, the n-dimensional coefficient space the distance rules work in.

A point z = Σ_k α_k y_k (α summing to one, y the centred rows) is represented by α. With G = Y Yᵀ,

    ‖y_i − z‖² = G_ii − 2 (G α)_i + αᵀ G α,

so iterative rules (Weiszfeld, centered clipping) cost O(n²) per step instead of O(n d). Rounding
can make these slightly negative; they are clamped at zero.
"""

from __future__ import annotations

import numpy as np

from byzps.common.aggregators import _kernels


def pairwise_sq_dists(gram: np.ndarray, far: np.ndarray | None = None) -> np.ndarray:
    """(n, n) matrix of ‖y_i − y_j‖² = G_ii + G_jj − 2 G_ij; +inf in the rows and columns of
    `far` rows (bool mask), whose Gram entries carry no distance. A stack of Grams (R, n, n)
    without far rows gives the stack of matrices, each entry the same operations as alone."""
    diag = np.diagonal(gram, axis1=-2, axis2=-1)
    dists = np.maximum(diag[..., :, None] + diag[..., None, :] - 2.0 * gram, 0.0)
    if far is not None and far.any():
        dists[far, :] = np.inf
        dists[:, far] = np.inf
    return dists


def honest_rank(n: int) -> int:
    """k of `honest_scale`: max(1, ⌈n/2⌉ − 1)."""
    return max(1, (n + 1) // 2 - 1)


def honest_scale(gram: np.ndarray, far: np.ndarray | None = None) -> np.ndarray:
    """(n,) each row's squared distance to its k-th nearest other row, k = `honest_rank`(n)
    (+inf for far rows, and far rows never count as near).

    With honest rows in the majority, an honest row has k honest rows within the honest diameter
    D_H, so its value is at most D_H²: the scale at which distances must be resolved.
    """
    n = gram.shape[0]
    far = np.zeros(n, np.bool_) if far is None else np.ascontiguousarray(far, np.bool_)
    return _kernels.kth_sq_dists(np.ascontiguousarray(gram), far, honest_rank(n))


def weiszfeld(
    gram: np.ndarray, start: np.ndarray, usable: np.ndarray, nu: float, threshold: float, cap: int
) -> tuple[np.ndarray, int, float]:
    """Smoothed Weiszfeld from the point with coefficients `start` (see `_kernels.weiszfeld`):
    (α, steps, ‖∇F_ν‖), α over the basis, summing to one.

    The steps run in the frame of the start's first row b, on the Gram of y_i − y_b: a point near
    y_b is then y_b plus a small combination, represented to full precision. In the centred frame
    it would be α ≈ e_b, and a first step of ~ν next to ‖y_b‖ ≫ ν rounds away — the iteration
    would sit on its start and read a zero gradient there.
    """
    base = int(np.argmax(start > 0))
    usable = np.ascontiguousarray(usable, dtype=np.bool_)
    beta, steps, grad = _kernels.weiszfeld(
        np.ascontiguousarray(gram), base, start.astype(np.float64), usable, nu, threshold, cap
    )
    beta[base] = 1.0 - (beta.sum() - beta[base])  # z = y_b + Σ β_i (y_i − y_b)
    return beta, steps, grad


def densest(gram: np.ndarray, usable: np.ndarray, resolution: float) -> np.ndarray:
    """Coefficients of the mean of the usable rows with the smallest `honest_scale`.

    Each such row lies within D_H of an honest row (its k ≥ f nearest others include one,
    module `distance`), and so does their mean. Rows within `resolution` (relative) of the
    smallest value tie: they cannot be told apart, and averaging them instead of picking the
    lowest index keeps the start — hence the output — independent of the order of the rows.
    """
    scale = honest_scale(gram, ~usable)
    best = scale.min()
    ties = usable & (scale <= best + resolution * best)
    return ties / ties.sum()
