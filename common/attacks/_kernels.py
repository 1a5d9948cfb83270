"""Numba kernel for the colluding attacks' coordinate-wise spread of the honest rows.

`torch.std` over the middle axis of a small float32 stack is slow on CPU: 25 µs for a9a's
(12, 123) honest rows and 370 µs for sixteen runs' (16, 12, 123) stack, a tenth of a batched
simulation's round (ALIE reads it every round). This kernel computes what torch computes there,
the sample deviation accumulated in float64 and rounded once to float32, in two passes (mean,
then squared deviations), in 3 and 12 µs.
"""

from __future__ import annotations

import numpy as np
from numba import njit


@njit(cache=True, fastmath=False)
def sample_std(stack):  # pragma: no cover - compiled
    """(R, h, d) float32 → (R, d) float32: each run's sample standard deviation over its h
    rows (h ≥ 2), summed in row order in float64. A non-finite entry makes its column NaN, as
    torch's does."""
    runs, h, d = stack.shape
    out = np.empty((runs, d), np.float32)
    mean = np.empty(d, np.float64)
    squares = np.empty(d, np.float64)
    for r in range(runs):
        mean[:] = 0.0
        squares[:] = 0.0
        for i in range(h):
            for j in range(d):
                mean[j] += np.float64(stack[r, i, j])
        for j in range(d):
            mean[j] /= h
        for i in range(h):
            for j in range(d):
                deviation = np.float64(stack[r, i, j]) - mean[j]
                squares[j] += deviation * deviation
        for j in range(d):
            out[r, j] = np.float32(np.sqrt(squares[j] / (h - 1)))
    return out
