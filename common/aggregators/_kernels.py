"""Numba kernels: the passes over the (n, d) data that every CPU aggregation reduces to.

* `band_mean` — per coordinate, the mean of order statistics a..b-1 of the (optionally mixed) rows,
  by a comparator network applied to blocks of B coordinates (see `_networks`);
* `centred_gram` — the Gram matrix of the rows centred on their mean, in float64;
* `combine` — one weighted sum of rows, the output of every Gram-based rule.

Both walk the coordinates in fixed chunks, one chunk per parallel task, and each chunk in blocks
small enough that the working buffer stays in L1. The chunking depends only on (n, d, dtype), never
on the thread count, so results are bitwise reproducible on any machine with the same build.
`band_mean` and `combine` are compiled with fastmath off: comparisons must treat inf exactly and
the sums must round exactly like the torch fallback. `centred_gram` allows reassociation so that
its dot products vectorise; it works in float64, where the reordering is harmless.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

#: Columns per parallel task; fixed so that results do not depend on the number of threads.
CHUNK = 16384
#: Bytes of the per-block working buffer: sized to stay in a 32–48 KiB L1 data cache.
_BUFFER_BYTES = 32 * 1024


def block_size(rows: int, itemsize: int) -> int:
    """Coordinates per block: a multiple of 16 (whole vectors) whose buffer fits `_BUFFER_BYTES`."""
    return int(min(1024, max(16, (_BUFFER_BYTES // (rows * itemsize)) // 16 * 16)))


@njit(parallel=True, cache=True, fastmath=False)
def band_mean(x, idx, wts, network, a, b, block, out):  # pragma: no cover - compiled
    """out[t] = mean of ranks a..b-1 of column t of the rows (mixed rows when idx is non-empty).

    Mixed row i is  sum_k wts[i, k] * x[idx[i, k]]  accumulated in float64 in order k = 0, 1, …
    then rounded to x's dtype. Each comparator (i, j) of `network` leaves min on wire i, max on j
    (a swap, so NaN moves but is never duplicated or lost).
    """
    n0, d = x.shape
    n = idx.shape[0] if idx.shape[0] > 0 else n0
    chunk = max(1, CHUNK // block) * block
    scale = 1.0 / (b - a)
    for c in prange((d + chunk - 1) // chunk):
        buf = np.empty((n, block), dtype=x.dtype)
        acc = np.empty(block, dtype=np.float64)
        stop = min(d, (c + 1) * chunk)
        for s in range(c * chunk, stop, block):
            w = min(block, stop - s)
            if idx.shape[0] > 0:
                for i in range(n):
                    acc[:w] = 0.0
                    for k in range(idx.shape[1]):
                        weight = wts[i, k]
                        src = x[idx[i, k], s : s + w]
                        for t in range(w):
                            acc[t] += weight * src[t]
                    for t in range(w):
                        buf[i, t] = acc[t]
            else:
                for i in range(n):
                    buf[i, :w] = x[i, s : s + w]
            for q in range(network.shape[0]):
                lo = buf[network[q, 0]]
                hi = buf[network[q, 1]]
                for t in range(w):
                    u = lo[t]
                    v = hi[t]
                    if v < u:
                        lo[t] = v
                        hi[t] = u
            for t in range(w):
                acc[t] = buf[a, t]
            for r in range(a + 1, b):
                for t in range(w):
                    acc[t] += buf[r, t]
            for t in range(w):
                out[s + t] = acc[t] * scale


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def centred_gram(x, extra, block):  # pragma: no cover - compiled
    """G = Y Yᵀ in float64, Y = [x; extra] minus the column mean of x's rows.

    Centring before the products keeps the Gram accurate relative to the spread of the rows, not
    their norm, so ‖x_i − x_j‖² survives the cancellation in G_ii + G_jj − 2 G_ij. Everything is
    float64: products of float32 values are then exact, which matters when one Byzantine row is
    10⁴× larger than the rest — it shifts the mean, and float32 products of the shifted honest
    rows would lose their mutual distances entirely. Dot products run in 2×2 register tiles, one
    load per FMA.
    """
    n, d = x.shape
    m = n + extra.shape[0]
    mp = m + (m & 1)
    chunk = max(1, CHUNK // block) * block
    nchunks = (d + chunk - 1) // chunk
    parts = np.zeros((nchunks, mp, mp))
    inv_n = 1.0 / n
    for c in prange(nchunks):
        y = np.zeros((mp, block))
        mu = np.empty(block)
        g = parts[c]
        stop = min(d, (c + 1) * chunk)
        for s in range(c * chunk, stop, block):
            w = min(block, stop - s)
            mu[:w] = 0.0
            for i in range(n):
                src = x[i, s : s + w]
                for t in range(w):
                    mu[t] += src[t]
            for t in range(w):
                mu[t] *= inv_n
            for i in range(n):
                src = x[i, s : s + w]
                dst = y[i]
                for t in range(w):
                    dst[t] = src[t] - mu[t]
            for i in range(extra.shape[0]):
                src = extra[i, s : s + w]
                dst = y[n + i]
                for t in range(w):
                    dst[t] = src[t] - mu[t]
            for i in range(0, mp, 2):
                y0 = y[i]
                y1 = y[i + 1]
                for j in range(i, mp, 2):
                    z0 = y[j]
                    z1 = y[j + 1]
                    a00 = 0.0
                    a01 = 0.0
                    a10 = 0.0
                    a11 = 0.0
                    for t in range(w):
                        p = y0[t]
                        q = y1[t]
                        u = z0[t]
                        v = z1[t]
                        a00 += p * u
                        a01 += p * v
                        a10 += q * u
                        a11 += q * v
                    g[i, j] += a00
                    g[i, j + 1] += a01
                    g[i + 1, j] += a10
                    g[i + 1, j + 1] += a11
    gram = np.zeros((m, m))
    for c in range(nchunks):
        gram += parts[c, :m, :m]
    for i in range(m):
        for j in range(i):
            gram[i, j] = gram[j, i]
    return gram


@njit(parallel=True, cache=True, fastmath=False)
def combine(x, weights, extra, extra_weights, out):  # pragma: no cover - compiled
    """out = Σ_k weights[k] x[k] + Σ_k extra_weights[k] extra[k], accumulated in float64.

    Rows with weight zero are skipped (Krum reads one row, not n). Terms are added in row order,
    which the torch fallback repeats exactly.
    """
    n, d = x.shape
    block = 1024
    chunk = max(1, CHUNK // block) * block
    for c in prange((d + chunk - 1) // chunk):
        acc = np.empty(block)
        stop = min(d, (c + 1) * chunk)
        for s in range(c * chunk, stop, block):
            w = min(block, stop - s)
            acc[:w] = 0.0
            for k in range(n + extra.shape[0]):
                weight = weights[k] if k < n else extra_weights[k - n]
                if weight != 0.0:
                    src = x[k, s : s + w] if k < n else extra[k - n, s : s + w]
                    for t in range(w):
                        acc[t] += weight * src[t]
            for t in range(w):
                out[s + t] = acc[t]
