"""Per-worker mini-batch draws, keyed by (seed, worker, round) so any process reproduces them.

Two ways to draw (`task.sampling`): "replace" (`ShardBatches`, uniform with replacement) and
"shuffle" (`ShuffledShardBatches`, a pass through a reshuffled permutation of the shard). Both
make `sample(t)` a pure function of (seed, worker, t): the draw depends neither on the other
workers in the same oracle nor on the rounds drawn before, so a worker daemon (w = 1) restarted at
any round draws exactly the rows the simulator (w = n) draws for it. A batch is a (w, batch_size)
int64 tensor of global row indices into the task's training data.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from byzps.common.seeding import derive_seed, keyed_randint


class Batches(ABC):
    """A sampler over the workers' shards: what both kinds share (shards, sizes, checks)."""

    def __init__(
        self,
        shards: Sequence[Tensor],
        worker_ids: Sequence[int],
        seed: int | Sequence[int],
        batch_size: int,
    ) -> None:
        """`seed`: the run seed, or one per row when the rows belong to several runs (a batched
        simulation stacks the workers of R runs into one sampler; `stack`)."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(shards) != len(worker_ids) or not shards:
            raise ValueError("need one non-empty list of shards, one per worker id")
        seeds = [seed] * len(shards) if isinstance(seed, int) else [int(s) for s in seed]
        if len(seeds) != len(shards):
            raise ValueError(f"seed: {len(seeds)} seeds for {len(shards)} rows")
        self.batch_size = batch_size
        self.seeds = seeds
        self.worker_ids = [int(w) for w in worker_ids]
        self._shards = [s.to(torch.int64) for s in shards]
        self._sizes = np.array([int(s.numel()) for s in shards], dtype=np.int64)

    @classmethod
    def stack(cls, samplers: Sequence[Batches]) -> Batches:
        """One sampler over the rows of `samplers` (same kind and batch size), in order: row i
        draws exactly what it drew in its own sampler, since a draw is keyed by (seed, worker,
        round) alone."""
        kinds = {type(s) for s in samplers}
        if len(kinds) != 1 or len({s.batch_size for s in samplers}) != 1:
            raise ValueError("stacked samplers must share their kind and batch size")
        return kinds.pop()(
            [shard for s in samplers for shard in s._shards],
            [w for s in samplers for w in s.worker_ids],
            [seed for s in samplers for seed in s.seeds],
            samplers[0].batch_size,
        )

    @abstractmethod
    def sample(self, round: int) -> Tensor:
        """The (w, batch_size) global row indices of round `round`."""


class ShardBatches(Batches):
    """Draws `batch_size` rows per worker from its own shard, uniformly with replacement.

    Worker i's rows of round t are positions of a counter-based stream keyed by
    `derive_seed(seed, "batch", i)` at counter t (byzps.common.seeding.keyed_randint).
    """

    def __init__(
        self,
        shards: Sequence[Tensor],
        worker_ids: Sequence[int],
        seed: int | Sequence[int],
        batch_size: int,
    ) -> None:
        super().__init__(shards, worker_ids, seed, batch_size)
        self._flat = torch.cat(self._shards)
        starts = np.concatenate([[0], np.cumsum(self._sizes)[:-1]])
        self._starts = torch.from_numpy(starts).unsqueeze(1)
        self._keys = np.array(
            [derive_seed(s, "batch", w) for s, w in zip(self.seeds, self.worker_ids, strict=True)],
            dtype=np.uint64,
        )

    def sample(self, round: int) -> Tensor:
        positions = torch.from_numpy(keyed_randint(self._keys, round, self.batch_size, self._sizes))
        return self._flat[positions.add_(self._starts)]


class ShuffledShardBatches(Batches):
    """Walks every worker's shard without replacement, in an order reshuffled at every pass.

    Worker i with a shard of m rows reads the infinite sequence π_0, π_1, … where π_e is the
    permutation of its shard for epoch (pass) e, drawn from `derive_seed(seed, "shuffle", i, e)`.
    Round t takes positions t·b … t·b + b − 1 of that sequence: position p is row π_e[p mod m]
    of epoch e = ⌊p / m⌋, so a batch that straddles a pass takes the tail of epoch e and the head
    of e + 1, and every row is drawn exactly once per pass. The permutation of each worker's
    current epoch is cached (one (w, max m) table), so a round is one gather until a worker
    starts a new pass; any round, in any order, recomputes what it needs from the keys alone.
    """

    def __init__(
        self,
        shards: Sequence[Tensor],
        worker_ids: Sequence[int],
        seed: int | Sequence[int],
        batch_size: int,
    ) -> None:
        super().__init__(shards, worker_ids, seed, batch_size)
        self._table = torch.zeros((len(self._shards), int(self._sizes.max())), dtype=torch.int64)
        self._epoch = np.full(len(self._shards), -1, dtype=np.int64)

    def epoch_rows(self, row: int, epoch: int) -> Tensor:
        """The global row indices of worker row `row`'s shard in epoch `epoch`'s order."""
        key = derive_seed(self.seeds[row], "shuffle", self.worker_ids[row], epoch)
        order = np.random.default_rng(key).permutation(int(self._sizes[row]))
        return self._shards[row][torch.from_numpy(order)]

    def sample(self, round: int) -> Tensor:
        if round < 0:
            raise ValueError(f"round must be non-negative, got {round}")
        first = round * self.batch_size
        positions = np.arange(first, first + self.batch_size, dtype=np.int64)
        epochs = positions[None, :] // self._sizes[:, None]  # (w, b)
        offsets = positions[None, :] % self._sizes[:, None]
        batch = self._table.gather(1, torch.from_numpy(offsets))
        for row in np.flatnonzero((epochs != self._epoch[:, None]).any(axis=1)):
            latest = None
            for epoch in np.unique(epochs[row]):
                if epoch == self._epoch[row]:
                    continue  # gathered from the table already
                latest, rows = int(epoch), self.epoch_rows(int(row), int(epoch))
                here = epochs[row] == epoch
                batch[row, torch.from_numpy(here)] = rows[torch.from_numpy(offsets[row][here])]
            if latest == epochs[row, -1]:  # cache the pass this batch ends in
                self._table[row, : rows.numel()] = rows
                self._epoch[row] = latest
        return batch


SAMPLERS: dict[str, type[Batches]] = {"replace": ShardBatches, "shuffle": ShuffledShardBatches}


def shard_batches(
    sampling: str,
    shards: Sequence[Tensor],
    worker_ids: Sequence[int],
    seed: int | Sequence[int],
    batch_size: int,
) -> Batches:
    """The sampler named `sampling` ("replace" or "shuffle") over the workers' shards."""
    try:
        sampler = SAMPLERS[sampling]
    except KeyError:
        raise ValueError(
            f"sampling must be one of {', '.join(SAMPLERS)}, got {sampling!r}"
        ) from None
    return sampler(shards, worker_ids, seed, batch_size)
