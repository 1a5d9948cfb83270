"""Coordinate-wise rules: mean, median (cm), trimmed mean (cwtm) and mean around median (meamed).

cm and cwtm are both "the mean of the order statistics of rank a..b-1, per coordinate", so they
share one implementation (`_RankBandMean`) that differs only in the band; the work is one pass of
the comparator-network kernel (`_kernels.band_mean`).

Non-finite values: ±inf rank like any value and NaN ranks as +inf (a comparator cannot order NaN;
left in place it would corrupt the ranks of the finite values around it). So with f < n/2 values
per coordinate arbitrary — ±inf, NaN, ±FLT_MAX included — the band [f, n − f) holds values
between the honest ones and the output is finite; no row is dropped, and no pass is added.
"""

from __future__ import annotations

from abc import abstractmethod

from torch import Tensor

from byzps.common.aggregators.rows import Rows
from byzps.common.aggregators.rule import MajorityRule, RowsAggregator, register


@register("mean")
class Mean(RowsAggregator):
    """x̂ = (1/n) Σ_i x_i.

    Not robust (one Byzantine row moves it arbitrarily far); the reference every robust rule is
    compared with, and the right rule when f = 0. Any f is accepted, so runs without a defence can
    still declare their attackers.
    """

    coordinatewise = True
    #: Read in place with prefetch (`ColumnRows.mean`), the mean on 18 % of the columns took
    #: 0.75 of the full call at d = 1e6 and 0.48 at 1e7, on 25 % 0.96 and 0.63
    #: (`benchmarks/bench_column_share.py`); gathered first, 2.1-2.2 at 18 %.
    column_share = 0.2

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        return rows.mean()


class _RankBandMean(MajorityRule):
    """x̂_t = mean of the values of rank a..b-1 (0-based, ascending, NaN as +inf) in coordinate t.

    Guarantee: when a ≥ f and b ≤ n − f, each x̂_t lies within [min, max] of the honest values in
    coordinate t — at most f values rank below the band and f above it, so every value in the
    band has an honest value at or below it and one at or above it.
    """

    coordinatewise = True
    batches_runs = True
    #: Read in place (`ColumnRows`), cm on 18 % of the columns took about half of the full
    #: pass's time, on 40 % 0.83-0.94 of it, on 60 % more than all of it
    #: (`benchmarks/bench_column_share.py`, d = 1e6 and 1e7).
    column_share = 0.4

    @abstractmethod
    def band(self, n: int, f: int) -> tuple[int, int]:
        """The ranks [a, b) to average for n inputs; raises ValueError if f is too large."""

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        a, b = self.band(rows.n, f)
        return rows.band_mean(a, b)


@register("cm")
class CoordinateMedian(_RankBandMean):
    """x̂_t = median_i x_{i,t}; for even n, the mean of the two middle values.

    Tolerates f < n/2: the f outliers can push the median at most to an honest value's rank, so
    x̂_t stays within the honest values' range (whatever the outliers hold, NaN as +inf).
    """

    def band(self, n: int, f: int) -> tuple[int, int]:
        self.check(n, f)
        return (n - 1) // 2, n // 2 + 1


@register("cwtm")
class TrimmedMean(_RankBandMean):
    """x̂_t = (1/(n−2f)) Σ_{r=f}^{n−f−1} x_{(r),t}, where x_{(0),t} ≤ … ≤ x_{(n−1),t}.

    Drops the f largest and f smallest values of each coordinate (NaN counting as +inf); needs
    2f < n to keep any, and then x̂_t stays within the honest values' range.
    """

    def band(self, n: int, f: int) -> tuple[int, int]:
        self.check(n, f)
        return f, n - f


@register("meamed")
class MeanAroundMedian(MajorityRule):
    """x̂_t = (1/(n−f)) Σ_{i ∈ S_t} x_{i,t},  S_t = the n − f values of coordinate t nearest its
    median m_t (for even n, the mean of the two middle values).

    Mean around median (Xie, Koyejo, Gupta 2018, "Generalized Byzantine-tolerant SGD"; ByzFL's
    `Meamed`, and ByzPy's `MeanOfMedians`, which is the same rule under another name). The n − f
    values nearest a point of the sorted column are consecutive, so S_t is the window of ranks
    s..s+n−f−1 for the s ∈ [0, f] that makes it nearest m_t: one comparator network (the ranks
    the window may gain or lose and the two middle ones sorted exactly, the rest as a set) and
    a branch-free count per coordinate (`_kernels.band_mean` with slide = f). NaN ranks as +inf.

    Ties: a value entering the window replaces the one leaving only when strictly nearer m_t,
    so of two values equally far on either side the lower is kept. ByzFL picks among such ties
    by `argpartition`/`topk` (unspecified order); ByzPy's chunked path uses the lower middle
    value as m_t and accepts any f < n. Only exact ties (or, for ByzPy, even n) tell them apart.

    Tolerates f < n/2. Guarantee: with [lo_t, hi_t] the honest values' range in coordinate t,

        lo_t − f/(n−f) · (hi_t − lo_t)  ≤  x̂_t  ≤  hi_t + f/(n−f) · (hi_t − lo_t).

    Proof: the two middle ranks lie between honest values (f < n/2), so m_t ∈ [lo_t, hi_t]. The
    ≥ n − f honest values are within δ = max(m_t − lo_t, hi_t − m_t) ≤ hi_t − lo_t of m_t, so
    every value in S_t is too: S_t ⊂ [lo_t − (hi_t − lo_t), hi_t + (hi_t − lo_t)]. S_t holds at
    least n − 2f honest values and at most f others; averaging gives the bound. It is not the
    honest range itself: honest {0, 0, 10} with two values at −1 (n = 5, f = 2) give
    m = 0, S = {0, 0, −1}, x̂ = −1/3. Non-finite values are never in S_t (n − f finite values
    are nearer), so the output is finite whatever f inputs hold.
    """

    coordinatewise = True
    batches_runs = True
    #: More comparators than cm's per column, so a partial read pays longer: on 60 % of the
    #: columns 0.98-1.0 of the full pass (`benchmarks/bench_column_share.py`).
    column_share = 0.5

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        self.check(n, f)
        return rows.band_mean(0, n - f, slide=f)
