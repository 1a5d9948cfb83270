"""Numba kernel for a band rule's discounts (`verdict.Banded`): per sampled coordinate, which
(mixed) rows fell inside the kept band, turned into each raw input's effective weight.

A plain loop because the work per coordinate is tiny (a sort of n values and an n × n0 mix) and
numpy's per-call overhead would dominate it: ten array calls per round cost ~0.1 ms at a9a's
d = 123, as much as the aggregation itself.
"""

from __future__ import annotations

import numpy as np
from numba import njit

#: Columns per 512-bit vector of float32: the width the rank count's rows are padded to.
LANES = 16


@njit(cache=True, fastmath=False)
def band_discount(raw, mix, a, b, slide):  # pragma: no cover - compiled
    """δ (n0,) float64: per column t of raw (n0, s), the rows r = mix · raw[:, t] (mix (n, n0);
    an empty mix means r = raw[:, t]) rounded to raw's dtype, NaN as +inf; the band = sorted
    ranks a+σ..b+σ−1 (stable: ties in row order), σ = Σ_{j<slide} [v_{b+j} − m < m − v_{a+j}]
    with m the median, as `_kernels.band_mean` chooses it; each band row weighs 1/(b − a),
    each raw input w_i = Σ_{j ∈ band} mix[j, i]/(b − a); then δ_i = mean_t (1 − min(1, n0·w_i)).

    The mixed rows are computed first for all columns, row by row: each column's sum is a chain
    of dependent float64 additions, and running the columns side by side (not one column's n
    rows after another) lets them overlap — ~3x faster at (20, 123), the same terms added in the
    same order, so the same bits. Likewise the ranks: counted for all columns at once instead of
    an insertion sort per column (the same stable order, ties in row order). The rows are laid
    out `LANES` columns wide (padding that nothing reads), so that counting takes whole vectors
    without a scalar tail, and each band row's share mix[j]/(b − a) is divided once, not once
    per column (the same quotient): ~10 → ~8 µs at a9a's (20, 123) under nnm, on a Zen 5 EPYC."""
    n0, count = raw.shape
    mixed = mix.shape[0] > 0
    n = mix.shape[0] if mixed else n0
    width = b - a
    padded = (count + LANES - 1) // LANES * LANES
    values = np.zeros((n, padded), raw.dtype)
    if mixed:
        acc = np.empty(count)
        for j in range(n):
            acc[:] = 0.0
            for k in range(n0):
                if mix[j, k] != 0.0:
                    for t in range(count):
                        acc[t] += mix[j, k] * np.float64(raw[k, t])
            row = values[j]
            for t in range(count):
                row[t] = acc[t]  # rounded to raw's dtype, as band_mean's mixing does
    else:
        values[:, :count] = raw
    # NaN as +inf; then every row's stable rank in its column, counted for all columns side by
    # side (j's rank: the rows below it, and the rows before it that tie with it), which is the
    # position a stable sort gives it; `order` inverts the ranks. Without NaN, "i before j" is
    # the complement of "j before i", so each pair is compared once and counts for one of them.
    for j in range(n):
        row = values[j]
        for t in range(count):
            v = row[t]
            row[t] = v if v < np.inf else np.inf
    rank = np.zeros((n, padded), np.int32)
    for j in range(n):
        vj, rj = values[j], rank[j]
        for i in range(j):  # each pair once: i < j is below j iff v_i ≤ v_j (no NaN left)
            vi, ri = values[i], rank[i]
            for t in range(padded):
                below = np.int32(vi[t] <= vj[t])
                rj[t] += below
                ri[t] += 1 - below
    order = np.empty((n, count), np.int64)
    for j in range(n):
        for t in range(count):
            order[rank[j, t], t] = j
    share = mix / width  # each band row's weight per raw input, divided once
    weights = np.empty(n0)
    total = np.zeros(n0)
    for t in range(count):
        shift = 0
        if slide > 0:
            low, high = values[order[(n - 1) // 2, t], t], values[order[n // 2, t], t]
            median = 0.5 * (np.float64(low) + high)
            for j in range(slide):
                if values[order[b + j, t], t] - median < median - values[order[a + j, t], t]:
                    shift += 1
        weights[:] = 0.0
        for r in range(a + shift, b + shift):
            j = order[r, t]
            if mixed:
                own = share[j]
                for k in range(n0):
                    weights[k] += own[k]
            else:
                weights[j] += 1.0 / width
        for k in range(n0):
            part = n0 * weights[k]
            total[k] += 1.0 - min(1.0, max(0.0, part))
    if count > 0:
        total /= count
    return total


@njit(cache=True, fastmath=False)
def band_discount_runs(raw, mix, a, b, slide):  # pragma: no cover - compiled
    """(R, n0): `band_discount` of each run r — raw[r] (n0, s) mixed by mix[r] (n, n0; an
    (R, 0, 0) mix: the rows themselves) — in one call for a batched simulation's R runs; the
    same compiled kernel per run, so each row is bitwise that run's own."""
    out = np.empty((raw.shape[0], raw.shape[1]))
    for r in range(raw.shape[0]):
        out[r] = band_discount(raw[r], mix[r], a, b, slide)
    return out
