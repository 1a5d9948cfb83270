"""Numba kernels: the passes over the (n, d) data that every CPU aggregation reduces to, and the
small O(n²) iterations of the distance rules.

* `band_mean` — per coordinate, the mean of order statistics a..b-1 of the (optionally mixed) rows,
  by a comparator network applied to blocks of B coordinates (see `_networks`), NaN ranking as +inf;
  or of the window of b − a consecutive ranks nearest the median (meamed);
* `centred_gram` — the Gram matrix of the rows centred on their mean or a given centre, in float64;
* `combine` — one weighted sum of rows, the output of every Gram-based rule;
* `sq_norms` — each row's squared norm about the origin, for the norm-based rules (cge, clip, arc).

Those walk the coordinates in fixed chunks, one chunk per parallel task, and each chunk in blocks
small enough that the working buffer stays in L1. The chunking depends only on (n, d, dtype), never
on the thread count, so results are bitwise reproducible on any machine with the same build.
`band_mean` and `combine` are compiled with fastmath off: comparisons must treat inf exactly and
the sums must round exactly like the torch fallback. `centred_gram` allows reassociation so that
its dot products vectorise; it works in float64, where the reordering is harmless.

`band_mean_serial` and `combine_serial` are the same two kernels compiled without `parallel`, for
inputs of one chunk (`_serial_twin`): bitwise their output, without a parallel region's cost.

* `weiszfeld`, `clip_steps`, `kth_sq_dists` — gm's and cclip's iterations and the honest-scale
  distances, on the n × n Gram: plain loops, because at this size numpy's per-call overhead, not
  arithmetic, is the cost (a Weiszfeld step is a few hundred flops and would be ten numpy calls).
"""

from __future__ import annotations

