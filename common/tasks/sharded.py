"""What every data-parallel task shares: the worker shards and the per-worker oracle plumbing."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor

from byzps.common.tasks.base import Task
from byzps.common.tasks.partition import partition
from byzps.common.tasks.sampling import Batches, shard_batches
from byzps.common.tasks.spec import DataSpec


class ShardedTask(Task):
    """A Task whose training rows are split among the workers by a partitioner.

    Subclasses hold the data; this base computes the shards from the `DataSpec` (`split`,
    `alpha`, keyed by `seed`, over all n ids or the h honest ones: `shards` holds
    `data.shard_count` parts), maps worker ids to them (`data.shard_of`), validates worker ids,
    flips labels for the label-flip attack and builds the batch sampler (`data.sampling`).
    """

    def __init__(self, train_labels: Tensor, data: DataSpec) -> None:
        self.data = data
        self.num_workers = data.num_workers
        self.batch_size = data.batch_size
        self.shards = partition(
            train_labels, data.shard_count, scheme=data.split, seed=data.seed, alpha=data.alpha
        )

    def worker_shards(self, workers: Sequence[int]) -> list[Tensor]:
        """The shards of `workers` (distinct ids in [0, num_workers)), in the given order."""
        ids = list(workers)
        if not ids:
            raise ValueError("an oracle needs at least one worker id")
        if len(set(ids)) != len(ids):
            raise ValueError(f"worker ids must be distinct, got {ids}")
        return [self.shards[self.data.shard_of(i)] for i in ids]

    def flipped(self, labels: Tensor) -> Tensor:
        """Labels after the label-flip attack: y → (C − 1) − y (binary: 1 − y)."""
        return (self.num_classes - 1) - labels

    def sampler(self, workers: Sequence[int], seed: int) -> Batches:
        return shard_batches(
            self.data.sampling, self.worker_shards(workers), list(workers), seed, self.batch_size
        )
