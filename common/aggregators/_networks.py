"""Comparator networks that compute the mean of a band of order statistics.

The coordinate-wise rules (median, trimmed mean) need, for every coordinate, the mean of the
values of rank a..b-1 among n inputs. A fixed comparator network does this without data-dependent
branches, so one comparator applied to B coordinates at once is an elementwise min/max over B
lanes that the compiler vectorises; that is what makes these rules run near memory bandwidth.

Construction: Batcher's odd–even merge sort on N = next power of two ≥ n wires, with the n real
inputs on wires p..p+n-1 and the padding wires below (−∞) and above (+∞). A comparator puts its
minimum on the lower wire, so a padding wire never leaves its end of the order: every comparator
that touches one is a no-op and is dropped. Then a backward pass keeps only comparators whose
outputs matter: the result is a *symmetric* function (the sum) of the output band, so comparators
acting inside the band, or only on wires nobody reads, are dropped as well. The offset p is chosen
to minimise what is left. The list is a pure function of (n, a, b) and is cached.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

#: How many wire offsets to try; the pruning pass is pure Python, so large n only samples a few.
_MAX_OFFSETS = 33


def _batcher(wires: int) -> list[tuple[int, int]]:
    """Batcher's odd–even merge sort on `wires` (a power of two) wires, as (low, high) pairs."""
    comparators = []
    p = 1
    while p < wires:
        k = p
        while k >= 1:
            for j in range(k % p, wires - k, 2 * k):
                for i in range(min(k, wires - j - k)):
                    if (i + j) // (2 * p) == (i + j + k) // (2 * p):
                        comparators.append((i + j, i + j + k))
            k //= 2
        p *= 2
    return comparators


def _prune(
    comparators: list[tuple[int, int]],
    n: int,
    pad_low: int,
    a: int,
    b: int,
    exact: tuple[int, ...] = (),
) -> list[tuple[int, int]]:
    """Keep the comparators on real wires that influence the sum of output wires a..b-1 or the
    value of an output wire in `exact`.

    Backward pass: `band` holds wires whose values only matter through their sum, `needed` holds
    wires whose individual values matter. A comparator inside the band (it only permutes the
    band) or entirely outside both sets is dropped; a kept one makes both its wires needed.
    """
    real = range(pad_low, pad_low + n)
    needed = {pad_low + r for r in exact}
    band = set(range(pad_low + a, pad_low + b)) - needed
    kept = []
    for i, j in reversed(comparators):
        if i not in real or j not in real:
            continue
        if (i in band and j in band) or not ({i, j} & (band | needed)):
            continue
        band -= {i, j}
        needed |= {i, j}
        kept.append((i - pad_low, j - pad_low))
    kept.reverse()
    return kept


@lru_cache(maxsize=256)
def band_network(n: int, a: int, b: int, exact: tuple[int, ...] = ()) -> np.ndarray:
    """Comparators (k, 2) after which wires a..b-1 hold ranks a..b-1 of n inputs (as a set), and
    each wire r in `exact` holds rank r itself (meamed needs the ranks around its band one by one).

    Row (i, j) with i < j means: put the smaller value on wire i and the larger on wire j.
    """
    if not 0 <= a < b <= n:
        raise ValueError(f"need 0 <= a < b <= n, got a={a}, b={b}, n={n}")
    if not all(0 <= r < n for r in exact):
        raise ValueError(f"exact ranks must lie in [0, {n}), got {exact}")
    wires = 1 << max(0, (n - 1).bit_length())
    full = _batcher(wires)
    pads = np.unique(np.linspace(0, wires - n, num=min(wires - n + 1, _MAX_OFFSETS)).astype(int))
    best = min((_prune(full, n, int(pad), a, b, exact) for pad in pads), key=len)
    network = np.array(best, dtype=np.int64).reshape(-1, 2)
    network.setflags(write=False)
    return network


@lru_cache(maxsize=256)
def ranked_network(n: int, a: int, b: int, slide: int = 0) -> np.ndarray:
    """Comparators after which every rank a band's discount reads holds that rank on its own
    wire: the window's ranks a..b+slide−1 and, with slide > 0, the two middle ranks its median is
    taken from (`_verdict_kernels.band_discount`). Unlike `band_network`'s band, which is only
    a set, the discount needs each rank's row: which rows the band kept, added in rank order."""
    if slide < 0 or not 0 <= a < b <= b + slide <= n:
        raise ValueError(f"need 0 <= a < b, 0 <= slide, b + slide <= n, got {a=}, {b=}, {slide=}")
    ranks = set(range(a, b + slide))
    if slide > 0:
        ranks |= {(n - 1) // 2, n // 2}
    return band_network(n, min(ranks), max(ranks) + 1, tuple(sorted(ranks)))
