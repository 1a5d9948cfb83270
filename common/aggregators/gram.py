"""Distances from a Gram matrix, the n-dimensional coefficient space the distance rules work in.

A point z = Σ_k α_k y_k (α summing to one, y the centred rows) is represented by α. With G = Y Yᵀ,

    ‖y_i − z‖² = G_ii − 2 (G α)_i + αᵀ G α,

so iterative rules (Weiszfeld, centered clipping) cost O(n²) per step instead of O(n d). Rounding
can make these slightly negative; they are clamped at zero.
"""

from __future__ import annotations

import numpy as np


def pairwise_sq_dists(gram: np.ndarray) -> np.ndarray:
    """(n, n) matrix of ‖y_i − y_j‖² = G_ii + G_jj − 2 G_ij."""
    diag = np.diag(gram)
    return np.maximum(diag[:, None] + diag[None, :] - 2.0 * gram, 0.0)


def sq_dists_to(gram: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """(m,) vector of ‖y_i − Σ_k α_k y_k‖² for every basis row i of the (m, m) Gram."""
    g_alpha = gram @ alpha
    return np.maximum(np.diag(gram) - 2.0 * g_alpha + alpha @ g_alpha, 0.0)
