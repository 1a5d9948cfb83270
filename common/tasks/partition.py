"""Partitioners: labels → disjoint worker shards that together cover the data set.

All schemes are deterministic functions of (labels, num_workers, seed[, alpha]); the randomness
comes from `derive_seed(seed, "partition", scheme)`, so a worker daemon and the simulator given the
same configuration compute the same shards. Every shard is returned sorted (a canonical set of
row indices) and non-empty.

- "iid": shuffle all rows, deal them into n contiguous blocks of equal size (±1).
- "sorted-mix": the authors' heterogeneous split ("each worker's data 50% label-sorted + 50% IID").
  Shuffle all rows; the first ⌊N/2⌋ of the shuffled order are sorted by label (stable, so ties
  keep the shuffled order) and dealt as n contiguous blocks (±1): worker 0 gets the lowest labels,
  worker n−1 the highest; the remaining ⌈N/2⌉ rows are dealt as n contiguous blocks (±1) in
  shuffled order. Worker i's shard is sorted-block i ∪ iid-block i.
- "dirichlet": for every class c (ascending), shuffle its rows and split them among the workers in
  proportions p_c ~ Dir(α·1_n) (cut points ⌊N_c · cumsum(p_c)⌋). Small α → few classes per worker.

With very few rows per worker ("sorted-mix" with N < 2n, or "dirichlet") a worker can be left
empty; every empty worker then takes, in id order, the last row of the currently largest shard.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor

from byzps.common.seeding import derive_seed

Partitioner = Callable[[np.ndarray, int, np.random.Generator, float], list[np.ndarray]]


def _iid(labels: np.ndarray, n: int, rng: np.random.Generator, alpha: float) -> list[np.ndarray]:
    return np.array_split(rng.permutation(labels.size), n)


def _sorted_mix(
    labels: np.ndarray, n: int, rng: np.random.Generator, alpha: float
) -> list[np.ndarray]:
    order = rng.permutation(labels.size)
    half = labels.size // 2
    sorted_half = order[:half][np.argsort(labels[order[:half]], kind="stable")]
    sorted_blocks = np.array_split(sorted_half, n)
    iid_blocks = np.array_split(order[half:], n)
    return [np.concatenate(pair) for pair in zip(sorted_blocks, iid_blocks, strict=True)]


def _dirichlet(
    labels: np.ndarray, n: int, rng: np.random.Generator, alpha: float
) -> list[np.ndarray]:
    if not alpha > 0:
        raise ValueError(f"dirichlet partition needs alpha > 0, got {alpha}")
    parts: list[list[np.ndarray]] = [[] for _ in range(n)]
    for c in np.unique(labels):
        rows = rng.permutation(np.flatnonzero(labels == c))
        proportions = rng.dirichlet(np.full(n, alpha))
        cuts = np.floor(np.cumsum(proportions)[:-1] * rows.size).astype(np.int64)
        for worker, piece in enumerate(np.split(rows, np.minimum(cuts, rows.size))):
            parts[worker].append(piece)
    return [np.concatenate(p) for p in parts]


def _fill_empty(shards: list[np.ndarray]) -> list[np.ndarray]:
    """Give every empty shard the last row of the currently largest one (needs N >= n)."""
    for worker in range(len(shards)):
        if shards[worker].size == 0:
            donor = int(np.argmax([s.size for s in shards]))
            shards[worker], shards[donor] = shards[donor][-1:], shards[donor][:-1]
    return shards


PARTITIONERS: dict[str, Partitioner] = {
    "iid": _iid,
    "sorted-mix": _sorted_mix,
    "dirichlet": _dirichlet,
}


def partition(
    labels: np.ndarray | Tensor,
    num_workers: int,
    *,
    scheme: str = "iid",
    seed: int,
    alpha: float = 0.5,
) -> list[Tensor]:
    """Split row indices 0..N−1 among `num_workers` workers by `scheme` (see the module doc).

    Returns one sorted int64 tensor of row indices per worker; disjoint, covering, non-empty.
    `alpha` is used by "dirichlet" only.
    """
    if scheme not in PARTITIONERS:
        raise ValueError(f"unknown split {scheme!r}; known: {', '.join(sorted(PARTITIONERS))}")
    labels_np = labels.numpy() if isinstance(labels, Tensor) else np.asarray(labels)
    labels_np = labels_np.reshape(-1)
    if num_workers < 1:
        raise ValueError(f"num_workers must be >= 1, got {num_workers}")
    if labels_np.size < num_workers:
        raise ValueError(f"cannot split {labels_np.size} examples among {num_workers} workers")
    rng = np.random.default_rng(derive_seed(seed, "partition", scheme))
    shards = _fill_empty(PARTITIONERS[scheme](labels_np, num_workers, rng, alpha))
    return [torch.from_numpy(np.sort(s).astype(np.int64)) for s in shards]
