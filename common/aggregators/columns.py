"""`ColumnRows`: some columns of the raw rows, for a coordinate-wise rule's incremental round.

Why: a server round whose messages touched |U| of the d columns recomputes ĝ there only
(server/engine.py). The band rules (cm, cwtm, meamed) and the mean read those columns in place
in one compiled pass each (`ops.band_mean_columns`, `ops.combine_columns`), where gathering them
into a new (n, |U|) tensor first cost about twice the band itself, and made the mean's columns
dearer than its full pass beyond a few percent of d.
Either way each entry is bitwise the full aggregate's there: the same operations on the same
values (tests/test_incremental.py).
"""

from __future__ import annotations

import numpy as np
from torch import Tensor

from byzps.common.aggregators import ops
from byzps.common.aggregators.verdict import Banded, Verdict, Weighted


class ColumnRows:
    """The raw rows x (n, d) at `columns` (sorted int64 indices), as a coordinate-wise rule's
    `aggregate` reads them: their count, a band of their order statistics, their mean."""

    def __init__(self, x: Tensor, columns: Tensor) -> None:
        self.x = x
        self.columns = columns
        self._verdict: Verdict | None = None

    @property
    def n(self) -> int:
        return self.x.shape[0]

    def band_mean(self, a: int, b: int, slide: int = 0) -> Tensor:
        """`Rows.band_mean` of the rows at the columns, read in place."""
        self._verdict = Banded(None, a, b, slide)
        return ops.band_mean_columns(self.x, self.columns, a, b, slide)

    def mean(self) -> Tensor:
        """`Rows.mean` of the rows at the columns, read in place: the same weights and the same
        verdict as `Rows.mean`."""
        weights = np.full(self.n, 1.0 / self.n)
        self._verdict = Weighted(weights)
        return ops.combine_columns(self.x, self.columns, weights)

    def verdict(self) -> Verdict | None:
        """What the last reduction did to each row (`Rows.verdict`)."""
        return self._verdict
