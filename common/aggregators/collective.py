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
connects S threads of one process; `ColumnSharded` runs one rule as S such shards (the
simulator's cluster.shards); byzps.server.shard_peer.WireCollective is the same `all_sum`
between shard servers, adding the parts in the same order, so all three give the same bits.
"""

from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators.base import Aggregator


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

    def abort(self) -> None:
        """Break the group's barrier: every shard waiting in (or entering) `all_sum` raises
        threading.BrokenBarrierError instead of waiting out the timeout."""
        self._shared.barrier.abort()


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


class ColumnSharded(Aggregator):
    """One rule run as S column shards in S threads: each shard's own instance of the rule (its
    own state, e.g. cclip's centre for its columns) aggregates its contiguous columns, with the
    column reductions summed through a ThreadCollective — the arithmetic of a sharded server
    with these `widths`, in one process.

    Why: `byzps simulate` honours cluster.shards with it, so a simulated run and a sharded
    cluster run agree the way an unsharded pair does, and shard effects (the Gram summed over
    shards) can be studied without processes. The verdict is shard 0's (every shard takes the
    same decisions)."""

    def __init__(self, build: Callable[[], Aggregator], widths: Sequence[int]) -> None:
        self.shards = [build() for _ in widths]
        first = self.shards[0]
        super().__init__(first.f)
        self.name = first.name  # type: ignore[misc]
        self.coordinatewise = first.coordinatewise  # type: ignore[misc]
        self.widths = [int(w) for w in widths]
        self._bounds = np.concatenate([[0], np.cumsum(self.widths)])
        self._pool = ThreadPoolExecutor(len(self.widths), thread_name_prefix="shard")

    def __call__(self, x: Tensor) -> Tensor:
        if x.shape[1] != self._bounds[-1]:
            raise ValueError(f"{x.shape[1]} columns for shards of {self.widths}")
        group = ThreadCollective.group(self.widths)

        def shard(rank: int) -> Tensor:
            lo, hi = self._bounds[rank], self._bounds[rank + 1]
            try:
                with sharded(group[rank]):
                    return self.shards[rank](x[:, lo:hi].contiguous())
            except BaseException:
                group[rank].abort()  # the others stop waiting for this shard at once
                raise

        futures = [self._pool.submit(shard, rank) for rank in range(len(self.widths))]
        errors = [e for e in (f.exception() for f in futures) if e is not None]
        if errors:  # the shard that failed first, not the ones its abort broke off
            broken = threading.BrokenBarrierError
            raise next((e for e in errors if not isinstance(e, broken)), errors[0])
        parts = [future.result() for future in futures]
        self.last_verdict = self.shards[0].last_verdict
        return torch.cat(parts)

    def state_dict(self) -> dict[str, Any]:
        return {"shards": [shard.state_dict() for shard in self.shards]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for shard, part in zip(self.shards, state["shards"], strict=True):
            shard.load_state_dict(part)
