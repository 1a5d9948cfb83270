"""Numba kernel for a band rule's discounts (`verdict.Banded`): per sampled coordinate, which
(mixed) rows fell inside the kept band, turned into each raw input's effective weight.

A plain loop because the work per coordinate is tiny (a sort of n values and an n × n0 mix) and
numpy's per-call overhead would dominate it: ten array calls per round cost ~0.1 ms at a9a's
d = 123, as much as the aggregation itself.
"""

from __future__ import annotations

import numpy as np
from numba import njit

from byzps.common.aggregators._kernels import LANES, sort_keyed


@njit(cache=True, fastmath=False)
def _share_ties(  # pragma: no cover - compiled
    values, rows, wire, t, n, lo, hi, low_value, high_value, equal_low, equal_high, share, weights
):
    """Column t's band weights where a tie crosses an end of the band ranks lo..hi−1: each tied
    member is in for the slots its value holds in the band over the members it has (the
    `equal_low` rows of `low_value`, the `equal_high` of `high_value`), every value strictly
    inside for one (`share`: each row's weight per raw input, as in `band_discount`; empty:
    the rows are the raw inputs)."""
    width = hi - lo
    below_low = below_high = 0
    for r in range(n):
        v = values[wire[r], t]
        below_low += v < low_value
        below_high += v < high_value
    if low_value == high_value:
        low_part = width / equal_low
        high_part = low_part
    else:
        low_part = (below_low + equal_low - lo) / equal_low
        high_part = (hi - below_high) / equal_high
    for r in range(n):
        v = values[wire[r], t]
        if v == low_value:
            part = low_part
        elif v == high_value:
            part = high_part
        elif low_value < v < high_value:
            part = 1.0
        else:
            continue
        j = int(rows[wire[r], t])
        if share.shape[0] > 0:
            for k in range(share.shape[1]):
                weights[k] += part * share[j, k]
        else:
            weights[j] += part / width


