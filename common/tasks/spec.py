"""The data spec: how a task's training rows are dealt to the run's workers and drawn each round.

Every task constructor takes one `DataSpec` (the `data` argument the builders supply) instead of
repeating the split keywords, so a new option reaches every task, the simulator, the worker
daemons and the cohort through one object built in one place (`build_run_task`).
"""

from __future__ import annotations

from dataclasses import dataclass

#: How a worker draws its mini-batch of a round from its shard (`task.sampling`).
SAMPLINGS = ("replace", "shuffle")
#: Which workers the training rows are split over (`task.split_over`).
SPLIT_OVERS = ("all", "honest")


@dataclass(frozen=True)
class DataSpec:
    """The workers, the seed and how the data is split among them and sampled.

    - `num_workers` n: every worker id, honest and Byzantine (0 … n − 1).
    - `seed` keys the partition (and, through the oracle's seed, the mini-batches).
    - `batch_size` rows per worker and gradient evaluation.
    - `split`, `alpha`: the partitioner and its Dirichlet concentration (partition.py).
    - `sampling`: "replace" draws rows uniformly with replacement; "shuffle" walks a permutation
      of the shard, reshuffled at every pass (sampling.py). Both are pure functions of
      (seed, worker, round).
    - `split_over`: "all" deals the rows to all n ids; "honest" to the h honest ids 0 … h − 1
      only (the authors' protocol: the honest workers then hold the whole data set), and a
      Byzantine id j ≥ h draws from honest shard (j − h) mod h with its own keyed batches (see
      `shard_of`).
    - `honest_workers` h: the honest ids are 0 … h − 1 (byzps's convention); None means all n.
    """

    num_workers: int
    seed: int
    batch_size: int = 1
    split: str = "iid"
    alpha: float = 0.5
    sampling: str = "replace"
    split_over: str = "all"
    honest_workers: int | None = None

    def __post_init__(self) -> None:
        n, h = self.num_workers, self.honest_workers
        checks = (
            (n >= 1, f"num_workers must be >= 1, got {n}"),
            (self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}"),
            (
                self.sampling in SAMPLINGS,
                f"sampling must be one of {', '.join(SAMPLINGS)}, got {self.sampling!r}",
            ),
            (
                self.split_over in SPLIT_OVERS,
                f"split_over must be one of {', '.join(SPLIT_OVERS)}, got {self.split_over!r}",
            ),
            (h is None or 1 <= h <= n, f"honest_workers must be in [1, {n}], got {h}"),
        )
        for ok, message in checks:
            if not ok:
                raise ValueError(message)

    @property
    def honest(self) -> int:
        """h: the number of honest ids (0 … h − 1)."""
        return self.num_workers if self.honest_workers is None else self.honest_workers

    @property
    def shard_count(self) -> int:
        """How many parts the training rows are split into: n, or h under split_over "honest"."""
        return self.honest if self.split_over == "honest" else self.num_workers

    def shard_of(self, worker: int) -> int:
        """The part worker id `worker` (in [0, n)) draws from: its own, or under split_over
        "honest" for a Byzantine id j ≥ h the honest part (j − h) mod h.

        Why honest shards for the Byzantine ids: they have no data of their own under the
        authors' split, yet the cohort's shadows (and label flipping, which trains on flipped
        labels) need rows. Dealing them round-robin over the honest shards gives them the honest
        distribution, as the authors' Byzantine workers have, and a mapping every process
        computes alike from (n, h) alone.
        """
        if not 0 <= worker < self.num_workers:
            raise ValueError(f"worker id {worker} outside [0, {self.num_workers})")
        if worker < self.shard_count:
            return worker
        return (worker - self.honest) % self.shard_count
