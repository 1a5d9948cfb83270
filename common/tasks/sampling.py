"""Per-worker mini-batch draws, keyed by (seed, worker, round) so any process reproduces them."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from byzps.common.tasks.seeds import KeyedSeeds


class ShardBatches:
    """Draws `batch_size` rows per worker from its own shard, uniformly with replacement.

    Worker i's rows of round t come from a torch.Generator seeded with
    `derive_seed(seed, "batch", i, t)`, so the draw depends on neither the other workers in the
    same oracle nor on earlier rounds: `sample(t)` is a pure function of (seed, t). The batch is a
    (w, batch_size) int64 tensor of global row indices into the task's training data.
    """

    def __init__(
        self, shards: Sequence[Tensor], worker_ids: Sequence[int], seed: int, batch_size: int
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(shards) != len(worker_ids) or not shards:
            raise ValueError("need one non-empty list of shards, one per worker id")
        self.batch_size = batch_size
        self._sizes = [int(s.numel()) for s in shards]
        self._flat = torch.cat([s.to(torch.int64) for s in shards])
        starts = torch.tensor([0, *self._sizes[:-1]], dtype=torch.int64).cumsum(0)
        self._starts = starts.unsqueeze(1)  # (w, 1)
        self._seeds = KeyedSeeds(seed, "batch", worker_ids)
        self._gen = torch.Generator()

    def sample(self, round: int) -> Tensor:
        positions = torch.empty(len(self._sizes), self.batch_size, dtype=torch.int64)
        for row, (size, worker_seed) in enumerate(
            zip(self._sizes, self._seeds(round), strict=True)
        ):
            self._gen.manual_seed(worker_seed)
            torch.randint(size, (self.batch_size,), generator=self._gen, out=positions[row])
        return self._flat[positions.add_(self._starts)]