@njit(cache=True, fastmath=False)
def band_discount(raw, mix, network, a, b, slide):  # pragma: no cover - compiled
    """δ (n0,) float64: per column t of raw (n0, s), the rows r = mix · raw[:, t] (mix (n, n0);
    an empty mix means r = raw[:, t]) rounded to raw's dtype, NaN as +inf; the band = sorted
    ranks a+σ..b+σ−1 (stable: ties in row order), σ = Σ_{j<slide} [v_{b+j} − m < m − v_{a+j}]
    with m the median, as `_kernels.band_mean` chooses it; each band row weighs 1/(b − a),
    each raw input w_i = Σ_{j ∈ band} mix[j, i]/(b − a), added in rank order; then
    δ_i = mean_t (1 − min(1, n0·w_i)). `network`: `_networks.ranked_network(n, a, b, slide)`.

    The mixed rows are computed first for all columns, row by row: each column's sum is a chain
    of dependent float64 additions, and running the columns side by side (not one column's n
    rows after another) lets them overlap — ~3x faster at (20, 123), the same terms added in the
    same order, so the same bits. Four members are added per pass over the columns,
    ((acc + w₁x₁) + w₂x₂) + …, which loads and stores acc a quarter as often.

    The ranks are then found for all columns at once by a comparator network over (value, row)
    pairs (`_kernels.sort_keyed`). A comparator swaps when the second value is smaller, or equal
    with a smaller row, so ties keep row order as a stable sort does; the network leaves each
    rank the discount reads (the window's, and the median's) on a wire of its own, with the row
    it came from. The rows are laid out `LANES` columns wide (padding that nothing reads), so
    each comparator runs whole vectors without a scalar tail. At a9a's (20, 123) under nnm∘cm
    this network of 83 comparators took the place of counting every row's rank over all 190
    pairs of rows and scattering the ranks into an order. With the four-member passes: 8.4–8.6
    → 6.2–6.3 µs a run on a Zen 5 EPYC (16 runs of a captured round, old and new interleaved
    in one process)."""
    n0, count = raw.shape
    mixed = mix.shape[0] > 0
    n = mix.shape[0] if mixed else n0
    width = b - a
    padded = (count + LANES - 1) // LANES * LANES
    values = np.zeros((n + 2, padded), raw.dtype)  # two scratch rows for the comparators
    if mixed:
        acc = np.empty(count)
        members = np.empty(n0, np.int64)
        for j in range(n):
            m = 0
            for k in range(n0):
                if mix[j, k] != 0.0:  # zero weights skipped, as band_mean mixes: 0 · inf is NaN
                    members[m] = k
                    m += 1
            acc[:] = 0.0
            p = 0
            while p + 3 < m:  # four members a pass: the same additions, a quarter of acc's traffic
                k1, k2, k3, k4 = members[p], members[p + 1], members[p + 2], members[p + 3]
                w1, w2, w3, w4 = mix[j, k1], mix[j, k2], mix[j, k3], mix[j, k4]
                for t in range(count):
                    v = acc[t] + w1 * np.float64(raw[k1, t])
                    v = v + w2 * np.float64(raw[k2, t])
                    v = v + w3 * np.float64(raw[k3, t])
                    acc[t] = v + w4 * np.float64(raw[k4, t])
                p += 4
            while p < m:
                k1 = members[p]
                for t in range(count):
                    acc[t] += mix[j, k1] * np.float64(raw[k1, t])
                p += 1
            row = values[j]
            for t in range(count):
                row[t] = acc[t]  # rounded to raw's dtype, as band_mean's mixing does
    else:
        values[:n, :count] = raw
    rows = np.empty((n + 2, padded), raw.dtype)  # the row each value came from (exact: n < 2²⁴)
    for j in range(n):
        row = values[j]
        for t in range(count):
            v = row[t]
            row[t] = v if v < np.inf else np.inf  # NaN as +inf
        rows[j, :] = j
    wire = sort_keyed(None, values, rows, network)  # wire k's values and rows: row wire[k]
    share = mix / width  # each band row's weight per raw input, divided once
    weights = np.empty(n0)
    total = np.zeros(n0)
    for t in range(count):
        shift = 0
        if slide > 0:
            low, high = values[wire[(n - 1) // 2], t], values[wire[n // 2], t]
            median = 0.5 * (np.float64(low) + high)
            for j in range(slide):
                if values[wire[b + j], t] - median < median - values[wire[a + j], t]:
                    shift += 1
        weights[:] = 0.0
        lo, hi = a + shift, b + shift
        low_value, high_value = values[wire[lo], t], values[wire[hi - 1], t]
        # Tied values share the band's slots they hold: a tie straddling an end of the band
        # puts each of its members in for the same fraction (row order would decide alone).
        equal_low = equal_high = inside_low = inside_high = 0
        for r in range(n):
            v = values[wire[r], t]
            equal_low += v == low_value
            equal_high += v == high_value
        for r in range(lo, hi):
            v = values[wire[r], t]
            inside_low += v == low_value
            inside_high += v == high_value
        if equal_low == inside_low and equal_high == inside_high:  # no tie crosses an end
            for r in range(lo, hi):
                j = int(rows[wire[r], t])
                if mixed:
                    for k in range(n0):
                        weights[k] += share[j, k]
                else:
                    weights[j] += 1.0 / width
        else:
            _share_ties(
                values, rows, wire, t, n, lo, hi, low_value, high_value, equal_low, equal_high,
                share, weights,
            )  # fmt: skip
        for k in range(n0):
            part = n0 * weights[k]
            total[k] += 1.0 - min(1.0, max(0.0, part))
    if count > 0:
        total /= count
    return total


@njit(cache=True, fastmath=False)
def band_discount_runs(raw, mix, network, a, b, slide):  # pragma: no cover - compiled
    """(R, n0): `band_discount` of each run r — raw[r] (n0, s) mixed by mix[r] (n, n0; an
    (R, 0, 0) mix: the rows themselves) — in one call for a batched simulation's R runs; the
    same compiled kernel per run, so each row is bitwise that run's own."""
    out = np.empty((raw.shape[0], raw.shape[1]))
    for r in range(raw.shape[0]):
        out[r] = band_discount(raw[r], mix[r], network, a, b, slide)
    return out
