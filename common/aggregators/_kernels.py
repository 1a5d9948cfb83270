"""Numba kernels: the passes over the (n, d) data that every CPU aggregation reduces to, and the
small O(n²) iterations of the distance rules.

* `band_mean` — per coordinate, the mean of order statistics a..b-1 of the (optionally mixed) rows,
  by a comparator network applied to blocks of B coordinates (see `_networks`), NaN ranking as +inf;
  or of the window of b − a consecutive ranks nearest the median (meamed); `band_mean_complement`
  the same with nnm's rows mixed as w · (Σ all − Σ excluded) where `exact_sums` proves it exact;
* `centred_gram` — the Gram matrix of the rows centred on their mean or a given centre, in float64;
* `combine` — one weighted sum of rows, the output of every Gram-based rule;
* `sq_norms` — each row's squared norm about the origin, for the norm-based rules (cge, clip, arc).

Those walk the coordinates in fixed chunks, one chunk per parallel task, and each chunk in blocks
small enough that the working buffer stays in L1. The chunking depends only on (n, d, dtype), never
on the thread count, so results are bitwise reproducible on any machine with the same build.
`band_mean` and `combine` are compiled with fastmath off: comparisons must treat inf exactly and
the sums must round exactly like the torch fallback. `centred_gram` allows reassociation so that
its dot products vectorise; it works in float64, where the reordering is harmless.

`band_mean_serial` and `combine_serial` (and the complement kernels' twins) are the same kernels
compiled without `parallel`, for inputs of one chunk (`_serial_twin`): bitwise their output,
without a parallel region's cost. Inside a `parallel=True` kernel, work outside the prange is
written as plain loops in serial helpers (`_sum_parts`): numba turns every array expression there
into a parallel region of its own, and on a loaded machine each region's barrier waits for a
thread the scheduler has parked.

* `weiszfeld`, `clip_steps`, `kth_sq_dists` — gm's and cclip's iterations and the honest-scale
  distances, on the n × n Gram: plain loops, because at this size numpy's per-call overhead, not
  arithmetic, is the cost (a Weiszfeld step is a few hundred flops and would be ten numpy calls).
"""

from __future__ import annotations

import types

import numpy as np
from numba import njit, prange

from byzps.common._prefetch import prefetch_ahead

#: Columns per parallel task; fixed so that results do not depend on the number of threads.
CHUNK = 16384
#: Bytes of the per-block working buffer: sized to stay in a 32–48 KiB L1 data cache.
_BUFFER_BYTES = 32 * 1024
#: Columns per block of `combine`: its float64 sums fill the buffer (a divisor of CHUNK).
COMBINE_BLOCK = _BUFFER_BYTES // 8
#: Lanes of a 512-bit vector of float32: the width short rows are padded to.
LANES = 16


