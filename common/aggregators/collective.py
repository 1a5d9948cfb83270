"""Column-sharded aggregation: S shards, each holding a contiguous range of the d coordinates,
run the same rule on their own columns and take the same decisions.

Why it works (issue 12's sharded server): every rule reads its rows through `ops`, and the data
passes there are of two kinds. Coordinate-wise passes (the comparator-network band, `combine`,
the mix, the coordinate-wise median) give each column from that column alone, so a shard
computes its own columns exactly as one server would. Reductions over the columns (the centred
Gram and the squared norms: O(n²) numbers whatever d is) are summed over the shards, in rank
order, so every shard holds the same matrix, and everything decided from it — far rows, the
robust-centre check, nnm's neighbours, krum's choice, gm's and cclip's weights — is decided
alike on every shard, from the same bits. Such a program is SPMD: every shard makes the same
sequence of collective calls, which is what lets `all_sum` be a plain barrier.

The Gram summed over shards rounds differently from one pass over all columns, so distance rules
agree with a single server up to float64 rounding (and identical selections unless two
candidates tie within it); coordinate-wise rules agree bit for bit.

`sharded(collective)` puts the calling thread's aggregations on a shard; `ThreadCollective`
connects S threads of one process (tests, and the simulator); a network collective between
shard servers implements the same `all_sum`.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar

import numpy as np


class Collective(ABC):
    """One shard's view of the group: its rank, its columns and the all-reduce."""

    def __init__(self, rank: int, columns: Sequence[int]) -> None:
        """`columns`: every shard's column count, in rank order (their sum is d)."""
        if not 0 <= rank < len(columns) or min(columns) < 0:
            raise ValueError(f"rank {rank} of shards with columns {list(columns)}")
        self.rank = rank
        self.size = len(columns)
        #: Global d, and this shard's first global column.
        self.total = int(sum(columns))
        self.offset = int(sum(columns[:rank]))
        self.columns = int(columns[rank])

    @abstractmethod
    def all_sum(self, part: np.ndarray) -> np.ndarray:
        """Σ over the shards of `part` (same shape on each), added in rank order: the same bits
        on every shard."""


class ThreadCollective(Collective):
    """S shards as S threads of one process, meeting at a barrier for each `all_sum`."""

    def __init__(self, rank: int, columns: Sequence[int], shared: _Meeting) -> None:
        super().__init__(rank, columns)
        self._shared = shared

    @staticmethod
    def group(columns: Sequence[int], timeout: float = 60.0) -> list[ThreadCollective]:
        """One collective per shard; a shard that does not arrive within `timeout` seconds
        breaks the barrier (threading.BrokenBarrierError) rather than hanging the others."""
        shared = _Meeting(len(columns), timeout)
        return [ThreadCollective(rank, columns, shared) for rank in range(len(columns))]

    def all_sum(self, part: np.ndarray) -> np.ndarray:
        shared = self._shared
        shared.parts[self.rank] = np.asarray(part)
        shared.barrier.wait()  # every part is in
        total = shared.parts[0].copy()
        for other in shared.parts[1:]:
            total += other
        shared.barrier.wait()  # everyone has read: the slots may be reused
        return total


class _Meeting:
    """The slots and barrier a ThreadCollective group shares."""

    def __init__(self, size: int, timeout: float) -> None:
        self.parts: list[np.ndarray] = [np.zeros(0)] * size
        self.barrier = threading.Barrier(size, timeout=timeout)


_CURRENT: ContextVar[Collective | None] = ContextVar("byzps_collective", default=None)


@contextmanager
def sharded(collective: Collective) -> Iterator[None]:
    """Run the enclosed aggregations as `collective`'s shard (inputs: its columns only)."""
    token = _CURRENT.set(collective)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def all_sum(part: np.ndarray) -> np.ndarray:
    """`part` summed over the shards (itself when not sharded)."""
    collective = _CURRENT.get()
    return part if collective is None else collective.all_sum(part)


def total_columns(local: int) -> int:
    """The global d of inputs with `local` columns here."""
    collective = _CURRENT.get()
    return local if collective is None else collective.total


def local_columns(columns: np.ndarray, local: int) -> np.ndarray:
    """Of the sorted global `columns`, those this shard holds, as indices into its `local`
    columns (all of them when not sharded)."""
    collective = _CURRENT.get()
    if collective is None:
        return columns
    start = collective.offset
    mine = columns[(columns >= start) & (columns < start + local)]
    return mine - start