import types

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
def band_mean(x, idx, wts, network, a, b, slide, block, out):  # pragma: no cover - compiled
    """out[t] = mean of ranks a..b-1 of column t of the rows (mixed rows when idx is non-empty);
    with slide > 0, of ranks a+s..b+s-1 instead, s ∈ [0, slide] chosen per column so that the
    window holds the b − a values nearest the column's median m (meamed):

        s = Σ_{j<slide} [ (v_{b+j} − m) < (m − v_{a+j}) ],   m = (v_{⌊(n−1)/2⌋} + v_{⌊n/2⌋}) / 2,

    in float64 (v the sorted column). Sliding one rank up pays exactly when the value entering
    is nearer m than the one leaving; both sides are monotone in j, so counting the j where it
    pays gives the optimal window without a branch. A tie keeps the lower value.

    Mixed row i is  sum_k wts[i, k] * x[idx[i, k]]  accumulated in float64 in order k = 0, 1, …
    (skipping zero weights, which pad the lists: 0 · inf would be NaN), then rounded to x's dtype.

    NaN becomes +inf as a value enters the buffer (`v if v < inf else inf`, one vminps): a
    comparator cannot order NaN — it would stay on its wire and silently corrupt the ranks of the
    finite values around it — so NaN sorts as +inf. Each comparator (i, j) of `network` then
    swaps wires i and j when  hi < lo , leaving the smaller value on wire i. It writes into two
    scratch rows and copies them back: in place, the compiler must assume the two wires alias and
    emits scalar or masked stores (measured 4x slower on AMD EPYC); out of place it is one vminps
    and one vmaxps per 8 lanes. The result is the same swap either way.
    """
    n0, d = x.shape
    n = idx.shape[0] if idx.shape[0] > 0 else n0
    chunk = max(1, CHUNK // block) * block
    scale = 1.0 / (b - a)
    for c in prange((d + chunk - 1) // chunk):
        buf = np.empty((n, block), dtype=x.dtype)
        low = np.empty(block, dtype=x.dtype)
        high = np.empty(block, dtype=x.dtype)
        acc = np.empty(block, dtype=np.float64)
        med = np.empty(block, dtype=np.float64)
        shift = np.empty(block, dtype=np.int64)
        stop = min(d, (c + 1) * chunk)
        for s in range(c * chunk, stop, block):
            w = min(block, stop - s)
            if idx.shape[0] > 0:
                for i in range(n):
                    acc[:w] = 0.0
                    for k in range(idx.shape[1]):
                        weight = wts[i, k]
                        if weight != 0.0:  # padding: 0 · inf would be NaN
                            src = x[idx[i, k], s : s + w]
                            for t in range(w):
                                acc[t] += weight * src[t]
                    for t in range(w):
                        v = acc[t]
                        buf[i, t] = v if v < np.inf else np.inf
            else:
                for i in range(n):
                    src = x[i, s : s + w]
                    for t in range(w):
                        v = src[t]
                        buf[i, t] = v if v < np.inf else np.inf
            for q in range(network.shape[0]):
                lo = buf[network[q, 0]]
                hi = buf[network[q, 1]]
                for t in range(w):
                    u = lo[t]
                    v = hi[t]
                    swap = v < u
                    low[t] = v if swap else u
                    high[t] = u if swap else v
                for t in range(w):
                    lo[t] = low[t]
                    hi[t] = high[t]
            if slide > 0:
                _window_sum(buf, a, b, slide, w, med, shift, acc)
            else:
                for t in range(w):
                    acc[t] = buf[a, t]
                for r in range(a + 1, b):
                    for t in range(w):
                        acc[t] += buf[r, t]
            for t in range(w):
                out[s + t] = acc[t] * scale


@njit(cache=True, fastmath=False)
def _window_sum(buf, a, b, slide, w, med, shift, acc):  # pragma: no cover - compiled
    """acc[t] = Σ of the sorted wires a+s_t..b+s_t-1 (band_mean's sliding window), in float64,
    added in rank order over a..b+slide-1 (a rank outside the window adds 0.0). The slide may
    exceed the window's width (Bulyan: 2f past a window of n − 4f). The torch fallback
    (`ops._window_sum_torch`) adds in the same order."""
    n = buf.shape[0]
    lo_mid = buf[(n - 1) // 2]
    hi_mid = buf[n // 2]
    for t in range(w):
        med[t] = 0.5 * (np.float64(lo_mid[t]) + np.float64(hi_mid[t]))
        shift[t] = 0
        acc[t] = 0.0
    for j in range(slide):
        left = buf[a + j]
        right = buf[b + j]
        for t in range(w):
            if right[t] - med[t] < med[t] - left[t]:
                shift[t] += 1
    for r in range(a, b + slide):
        row = buf[r]
        for t in range(w):
            inside = a + shift[t] <= r and r < b + shift[t]
            acc[t] += row[t] if inside else 0.0


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def centred_gram(x, extra, centre, block):  # pragma: no cover - compiled
    """G = Y Yᵀ in float64, Y = [x; extra] minus `centre` (the column mean of x's rows when
    `centre` is empty).

    Centring before the products keeps the Gram accurate relative to the spread of the rows, not
    their norm, so ‖x_i − x_j‖² survives the cancellation in G_ii + G_jj − 2 G_ij. Everything is
    float64: products of float32 values are then exact, which matters when one Byzantine row is
    10⁴× larger than the rest — it shifts the mean, and float32 products of the shifted honest
    rows would lose their mutual distances entirely. A row 10³⁰× larger shifts the mean so far
    that even float64 loses them; the caller then passes a robust `centre` (`rows._Inputs`).
    A non-finite value makes its row's entries (and, through the mean, everyone's) non-finite;
    the caller detects that on the diagonal. Dot products run in 2×2 register tiles, one load per
    FMA.
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
            if centre.shape[0] > 0:
                for t in range(w):
                    mu[t] = centre[s + t]
            else:
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


def _serial_twin(kernel, name):
    """`kernel`'s Python function compiled without `parallel`: its prange runs as a plain loop.

    For inputs of one chunk, where there is nothing to share: entering a parallel region (and
    `ops._threads_for`'s switch to one thread around it) costs more than a 20 × 123 pass itself.
    Only for kernels compiled with fastmath off, whose chunks are independent: the twin then does
    the same operations in the same order, and its output is bitwise the kernel's (a test checks
    it). A kernel with reassociation (the Gram's) may vectorise differently when compiled serially,
    so it has no twin. Its own name keeps numba's on-disk cache apart from the kernel's.
    """
    source = kernel.py_func
    twin = types.FunctionType(source.__code__, source.__globals__, name, source.__defaults__)
    twin.__qualname__ = name
    twin.__doc__ = f"`{source.__name__}` without parallel threads (see `_serial_twin`)."
    return njit(cache=True, fastmath=False)(twin)


band_mean_serial = _serial_twin(band_mean, "band_mean_serial")
combine_serial = _serial_twin(combine, "combine_serial")


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def sq_norms(x):  # pragma: no cover - compiled
    """(n,) Σ_t x[i, t]² in float64, per fixed chunk of columns, the chunks then added in order
    (bitwise reproducible whatever the thread count). Reassociation lets the squares vectorise;
    in float64 the squares of float32 values are exact and the reordering is harmless. ±inf
    gives +inf and NaN gives NaN, which the callers read as "no finite norm"."""
    n, d = x.shape
    nchunks = (d + CHUNK - 1) // CHUNK
    parts = np.zeros((nchunks, n))
    for c in prange(nchunks):
        stop = min(d, (c + 1) * CHUNK)
        for i in range(n):
            acc = 0.0
            for t in range(c * CHUNK, stop):
                v = np.float64(x[i, t])
                acc += v * v
            parts[c, i] = acc
    out = np.zeros(n)
    for c in range(nchunks):
        out += parts[c]
    return out


@njit(cache=True, fastmath=False)
def _gram_product(gram, coef, out):  # pragma: no cover - compiled
    """out = G·c and returns cᵀG·c: what ‖y_i − Σ_k c_k y_k‖² = G_ii − 2 (Gc)_i + cᵀGc needs,
    for the coefficient-space iterations below. Same loop order as before it was shared, so the
    results are bitwise those of the inlined loops."""
    quad = 0.0
    for i in range(coef.shape[0]):
        acc = 0.0
        for j in range(coef.shape[0]):
            acc += gram[i, j] * coef[j]
        out[i] = acc
        quad += coef[i] * acc
    return quad


@njit(cache=True, fastmath=False)
def weiszfeld(gram, base, beta, usable, nu, threshold, cap):  # pragma: no cover - compiled
    """Smoothed Weiszfeld steps in coefficient space; returns (β, steps taken, ‖∇F_ν(z)‖).

    z = y_b + Σ_k β_k (y_k − y_b), b = `base`: the steps work on the Gram of y_k − y_b,
    G'_ij = G_ij − G_ib − G_jb + G_bb (`gram.weiszfeld` says why). Rows with usable[i] False get
    weight 0. A step is

        w_i = 1 / max(ν, ‖y_i − z‖),   z⁺ = Σ_i w_i y_i / Σ_i w_i,

    and since ∇F_ν(z) = Σ_i w_i (z − y_i) = W (z − z⁺) (W = Σ_i w_i), the gradient norm of the
    smoothed objective comes for free: W ‖z − z⁺‖, from the Gram. Stops at the first z whose
    gradient norm is at most `threshold`, or after `cap` steps, and returns that z (the one the
    gradient was measured at). O(n²) per step, plain loops: bitwise reproducible, and for the
    tens of steps a tolerance takes ~100x cheaper than numpy's per-call overhead.
    """
    n = beta.shape[0]
    local = np.empty((n, n))
    for i in range(n):
        for j in range(n):
            local[i, j] = gram[i, j] - gram[i, base] - gram[j, base] + gram[base, base]
    g_beta = np.empty(n)
    weights = np.empty(n)
    delta = np.empty(n)
    grad = np.inf
    for step in range(cap + 1):
        quad = _gram_product(local, beta, g_beta)
        total = 0.0
        for i in range(n):
            weights[i] = 0.0
            if usable[i]:
                dist = np.sqrt(max(local[i, i] - 2.0 * g_beta[i] + quad, 0.0))
                weights[i] = 1.0 / max(nu, dist)
                total += weights[i]
        for i in range(n):
            weights[i] /= total
            delta[i] = beta[i] - weights[i]
        moved = 0.0
        for i in range(n):
            acc = 0.0
            for j in range(n):
                acc += local[i, j] * delta[j]
            moved += delta[i] * acc
        grad = total * np.sqrt(max(moved, 0.0))
        if grad <= threshold or step == cap:
            return beta, step, grad
        beta = weights.copy()
    return beta, cap, grad


@njit(cache=True, fastmath=False)
def kth_sq_dists(gram, far, k):  # pragma: no cover - compiled
    """(n,) squared distance of each row to its k-th nearest other row (k ≥ 1), from the Gram;
    +inf to and from `far` rows.

    Compiled because numpy's dozen calls on an n × n matrix cost more than the Gram itself on
    small inputs.
    """
    n = gram.shape[0]
    kth = np.full(n, np.inf)
    if n < 2:
        return kth
    others = np.empty(n - 1)
    for i in range(n):
        if far[i]:
            continue
        m = 0
        for j in range(n):
            if j != i:
                sq = gram[i, i] + gram[j, j] - 2.0 * gram[i, j]
                others[m] = np.inf if far[j] else max(sq, 0.0)
                m += 1
        others.sort()
        kth[i] = others[min(k, n - 1) - 1]
    return kth


@njit(cache=True, fastmath=False)
def clip_steps(gram, usable, tau, steps, rank):  # pragma: no cover - compiled
    """Centered clipping in coefficient space: the basis is the n rows, then the old centre (last
    row of `gram`); returns the coefficients c of v^L, starting from c = e_n (v⁰, the centre):

        vˡ⁺¹ = vˡ + (1/n) Σ_{i usable} min(1, τ_l/‖y_i − vˡ‖) (y_i − vˡ),

    with τ_l = `tau` when it is positive, else (adaptive) the `rank`-th smallest distance from
    vˡ to the rows (unusable rows counting as infinitely far). Compiled for the same reason as
    `weiszfeld`: a handful of O(n²) steps, each a dozen numpy calls otherwise.
    """
    m = gram.shape[0]
    n = m - 1
    c = np.zeros(m)
    c[n] = 1.0
    g_c = np.empty(m)
    clip = np.empty(n)
    dist = np.empty(n)
    for _ in range(steps):
        quad = _gram_product(gram, c, g_c)
        for i in range(n):
            dist[i] = np.inf
            if usable[i]:
                dist[i] = np.sqrt(max(gram[i, i] - 2.0 * g_c[i] + quad, 0.0))
        radius = tau
        if radius <= 0.0:
            radius = np.sort(dist)[rank - 1]
        total = 0.0
        for i in range(n):
            clip[i] = 0.0
            if usable[i]:
                if dist[i] <= radius:
                    clip[i] = 1.0  # min(1, τ/‖y_i − vˡ‖) = 1 inside the radius (0 included)
                else:
                    clip[i] = radius / dist[i]
                total += clip[i]
        keep = 1.0 - total / n
        for i in range(m):
            c[i] *= keep
        for i in range(n):
            c[i] += clip[i] / n
    return c