def _l1_block(rows: int, itemsize: int) -> int:
    """Coordinates per block: a multiple of 16 (whole vectors) whose buffer fits `_BUFFER_BYTES`."""
    return int(min(1024, max(16, (_BUFFER_BYTES // (rows * itemsize)) // 16 * 16)))


#: Fewest columns per block of the band kernels while the buffer stays within 8 × L1 (L2).
_BAND_MIN_BLOCK = 256


def block_size(rows: int, itemsize: int) -> int:
    """Columns per block of `band_mean`: `_l1_block`, but at least `_BAND_MIN_BLOCK` while the
    buffer stays within L2. Each comparator is one loop over the block's columns, so short
    blocks pay the loop's set-up and remainder on every comparator: at n = 100 (80 columns fit
    L1) 256 columns were 1.25x faster, at n = 20 (400 fit) longer blocks gained nothing."""
    l2 = (8 * _BUFFER_BYTES // (rows * itemsize)) // 16 * 16
    return max(_l1_block(rows, itemsize), min(_BAND_MIN_BLOCK, l2))


def gram_block(rows: int) -> int:
    """Columns per block of `centred_gram`: `_l1_block`'s L1-sized block, but at least 128 while
    the rows' float64 buffer stays within 128 KiB (L2): longer dot products amortise each tile's
    reductions (measured at n = 100: 128 columns 35 % faster than 32)."""
    l2 = max(16, (4 * _BUFFER_BYTES // (rows * 8)) // 16 * 16)
    return max(_l1_block(rows, 8), min(128, l2))


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
    swaps wires i and j when  hi < lo , leaving the smaller value on wire i (`_band_of_block`:
    the maxima in place, the minima into a scratch row that becomes wire i's, which keeps LLVM
    from a masked store that is microcoded on AMD Zen).
    """
    no_exc = np.empty((0, 0), dtype=np.int64)
    no_rw = np.empty(0, dtype=np.float64)
    chunk = max(1, CHUNK // block) * block
    for c in prange((x.shape[1] + chunk - 1) // chunk):
        _band_chunk(x, idx, wts, no_exc, no_rw, network, a, b, slide, block, chunk, c, out)


@njit(cache=True, fastmath=False)
def _band_chunk(
    x, idx, wts, exc, rw, network, a, b, slide, block, chunk, c, out
):  # pragma: no cover
    """`band_mean`'s (exc empty) or `band_mean_complement`'s work on chunk c of the columns."""
    n = idx.shape[0] if idx.shape[0] > 0 else x.shape[0]
    scale = 1.0 / (b - a)
    buf = np.empty((n + 1, block), dtype=x.dtype)
    wire = np.empty(n + 1, dtype=np.int64)
    acc = np.empty(block, dtype=np.float64)
    med = np.empty(block, dtype=np.float64)
    shift = np.empty(block, dtype=np.int64)
    total = np.empty(block, dtype=np.float64)
    big = np.empty(2 * block, dtype=np.float64)
    small = np.empty(2 * block, dtype=np.float64)
    exact = np.empty(block, dtype=np.bool_)
    stop = min(x.shape[1], (c + 1) * chunk)
    for s in range(c * chunk, stop, block):
        w = min(block, stop - s)
        if exc.shape[0] > 0:
            every = exact_sums(x, s, w, total, big, small, exact)
            for i in range(n):
                _complement_row(x, exc, i, s, w, total, acc)
                weight = rw[i]
                for t in range(w):
                    buf[i, t] = acc[t] * weight
            if not every:
                _mix_inexact(x, idx, wts, s, w, exact, acc, buf)
        elif idx.shape[0] > 0 and idx.shape[1] == 1:
            # One member a row (arc's clipping scales): `_mixed_row`'s 0.0 + w · x in one pass,
            # without the float64 row it writes and reads back (the same bits: 0.0 + keeps
            # −0.0 → +0.0 as the sum does).
            for i in range(n):
                weight = wts[i, 0]
                src = x[idx[i, 0], s : s + w]
                row = buf[i]
                if weight == 0.0:
                    row[:w] = 0.0
                    continue
                for t in range(w):
                    v = 0.0 + weight * src[t]
                    row[t] = v if v < np.inf else np.inf
        elif idx.shape[0] > 0:
            for i in range(n):
                _mixed_row(x, idx, wts, i, s, w, acc)
                for t in range(w):
                    v = acc[t]
                    buf[i, t] = v if v < np.inf else np.inf
        else:
            for i in range(n):
                src = x[i, s : s + w]
                for t in range(w):
                    v = src[t]
                    buf[i, t] = v if v < np.inf else np.inf
        _band_of_block(buf, wire, network, a, b, slide, w, med, shift, acc)
        for t in range(w):
            out[s + t] = acc[t] * scale


@njit(parallel=True, cache=True, fastmath=False)
def band_mean_columns(x, columns, network, a, b, slide, block, out):  # pragma: no cover
    """out[u] = `band_mean` of the raw rows of x (no mix) at column columns[u]: the same
    comparators and the same float64 band sum on the same values, read in place from the
    columns (a server's incremental round, which recomputes only the columns its messages
    touched). Gathering them first cost a copy of |U| · n values, ~2x the band itself; read
    in place, 18 % of the columns of (20, 1e7) take about a quarter of the full pass.
    Each row's reads ask for the column `AHEAD` further on first (`common/_prefetch.py`): U's
    columns lie too irregularly apart for the hardware to fetch them in time, and the loop
    waited on each miss (55-65 -> 27-34 ms at (20, 1e7), |U| = 16.5 %). The same reads in the
    same order, so the same bits."""
    n, m = x.shape[0], columns.shape[0]
    chunk = max(1, CHUNK // block) * block
    scale = 1.0 / (b - a)
    for c in prange((m + chunk - 1) // chunk):
        buf = np.empty((n + 1, block), dtype=x.dtype)
        wire = np.empty(n + 1, dtype=np.int64)
        acc = np.empty(block, dtype=np.float64)
        med = np.empty(block, dtype=np.float64)
        shift = np.empty(block, dtype=np.int64)
        stop = min(m, (c + 1) * chunk)
        for s in range(c * chunk, stop, block):
            w = min(block, stop - s)
            for i in range(n):
                row = x[i]
                for t in range(w):
                    prefetch_ahead(row, columns, s + t)
                    v = row[columns[s + t]]
                    buf[i, t] = v if v < np.inf else np.inf
            _band_of_block(buf, wire, network, a, b, slide, w, med, shift, acc)
            for t in range(w):
                out[s + t] = acc[t] * scale


@njit(cache=True, inline="always")
def _at(start, t):  # pragma: no cover - compiled
    """The index start + t (start: np.uint64, t ≥ 0) as an unsigned integer, for the helpers a
    kernel calls once per row or per member. Each of them used to take a view of its row,
    x[k, s:s+w], and a view made there costs numba an atomic incref/decref pair on the array's
    memory (`NRT_incref`, a `lock` instruction): at a9a's (20, 123) those pairs were ~40 % of
    the band kernel (perf). Indexed instead as x[k, s + t], a signed index would keep numba's
    wraparound check (negative indices count from the end), which stops LLVM vectorising the
    loop (4-5x slower, `sq_norms`); an unsigned one has none. The same elements are read in the
    same order, so the same bits."""
    return start + np.uint64(t)


@njit(cache=True, fastmath=False)
def _complement_row(x, exc, i, s, w, total, acc):  # pragma: no cover - compiled
    """acc[:w] = total[:w] − Σ_e x[exc[i, e], s:s+w] in float64 (exc padded with −1).
    x's columns are read at unsigned offsets, without views (`_at`)."""
    for t in range(w):
        acc[t] = total[t]
    start = np.uint64(s)
    for e in range(exc.shape[1]):
        k = exc[i, e]
        if k >= 0:
            for t in range(w):
                acc[t] -= x[k, _at(start, t)]


@njit(cache=True, fastmath=False)
def _mixed_row(x, idx, wts, i, s, w, acc):  # pragma: no cover - compiled
    """acc[:w] = Σ_k wts[i, k] · x[idx[i, k], s:s+w], in float64, in order k = 0, 1, …, zero
    weights skipped (padding: 0 · inf would be NaN). No views (`_at`)."""
    acc[:w] = 0.0
    start = np.uint64(s)
    for k in range(idx.shape[1]):
        weight = wts[i, k]
        if weight != 0.0:
            member = idx[i, k]
            for t in range(w):
                acc[t] += weight * x[member, _at(start, t)]


@njit(cache=True, fastmath=False)
def _band_of_block(buf, wire, network, a, b, slide, w, med, shift, acc):  # pragma: no cover
    """Sort the wires of `buf` (n + 1, ≥ w; row n is scratch) by `network` (comparator (i, j)
    leaves the smaller value on wire i), then acc[:w] = the sum of the band a..b-1 (with
    slide > 0, of the window `_window_sum` picks), in float64, in rank order.

    Wire k lives in row wire[k] (wire: n + 1 int64, reset here). Each comparator writes its
    minima to the scratch row and makes that row wire i's, the old row of wire i the scratch.
    Written in place, `buf[i] = v if swap else u` stores what wire i already holds wherever
    swap is false, and LLVM turns it into a masked store (`vmaskmovps`), microcoded on AMD Zen:
    0.53 ns per comparator and column at n = 20 on an EPYC (Zen 3), scalar speed; this way,
    0.14 ns. The maxima are stored in place (LLVM emits `vmaxps` and a plain store for them)."""
    n = buf.shape[0] - 1
    for k in range(n + 1):
        wire[k] = k
    for q in range(network.shape[0]):
        i = network[q, 0]
        lo_row = wire[i]
        scratch = wire[n]
        lower = buf[lo_row]
        upper = buf[wire[network[q, 1]]]
        minima = buf[scratch]
        for t in range(w):
            u = lower[t]
            v = upper[t]
            swap = v < u
            minima[t] = v if swap else u
            upper[t] = u if swap else v
        wire[i] = scratch
        wire[n] = lo_row
    if slide > 0:
        _window_sum(buf, wire, a, b, slide, w, med, shift, acc)
    else:
        first = buf[wire[a]]
        for t in range(w):
            acc[t] = first[t]
        for r in range(a + 1, b):
            row = buf[wire[r]]
            for t in range(w):
                acc[t] += row[t]


@njit(cache=True, fastmath=False)
def _mix_inexact(x, idx, wts, s, w, exact, acc, buf):  # pragma: no cover - compiled
    """buf[i, t] = `_mixed_row`'s value (NaN as +inf) in the columns t < w not `exact`: column
    by column when few are (a Byzantine row that is large in some coordinates), else whole rows
    at once, keeping the exact columns' values. The same operations in the same order either
    way, so the same bits."""
    bad = 0
    for t in range(w):
        bad += 0 if exact[t] else 1
    if 8 * bad <= w:
        for t in range(w):
            if not exact[t]:
                for i in range(idx.shape[0]):
                    v = 0.0
                    for k in range(idx.shape[1]):
                        weight = wts[i, k]
                        if weight != 0.0:
                            v += weight * x[idx[i, k], s + t]
                    buf[i, t] = v if v < np.inf else np.inf
        return
    for i in range(idx.shape[0]):
        _mixed_row(x, idx, wts, i, s, w, acc)
        for t in range(w):
            if not exact[t]:
                v = acc[t]
                buf[i, t] = v if v < np.inf else np.inf


#: Exact subset sums: float32 values x_1..x_n0 whose nonzero magnitudes satisfy
#: n0 · max|x_k| ≤ EXACT_SPAN · min|x_k| have every subset sum exact in float64 (`exact_sums`).
EXACT_SPAN = 2.0**29


@njit(cache=True, fastmath=False)
def exact_sums(x, s, w, total, big, small, exact):  # pragma: no cover - compiled
    """For the columns s..s+w-1 of float32 x (n0, d): total[t] = Σ_k x[k, s+t] in float64 and
    exact[t] = whether *every* subset sum of that column is exact in float64; returns whether
    all w columns are.

    Why: every nonzero float32 v with |v| ≥ m is a multiple of q = ulp(m) > m · 2⁻²⁴ (an ulp is
    a power of two that only grows with |v|; subnormals are multiples of 2⁻¹⁴⁹ = q), so a sum of
    any subset is a multiple of q of magnitude ≤ n0 · max|v|, exact in float64 (53 bits) when
    n0 · max|v| < 2⁵³ q — which n0 · max|v| ≤ 2²⁹ m guarantees. Then Σ all − Σ some (each
    partial result a subset sum) is exact too, in any order. ±inf or NaN make `total`
    non-finite, hence not exact; zeros constrain nothing. Honest rows of comparable size pass
    unless a column holds a value ~10⁻⁷ times its largest; a Byzantine 3e38 next to honest
    values of 1 fails, as does any column with a non-finite value.

    `big` and `small` hold at least 2 · w entries each: the running max and min alternate
    between their two halves row by row. Updated in place (`big[t] = m if m > big[t] else
    big[t]`), LLVM stores only where the value changes, as a masked store (`vmaskmovpd`) that
    is microcoded on AMD Zen; alternating halves made this pass 1.9x faster there (31 → 17 ms
    at (20, 1e6), one thread).
    """
    n0 = x.shape[0]
    half = big.shape[0] // 2
    if half < w or small.shape[0] // 2 < w:
        raise ValueError("exact_sums needs big and small of at least 2 * w entries")
    for t in range(w):
        total[t] = 0.0
        big[t] = 0.0
        small[t] = np.inf
    start = np.uint64(s)
    for k in range(n0):
        read = np.uint64((k % 2) * half)
        write = np.uint64(half) - read
        for t in range(w):
            v = np.float64(x[k, _at(start, t)])
            total[t] += v
            m = abs(v)
            b = big[_at(read, t)]
            big[_at(write, t)] = m if m > b else b
            nonzero = m if m > 0.0 else np.inf
            least = small[_at(read, t)]
            small[_at(write, t)] = nonzero if nonzero < least else least
    last = (n0 % 2) * half
    every = True
    for t in range(w):
        ok = total[t] - total[t] == 0.0 and big[last + t] * n0 <= EXACT_SPAN * small[last + t]
        exact[t] = ok
        every = every and ok
    return every


@njit(parallel=True, cache=True, fastmath=False)
def band_mean_complement(  # pragma: no cover - compiled
    x, idx, wts, exc, rw, network, a, b, slide, block, out
):
    """`band_mean` of the mixed rows  r_i = rw[i] · Σ_{k ∉ exc[i]} x_k  (float32 x; each row of
    the mix puts one weight rw[i] on all its members, as nnm's 1/(n − f) does), mixing by
    complement: per block, the column sums over all n0 inputs once, then each row's sum as that
    total minus its few excluded inputs (exc: ascending, padded with −1) — O(n0 + Σ_i |exc_i|)
    per coordinate instead of O(Σ_i |members_i|).

    Only where the subtraction is exact: per column, `exact_sums` proves every subset sum exact
    in float64, so total − Σ excluded is exactly Σ members, and r_i = fl(rw[i] · Σ members) —
    one rounding, at least as accurate as the member-by-member sum Σ fl(w · x_k) (`band_mean`).
    In any other column (a value ±inf or NaN, or a magnitude spread such as 3e38 next to 1,
    where Σ all − Σ excluded would cancel the members away) the row is mixed as `band_mean`
    mixes it, from `idx`/`wts` (the same mix as lists of members), bit for bit. Either way a
    column's output depends on that column alone, and `ops._band_mean_torch` computes the same
    values. The verdict (`verdict.Banded`) is the same band over the same mix; its discount
    still mixes member by member, so where the two roundings differ (float32's last place) only
    the attribution of rows that tie to within it can differ — a convention there anyway.
    """
    chunk = max(1, CHUNK // block) * block
    for c in prange((x.shape[1] + chunk - 1) // chunk):
        _band_chunk(x, idx, wts, exc, rw, network, a, b, slide, block, chunk, c, out)


@njit(parallel=True, cache=True, fastmath=False)
def band_mean_runs(  # pragma: no cover - compiled
    x, idx, wts, exc, rw, by_complement, network, a, b, slide, block, out
):
    """`band_mean` (or, where by_complement[r], `band_mean_complement`) of each of R runs at
    once: out[r] from x[r] (n0, d) mixed by run r's lists idx[r], wts[r] (exc[r], rw[r]), one
    parallel task per run and chunk. The lists are padded to the longest run's (zero weights,
    −1 exclusions), which the mixing skips, so each run's output is bitwise what the two
    kernels give it alone: the same `_band_chunk` on the same values (`aggregators.runs`)."""
    no_exc = np.empty((0, 0), dtype=np.int64)
    no_rw = np.empty(0, dtype=np.float64)
    chunk = max(1, CHUNK // block) * block
    chunks = (x.shape[2] + chunk - 1) // chunk
    for task in prange(x.shape[0] * chunks):
        r = task // chunks
        c = task - r * chunks
        own_exc, own_rw = (exc[r], rw[r]) if by_complement[r] else (no_exc, no_rw)
        _band_chunk(
            x[r], idx[r], wts[r], own_exc, own_rw, network, a, b, slide, block, chunk, c, out[r]
        )


@njit(parallel=True, cache=True, fastmath=False)
def mix_rows_complement(x, idx, wts, exc, rw, out):  # pragma: no cover - compiled
    """out[i] = the mixed row i of `band_mean_complement` (same exactness rule, same values),
    NaN left as it is: in exact columns rw[i] · (total − Σ excluded), elsewhere Σ_k wts[i, k] ·
    x[idx[i, k]] member by member — `combine`'s sum for that row, bit for bit."""
    d = x.shape[1]
    n = idx.shape[0]
    block = 1024
    chunk = max(1, CHUNK // block) * block
    for c in prange((d + chunk - 1) // chunk):
        acc = np.empty(block, dtype=np.float64)
        total = np.empty(block, dtype=np.float64)
        big = np.empty(2 * block, dtype=np.float64)
        small = np.empty(2 * block, dtype=np.float64)
        exact = np.empty(block, dtype=np.bool_)
        stop = min(d, (c + 1) * chunk)
        for s in range(c * chunk, stop, block):
            w = min(block, stop - s)
            every = exact_sums(x, s, w, total, big, small, exact)
            for i in range(n):
                _complement_row(x, exc, i, s, w, total, acc)
                weight = rw[i]
                dst = out[i, s : s + w]
                for t in range(w):
                    dst[t] = acc[t] * weight
                if not every:
                    _mixed_row(x, idx, wts, i, s, w, acc)
                    for t in range(w):
                        if not exact[t]:
                            dst[t] = acc[t]


@njit(cache=True, fastmath=False)
def _window_sum(buf, wire, a, b, slide, w, med, shift, acc):  # pragma: no cover - compiled
    """acc[t] = Σ of the sorted wires a+s_t..b+s_t-1 (band_mean's sliding window; wire k in row
    wire[k] of buf, whose last row is scratch), in float64, added in rank order over
    a..b+slide-1 (a rank outside the window adds 0.0). The slide may exceed the window's width
    (Bulyan: 2f past a window of n − 4f). The torch fallback (`ops._window_sum_torch`) adds in
    the same order."""
    n = buf.shape[0] - 1
    lo_mid = buf[wire[(n - 1) // 2]]
    hi_mid = buf[wire[n // 2]]
    for t in range(w):
        med[t] = 0.5 * (np.float64(lo_mid[t]) + np.float64(hi_mid[t]))
        shift[t] = 0
        acc[t] = 0.0
    for j in range(slide):
        left = buf[wire[a + j]]
        right = buf[wire[b + j]]
        for t in range(w):  # an unconditional store: `if …: shift[t] += 1` became a masked one
            shift[t] += 1 if right[t] - med[t] < med[t] - left[t] else 0
    for r in range(a, b + slide):
        row = buf[wire[r]]
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
    the caller detects that on the diagonal. Dot products run in 4×2 register tiles (8
    accumulators, 6 loads per 8 FMAs; 2×2 tiles, one load per FMA, were 25 % slower), over
    blocks of `gram_block` columns; a tile's entries j < i are computed and never read.
    """
    n, d = x.shape
    m = n + extra.shape[0]
    mp = (m + 3) // 4 * 4  # rows padded with zeros to whole 4 × 2 tiles
    chunk = max(1, CHUNK // block) * block
    nchunks = (d + chunk - 1) // chunk
    parts = np.empty((nchunks, mp, mp))
    inv_n = 1.0 / n
    for c in prange(nchunks):
        y = np.zeros((mp, block))
        mu = np.empty(block)
        g = parts[c]
        for i in range(mp):
            for j in range(mp):
                g[i, j] = 0.0
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
            for i in range(0, mp, 4):
                y0 = y[i]
                y1 = y[i + 1]
                y2 = y[i + 2]
                y3 = y[i + 3]
                for j in range(i, mp, 2):
                    z0 = y[j]
                    z1 = y[j + 1]
                    a00 = 0.0
                    a01 = 0.0
                    a10 = 0.0
                    a11 = 0.0
                    a20 = 0.0
                    a21 = 0.0
                    a30 = 0.0
                    a31 = 0.0
                    for t in range(w):
                        u = z0[t]
                        v = z1[t]
                        p = y0[t]
                        q = y1[t]
                        r = y2[t]
                        o = y3[t]
                        a00 += p * u
                        a01 += p * v
                        a10 += q * u
                        a11 += q * v
                        a20 += r * u
                        a21 += r * v
                        a30 += o * u
                        a31 += o * v
                    g[i, j] += a00
                    g[i, j + 1] += a01
                    g[i + 1, j] += a10
                    g[i + 1, j + 1] += a11
                    g[i + 2, j] += a20
                    g[i + 2, j + 1] += a21
                    g[i + 3, j] += a30
                    g[i + 3, j + 1] += a31
    return _sum_parts(parts, m)


@njit(cache=True)
def centred_grams_runs(x, block):  # pragma: no cover - compiled
    """(R, n, n): `centred_gram` of each run's rows x[r] (x (R, n, d)) about their own mean, in
    one call for a batched simulation's R runs: the compiled kernel itself called per run (so
    each Gram is bitwise its own call's), without 16 Python dispatches (~140 µs a round at
    a9a's size). Compiling its body into a kernel of its own would vectorise the reassociated
    dot products differently and move the Grams' last bits."""
    runs, n = x.shape[0], x.shape[1]
    grams = np.empty((runs, n, n))
    for r in range(runs):
        rows = x[r]
        grams[r] = centred_gram(rows, rows[:0], rows[0, :0], block)
    return grams


@njit(cache=True, fastmath=False)
def _sum_parts(parts, m):  # pragma: no cover - compiled
    """The upper triangles of the per-chunk Grams parts[c, :m, :m] added in chunk order, mirrored.

    A serial function of its own, in plain loops: in a `parallel=True` kernel every array
    expression (`np.zeros`, `gram += parts[c]`) becomes a parallel region of its own, and one per
    chunk made the Gram 15-20x slower with 2 threads on a loaded machine (each region's barrier
    waits for a thread the scheduler has parked)."""
    gram = np.empty((m, m))
    for i in range(m):
        for j in range(i, m):
            acc = 0.0
            for c in range(parts.shape[0]):
                acc += parts[c, i, j]
            gram[i, j] = acc
            gram[j, i] = acc
    return gram


@njit(parallel=True, cache=True, fastmath=False)
def combine(x, weights, extra, extra_weights, out):  # pragma: no cover - compiled
    """out = Σ_k weights[k] x[k] + Σ_k extra_weights[k] extra[k], accumulated in float64.

    Rows with weight zero are skipped (Krum reads one row, not n). Terms are added in row order,
    which the torch fallback repeats exactly.

    Blocks of `COMBINE_BLOCK` columns: the float64 sums fill `_BUFFER_BYTES`, and each row is
    read in runs of 16 KB. With 1,024 columns (4 KB runs from each of 20 rows in turn) the pass
    over (20, 1e7) float32 took 47 ms on two threads of an AMD EPYC (Zen 5), against 36 ms with
    4,096; the block changes no sum's terms or order, so not the bits.
    """
    n, d = x.shape
    block = COMBINE_BLOCK
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


@njit(parallel=True, cache=True, fastmath=False)
def combine_columns(x, columns, weights, out):  # pragma: no cover - compiled
    """out[u] = Σ_k weights[k] x[k, columns[u]], accumulated in float64 in row order: `combine`
    restricted to some columns, bitwise its entries there (the same terms in the same order),
    read in place (a server's incremental round of the mean), one parallel task per chunk of
    `columns`."""
    m = columns.shape[0]
    chunk = max(1, CHUNK // COMBINE_BLOCK) * COMBINE_BLOCK
    for c in prange((m + chunk - 1) // chunk):
        acc = np.empty(COMBINE_BLOCK)
        for s in range(c * chunk, min(m, (c + 1) * chunk), COMBINE_BLOCK):
            _weighted_columns(x, columns, weights, s, min(COMBINE_BLOCK, m - s), acc)
            for t in range(min(COMBINE_BLOCK, m - s)):
                out[s + t] = acc[t]


@njit(cache=True, fastmath=False)
def _weighted_columns(x, columns, weights, s, w, acc):  # pragma: no cover - compiled
    """acc[:w] = Σ_k weights[k] x[k, columns[s + t]] in float64, rows in order, zero weights
    skipped; each row's reads ask for the column `AHEAD` further on first
    (`common/_prefetch.py`), as `band_mean_columns` does."""
    acc[:w] = 0.0
    for k in range(x.shape[0]):
        weight = weights[k]
        if weight != 0.0:
            row = x[k]
            for t in range(w):
                prefetch_ahead(row, columns, s + t)
                acc[t] += weight * row[columns[s + t]]


def _serial_twin(kernel, name):
    """`kernel`'s Python function compiled without `parallel`: its prange runs as a plain loop.

    For inputs of one chunk, where there is nothing to share: entering a parallel region (and
    `ops.threads_for`'s switch to one thread around it) costs more than a 20 × 123 pass itself.
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
band_mean_complement_serial = _serial_twin(band_mean_complement, "band_mean_complement_serial")
mix_rows_complement_serial = _serial_twin(mix_rows_complement, "mix_rows_complement_serial")
combine_serial = _serial_twin(combine, "combine_serial")
band_mean_runs_serial = _serial_twin(band_mean_runs, "band_mean_runs_serial")
band_mean_columns_serial = _serial_twin(band_mean_columns, "band_mean_columns_serial")
combine_columns_serial = _serial_twin(combine_columns, "combine_columns_serial")


@njit(parallel=True, cache=True, fastmath={"reassoc", "contract"})
def sq_norms(x):  # pragma: no cover - compiled
    """(n,) Σ_t x[i, t]² in float64, per fixed chunk of columns, the chunks then added in order
    (bitwise reproducible whatever the thread count). Reassociation lets the squares vectorise;
    in float64 the squares of float32 values are exact and the reordering is harmless. ±inf
    gives +inf and NaN gives NaN, which the callers read as "no finite norm".

    Each row of a chunk is read through a slice from 0: indexed as x[i, t] from the chunk's
    start, the loop kept numba's per-element index handling and ran 4-5x slower (9.5 against
    1.9 ms at (20, 1e6)), with the same additions in the same order."""
    n, d = x.shape
    nchunks = (d + CHUNK - 1) // CHUNK
    parts = np.empty((nchunks, n))
    for c in prange(nchunks):
        start = c * CHUNK
        stop = min(d, start + CHUNK)
        for i in range(n):
            row = x[i, start:stop]
            acc = 0.0
            for t in range(stop - start):
                v = np.float64(row[t])
                acc += v * v
            parts[c, i] = acc
    return _sum_chunks(parts)


@njit(cache=True, fastmath=False)
def _sum_chunks(parts):  # pragma: no cover - compiled
    """parts (nchunks, n) added over the chunks in order, in plain loops (see `_sum_parts`)."""
    out = np.zeros(parts.shape[1])
    for c in range(parts.shape[0]):
        for i in range(parts.shape[1]):
            out[i] += parts[c, i]
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
def _sq_dist(gram, i, j):  # pragma: no cover - compiled
    """‖x_i − x_j‖² from the Gram, clamped at 0 against cancellation: one formula for
    `kth_sq_dists` and `imprecise_gram`, whose decisions must agree bit for bit."""
    return max(gram[i, i] + gram[j, j] - 2.0 * gram[i, j], 0.0)


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
                others[m] = np.inf if far[j] else _sq_dist(gram, i, j)
                m += 1
        kth[i] = _select(others, min(k, n - 1) - 1)
    return kth


@njit(cache=True, fastmath=False)
def _before(a, b):  # pragma: no cover - compiled
    """a sorts before b in numpy's order: NaN after every number."""
    return a < b or (b != b and a == a)


@njit(cache=True, fastmath=False)
def _select(values, rank):  # pragma: no cover - compiled
    """The value of sorted rank `rank` in `values` (reordered in place): Hoare's quickselect,
    O(n) where the full sort `kth_sq_dists` used was O(n log n) (10 → 4 µs a call at n = 20).
    A value, not an index, so any order of ties gives the same one: `values.sort()[rank]`."""
    lo, hi = 0, values.shape[0] - 1
    while lo < hi:
        pivot = values[(lo + hi) // 2]
        a, b = lo, hi
        while a <= b:
            while _before(values[a], pivot):
                a += 1
            while _before(pivot, values[b]):
                b -= 1
            if a <= b:
                values[a], values[b] = values[b], values[a]
                a += 1
                b -= 1
        if rank <= b:
            hi = b
        elif rank >= a:
            lo = a
        else:
            break
    return values[rank]


@njit(cache=True, fastmath=False)
def sort_keyed(kind, value, label, network):  # pragma: no cover - compiled
    """Run `network` (comparators (i, j): the smaller key to wire i) over every lane (column) of
    the key arrays (n + 2, lanes), compared as (kind, value, label) — or as (value, label) when
    `kind` is None, a branch numba prunes while compiling — so with distinct labels, ties keep
    label order, as a stable sort does; returns `wire`, where wire k now lives in row wire[k].
    Rows n and n + 1 are scratch: each comparator writes both of its outputs to the scratch
    rows and makes them its wires' rows (`_band_of_block`'s reason: a select stored in place is
    a masked store, microcoded on AMD Zen), so its loop over the lanes is a few vector
    operations without branches. nnm's neighbourhoods and the suspicion discount's ranks
    (`_verdict_kernels.band_discount`) both sort this way; a kind of all zeros instead of None
    cost the discount ~1.5 µs a run at (20, 123)."""
    n = value.shape[0] - 2
    wire = np.arange(n + 2)
    for q in range(network.shape[0]):
        lo, hi = network[q, 0], network[q, 1]
        low, high, least, most = wire[lo], wire[hi], wire[n], wire[n + 1]
        for t in range(value.shape[1]):
            u, v = value[low, t], value[high, t]
            cu, cv = label[low, t], label[high, t]
            if kind is None:
                swap = (v < u) | ((v == u) & (cv < cu))
            else:
                ku, kv = kind[low, t], kind[high, t]
                swap = (kv < ku) | ((kv == ku) & ((v < u) | ((v == u) & (cv < cu))))
                kind[least, t] = kv if swap else ku
                kind[most, t] = ku if swap else kv
            value[least, t] = v if swap else u
            label[least, t] = cv if swap else cu
            value[most, t] = u if swap else v
            label[most, t] = cu if swap else cv
        wire[lo], wire[hi], wire[n], wire[n + 1] = least, most, low, high
    return wire


@njit(cache=True, fastmath=False)
def nearest_mixes(dists, f, network):  # pragma: no cover - compiled
    """(R, n, n) nnm mixes of a stack of squared distances (R, n, n): 1/(n − f) on the n − f
    entries of each row that a stable ascending sort puts first, the row's own entry before all
    (so it is always kept), NaN after every number (numpy's order). `network`:
    `_networks.band_network(n, 0, n − f)`, whose first n − f wires end up holding the n − f
    smallest entries (as a set: the mix needs no order among them).

    The network runs over (class, value, column) keys (`sort_keyed`) — class −1 for the row's
    own entry, 1 for NaN, 0 for any other value — so its comparators order entries as the
    stable sort does (ties by column). Each of the R·n rows is one lane: the keys are laid out
    column-major, `LANES` lanes padded, so a comparator is a few vector operations over all rows
    of all runs at once. An insertion sort per row took ~n²/4 steps a row, its branches
    mispredicted on each round's fresh distances: 5.0–5.7 µs a run at n = 20, f = 8 against
    1.6–2.1 µs for the network (16 runs of a captured round, rescaled at random per call,
    old and new interleaved in one process on a Zen 5 EPYC)."""
    runs, n = dists.shape[0], dists.shape[1]
    weight = 1.0 / (n - f)
    lanes = runs * n
    width = (lanes + LANES - 1) // LANES * LANES
    kind = np.zeros((n + 2, width))  # two scratch rows for the comparators
    value = np.zeros((n + 2, width))
    column = np.zeros((n + 2, width))
    for r in range(runs):
        for i in range(n):
            lane = r * n + i
            for j in range(n):
                v = dists[r, i, j]
                if j == i:
                    kind[j, lane] = -1.0
                elif v != v:
                    kind[j, lane] = 1.0
                else:
                    value[j, lane] = v
                column[j, lane] = j
    wire = sort_keyed(kind, value, column, network)
    mix = np.zeros((runs, n, n))
    for r in range(runs):
        for i in range(n):
            for w in range(n - f):
                mix[r, i, int(column[wire[w], r * n + i])] = weight
    return mix


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


@njit(cache=True)
def sparse_lists(mix):  # pragma: no cover - compiled
    """(idx, wts): each row's nonzero entries of `mix` (n, n0) in ascending column order, padded
    with (0, 0.0) to the longest row (NaN counts as nonzero). `ops.sparse_mix`'s lists, built
    in one pass: at a9a's size the numpy formulation (argsort, two gathers) cost ~50 µs a call,
    several times a simulated round."""
    n = mix.shape[0]
    idx = np.zeros((n, _list_width(mix)), np.int64)
    wts = np.zeros((n, idx.shape[1]), np.float64)
    _fill_lists(mix, idx, wts)
    return idx, wts


@njit(cache=True)
def _list_width(mix):  # pragma: no cover - compiled
    """The most nonzero entries (NaN included) in a row of `mix` (n, n0)."""
    width = 0
    for i in range(mix.shape[0]):
        count = 0
        for k in range(mix.shape[1]):
            count += mix[i, k] != 0.0
        width = max(width, count)
    return width


@njit(cache=True)
def _fill_lists(mix, idx, wts):  # pragma: no cover - compiled
    """idx[i, :m], wts[i, :m] = the columns and values of row i's m nonzero entries, ascending;
    the rest of idx and wts is left as it is (their zero padding)."""
    for i in range(mix.shape[0]):
        j = 0
        for k in range(mix.shape[1]):
            if mix[i, k] != 0.0:
                idx[i, j] = k
                wts[i, j] = mix[i, k]
                j += 1


@njit(cache=True)
def complement_lists(idx, wts, n0):  # pragma: no cover - compiled
    """(ok, exc, rw) for `ops.complement`: ok when every row puts one weight rw[i] on all its
    members and the complement saves work (3 n0 + Σ excluded < Σ members); exc lists each row's
    excluded inputs ascending, padded with −1 to the most any row excludes (at least 1)."""
    n, width = idx.shape
    no_exc, no_rw = np.empty((0, 0), np.int64), np.empty(0, np.float64)
    if width == 0:  # no lists to take a weight from (a mix always has members)
        return False, no_exc, no_rw
    rw = np.empty(n, np.float64)
    members = np.zeros(n, np.int64)
    for i in range(n):
        rw[i] = wts[i, 0]
        for k in range(width):
            if wts[i, k] != 0.0:
                if wts[i, k] != rw[i]:  # NaN too
                    return False, no_exc, no_rw
                members[i] += 1
    total_members = 0
    total_excluded = 0
    most = 1
    for i in range(n):
        total_members += members[i]
        total_excluded += n0 - members[i]
        most = max(most, n0 - members[i])
    if 3 * n0 + total_excluded >= total_members:
        return False, no_exc, no_rw
    exc = np.full((n, most), -1, np.int64)
    inside = np.zeros(n0, np.bool_)
    for i in range(n):
        inside[:] = False
        for k in range(width):
            if wts[i, k] != 0.0:
                inside[idx[i, k]] = True
        # The first n0 − members[i] inputs outside the row, ascending (there are at least as
        # many: a repeated member counts once in `inside`); the rest stays −1.
        j = 0
        for k in range(n0):
            if j < n0 - members[i] and not inside[k]:
                exc[i, j] = k
                j += 1
    return True, exc, rw


@njit(cache=True)
def runs_lists(mixes, n0, complement):  # pragma: no cover - compiled
    """`sparse_lists` of each run's mix (mixes: (R, n, n0)) and, with `complement`,
    `complement_lists` of those, for `band_mean_runs`: (idx, wts, by_complement, exc, rw),
    each run's lists padded to the longest run's with (0, 0.0) and −1, which the band kernels
    skip (and `complement_lists` too: it counts members by their weights). One call for a
    batched simulation's R runs where two calls per run cost ~270 µs at R = 16. The lists are
    written straight into the padded arrays: gathering per-run arrays in numba's typed lists
    first made this call ~20 % slower (39 against 32 µs at R = 16)."""
    runs, n = mixes.shape[0], mixes.shape[1]
    width = 0
    for r in range(runs):
        width = max(width, _list_width(mixes[r]))
    idx = np.zeros((runs, n, width), np.int64)
    wts = np.zeros((runs, n, width), np.float64)
    for r in range(runs):
        _fill_lists(mixes[r], idx[r], wts[r])
    by_complement = np.zeros(runs, np.bool_)
    excluded = np.full((runs, n, max(1, n0)), -1, np.int64)
    rw = np.zeros((runs, n))
    most = 1
    for r in range(runs if complement else 0):
        ok, exc, weights = complement_lists(idx[r], wts[r], n0)
        by_complement[r] = ok
        if ok:
            rw[r] = weights
            excluded[r, :, : exc.shape[1]] = exc
            most = max(most, exc.shape[1])
    return idx, wts, by_complement, excluded[:, :, :most].copy(), rw


@njit(cache=True, fastmath=False)
def imprecise_gram(gram, gamma, resolution, far_sq, k):  # pragma: no cover - compiled
    """`rows.imprecise` in one call: some diagonal entry not below `far_sq`, or some row's
    rounding gamma · G_ii above `resolution` times its k-th nearest squared distance (no row
    counted far), as `kth_sq_dists` gives it (k ≥ 1).

    The k-th distance is not selected but counted past: resolution · kth_i < gamma · G_ii
    exactly when at least k of row i's other distances s_ij have resolution · s_ij below it —
    multiplying by resolution > 0 keeps their order, rounding included, and NaN, which sorts
    last, is below nothing. The same decision as selecting, from the same products, in a loop
    without data-dependent branches: a selection's branches are mispredicted in a simulated
    round, where the kernel meets each Gram once, and cost more than the arithmetic (5 → 1 µs a
    run at n = 20, R = 16)."""
    n = gram.shape[0]
    for i in range(n):
        if not gram[i, i] < far_sq:
            return True
    if n < 2:  # no distances: the k-th is +inf, which no rounding exceeds
        return False
    need = min(k, n - 1)
    for i in range(n):
        limit = gamma * gram[i, i]
        below = 0
        for j in range(n):
            below += (j != i) & (resolution * _sq_dist(gram, i, j) < limit)
        if below >= need:
            return True
    return False


@njit(cache=True, fastmath=False)
def imprecise_grams(grams, gamma, resolution, far_sq, k):  # pragma: no cover - compiled
    """(R,) `imprecise_gram` of each Gram of a stack (R, n, n), in one call."""
    out = np.empty(grams.shape[0], np.bool_)
    for r in range(grams.shape[0]):
        out[r] = imprecise_gram(grams[r], gamma, resolution, far_sq, k)
    return out
