"""Compiled passes over the server's (n, d) states: sparse adds into rows, and the entries where
two vectors' bits differ. The server's hot path at large d with sparse messages.

Why: at d = 1e7 with 20 Top-1 % messages a round, the flat `index_add_` that applies them took
26 ms (an int64 index built per entry, then one thread); these kernels take 16 ms serially and
8 ms on two threads, rows split between them. Finding where ĝ changed took 26 ms through numpy
(a bool mask, a count, an int64 `flatnonzero` on fresh pages, a cast, a gather); one branch-free
pass that counts and a second that writes int32 indices and the values take ~7 ms on a random
16 % of changes.

Both do exactly the float operations of the torch path they replace — one float add per entry,
in batch order within a row, and bit comparisons — so results are bitwise the same.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange
from numba.cpython.unsafe.numbers import trailing_zeros

from byzps.common._prefetch import prefetch_ahead


@njit(cache=True, nogil=True)
def within(indices, bound):  # pragma: no cover - compiled
    """True when every entry is in [0, bound): compiled code does not check its subscripts, so
    the scatters below run only after this (an index from any caller, however produced, must
    never write outside the states)."""
    for v in indices.flat:  # noqa: SIM110 - numba compiles no generator for all()
        if v < 0 or v >= bound:
            return False
    return True


@njit(cache=True, fastmath=False, nogil=True)
def scatter_add_rows(target, rows, indices, values):  # pragma: no cover - compiled
    """target[rows[i], indices[i, j]] += values[i, j], in batch order (rows may repeat)."""
    for i in range(indices.shape[0]):
        _add_into_row(target[rows[i]], indices[i], values[i])


@njit(parallel=True, cache=True, fastmath=False)
def scatter_add_distinct_rows(target, rows, indices, values):  # pragma: no cover - compiled
    """`scatter_add_rows` with the rows shared between threads: only for distinct `rows` (two
    threads adding into one row would race)."""
    for i in prange(indices.shape[0]):
        _add_into_row(target[rows[i]], indices[i], values[i])


@njit(cache=True, fastmath=False, nogil=True)
def _add_into_row(row, indices, values):  # pragma: no cover - compiled
    """row[indices[j]] += values[j] in order, asking for the entry `AHEAD` further on first
    (`common/_prefetch.py`): 20 Top-1 % messages into (20, 10⁷) states took 8.1 ms plain,
    4.6–5.6 with it, on two threads (10.5 and 6.0–7.0 on one)."""
    for j in range(indices.shape[0]):
        prefetch_ahead(row, indices, j)
        row[indices[j]] += values[j]


@njit(cache=True, fastmath=False, nogil=True)
def changed_entries(new, old, limit):  # pragma: no cover - compiled
    """(True, indices int32, new[indices]) where new ≠ old (same-width int views of two vectors,
    so bits are compared), or (False, empty, empty) when more than `limit` differ (counted
    before anything is written). Branch-free: every index is written and the count advances on
    a difference, which on a random pattern runs ~2.5x faster than a branch per entry."""
    n = new.shape[0]
    count = 0
    for t in range(n):
        count += new[t] != old[t]
    if count > limit:
        return False, np.empty(0, np.int32), np.empty(0, new.dtype)
    indices = np.empty(count + 1, np.int32)
    values = np.empty(count + 1, new.dtype)
    count = 0
    for t in range(n):
        indices[count] = t
        values[count] = new[t]
        count += new[t] != old[t]
    return True, indices[:count], values[:count]


@njit(cache=True, nogil=True)
def mark_columns(bits, indices, bound):  # pragma: no cover - compiled
    """Set bit v of the bitset `bits` (uint64 words) for every v in `indices`, or return False,
    setting none, when one falls outside [0, bound): the union of a round's touched columns
    (server/engine.py). A bitset of 10⁷ columns is 1.25 MB, which stays in cache where a byte
    mask (10 MB) does not: 2·10⁶ random marks took 3.4 ms, 5.2 in a byte mask (7.8 numpy)."""
    if not within(indices, bound):  # checked first: nothing is written past the set
        return False
    for v in indices.flat:
        bits[v >> 6] |= np.uint64(1) << np.uint64(v & 63)
    return True


@njit(cache=True, nogil=True)
def take_marked(bits):  # pragma: no cover - compiled
    """The set bits of `bits`, ascending (int64 positions), the set cleared: each nonzero word's
    bits peeled lowest first (trailing zeros), 3 ms for 1.8·10⁶ of 10⁷ where a byte mask's
    `flatnonzero` and clearing took 9–15 ms."""
    count = 0
    for word in bits:
        while word:
            word &= word - np.uint64(1)
            count += 1
    out = np.empty(count, np.int64)
    m = 0
    for w in range(bits.shape[0]):
        word = bits[w]
        if word:
            bits[w] = 0
            while word:
                out[m] = (w << 6) + trailing_zeros(word)
                m += 1
                word &= word - np.uint64(1)
    return out


@njit(cache=True, fastmath=False, nogil=True)
def rewrite_columns(aggregate, columns, values):  # pragma: no cover - compiled
    """aggregate[columns] = values (same-width int views, so bits are compared and copied),
    returning (indices int32, values) of the entries whose bits changed: an incremental
    round's change of ĝ in one pass over its |U| columns (`columns` within the aggregate,
    checked by the caller), where a gather, a comparison, two boolean selections and a scatter
    were five. Both passes ask for the column `AHEAD` further on (`common/_prefetch.py`): at
    |U| = 16.5 % of 10⁷ the rewrite took 7.4 ms plain, 3.6–4.4 with it."""
    m = columns.shape[0]
    count = 0
    for u in range(m):
        prefetch_ahead(aggregate, columns, u)
        count += aggregate[columns[u]] != values[u]
    indices = np.empty(count + 1, np.int32)
    changed = np.empty(count + 1, values.dtype)
    count = 0
    for u in range(m):
        prefetch_ahead(aggregate, columns, u)
        t = columns[u]
        v = values[u]
        indices[count] = t
        changed[count] = v
        count += aggregate[t] != v
        aggregate[t] = v
    return indices[:count], changed[:count]


@njit(parallel=True, cache=True, fastmath=False)
def step_float32(x, g, lr):  # pragma: no cover - compiled
    """x ← float32(x − lr·g) with the difference in float64 (lr a float32 value): the product of
    two float32s is exact in float64, so the one float64 rounding, then the one to float32,
    are the same on every CPU, whether or not it fuses the multiply and the subtract."""
    for i in prange(x.shape[0]):
        x[i] = np.float32(np.float64(x[i]) - lr * np.float64(g[i]))
