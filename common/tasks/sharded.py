"""What every data-parallel task shares: the worker shards and the per-worker oracle plumbing."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from byzps.common.tasks.base import Task
from byzps.common.tasks.partition import partition
from byzps.common.tasks.sampling import ShardBatches


class ShardedTask(Task):
    """A Task whose training rows are split among `num_workers` workers by a partitioner.

    Subclasses hold the data; this base computes the shards (`split`, `alpha`, keyed by `seed`),
    validates worker ids, flips labels for the label-flip attack and builds the batch sampler.
    """

    def __init__(
        self,
        train_labels: Tensor,
        *,
        num_workers: int,
        seed: int,
        batch_size: int,
        split: str,
        alpha: float,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.num_workers = num_workers
        self.seed = seed
        self.batch_size = batch_size
        self.split = split
        self.alpha = alpha
        self.shards = partition(train_labels, num_workers, scheme=split, seed=seed, alpha=alpha)

    def worker_shards(self, workers: Sequence[int]) -> list[Tensor]:
        """The shards of `workers` (distinct ids in [0, num_workers)), in the given order."""
        ids = list(workers)
        if not ids:
            raise ValueError("an oracle needs at least one worker id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be distinct, got {ids}")
        bad = [i for i in ids if not 0 <= i < self.num_workers]
        if bad:
            raise ValueError(f"worker id {bad[0]} outside [0, {self.num_workers})")
        return [self.shards[i] for i in ids]

    def flipped(self, labels: Tensor) -> Tensor:
        """Labels after the label-flip attack: y → (C − 1) − y (binary: 1 − y)."""
        return (self.num_classes - 1) - labels

    def sampler(self, workers: Sequence[int], seed: int) -> ShardBatches:
        return ShardBatches(self.worker_shards(workers), list(workers), seed, self.batch_size)
