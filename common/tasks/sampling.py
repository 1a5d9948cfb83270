"""Per-worker mini-batch draws, keyed by (seed, worker, round) so any process reproduces them."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

from byzps.common.seeding import derive_seed, keyed_randint


class ShardBatches:
    """Draws `batch_size` rows per worker from its own shard, uniformly with replacement.

    Worker i's rows of round t are positions of a counter-based stream keyed by
    `derive_seed(seed, "batch", i)` at counter t (byzps.common.seeding.keyed_randint), so the draw
    depends on neither the other workers in the same oracle nor on earlier rounds: `sample(t)` is
    a pure function of (seed, t), and a worker daemon (w = 1) draws exactly the rows the
    simulator (w = n) draws for it. The batch is a (w, batch_size) int64 tensor of global row
    indices into the task's training data.
    """

    def __init__(
        self, shards: Sequence[Tensor], worker_ids: Sequence[int], seed: int, batch_size: int
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(shards) != len(worker_ids) or not shards:
            raise ValueError("need one non-empty list of shards, one per worker id")
        self.batch_size = batch_size
        sizes = [int(s.numel()) for s in shards]
        self._sizes = np.array(sizes, dtype=np.int64)
        self._flat = torch.cat([s.to(torch.int64) for s in shards])
        self._starts = torch.tensor([0, *sizes[:-1]], dtype=torch.int64).cumsum(0).unsqueeze(1)
        self._keys = np.array([derive_seed(seed, "batch", w) for w in worker_ids], dtype=np.uint64)

    def sample(self, round: int) -> Tensor:
        positions = torch.from_numpy(keyed_randint(self._keys, round, self.batch_size, self._sizes))
        return self._flat[positions.add_(self._starts)]
