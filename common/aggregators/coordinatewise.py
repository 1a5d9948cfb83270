"""Coordinate-wise rules: mean, median (cm) and trimmed mean (cwtm).

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
from byzps.common.aggregators.rule import RowsAggregator, register, require


@register("mean")
class Mean(RowsAggregator):
    """x̂ = (1/n) Σ_i x_i.

    Not robust (one Byzantine row moves it arbitrarily far); the reference every robust rule is
    compared with, and the right rule when f = 0. Any f is accepted, so runs without a defence can
    still declare their attackers.
    """

    coordinatewise = True

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        return rows.mean()


class _RankBandMean(RowsAggregator):
    """x̂_t = mean of the values of rank a..b-1 (0-based, ascending, NaN as +inf) in coordinate t.

    Guarantee: when a ≥ f and b ≤ n − f, each x̂_t lies within [min, max] of the honest values in
    coordinate t — at most f values rank below the band and f above it, so every value in the
    band has an honest value at or below it and one at or above it.
    """

    coordinatewise = True

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

    def check(self, n: int, f: int) -> None:
        require(2 * f < n, "cm", "2f < n", f, n)

    def band(self, n: int, f: int) -> tuple[int, int]:
        self.check(n, f)
        return (n - 1) // 2, n // 2 + 1


@register("cwtm")
class TrimmedMean(_RankBandMean):
    """x̂_t = (1/(n−2f)) Σ_{r=f}^{n−f−1} x_{(r),t}, where x_{(0),t} ≤ … ≤ x_{(n−1),t}.

    Drops the f largest and f smallest values of each coordinate (NaN counting as +inf); needs
    2f < n to keep any, and then x̂_t stays within the honest values' range.
    """

    def check(self, n: int, f: int) -> None:
        require(2 * f < n, "cwtm", "2f < n", f, n)

    def band(self, n: int, f: int) -> tuple[int, int]:
        self.check(n, f)
        return f, n - f
