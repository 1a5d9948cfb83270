"""The first k entries of `torch.randperm(d, generator=g)` in O(k), without the other d − k.

Why: Rand-k's coordinates are the head of a seeded permutation, and a server regenerates them
from the seed in every message to check it. torch builds the whole permutation to give its head:
250 ms at d = 10⁷ for a 100-byte message, which a Byzantine worker could send again and again
with a seed that does not match its indices, each one refused only after that work (measured:
honest rounds at d = 10⁶ went from 59 to 201 ms under such a flood). Here the cost is O(k), in
proportion to the message it checks; and every honest worker's own Rand-k draw gets as cheap.

How: on the CPU, for d below 2³²/20, torch draws the permutation by a forward Fisher–Yates
shuffle — for i = 0 … d − 2: z = random() mod (d − i), swap entries i and i + z — where random()
is the generator's next 32-bit Mersenne Twister output (seeded by the low 32 bits of the seed,
MT19937's `init_genrand`). Entry i is final once step i has run, so the first k steps give the
head, and they touch at most 2k entries: a small hash table holds the entries moved so far, the
rest still hold their own index. NumPy's legacy `RandomState` is the same generator and the same
seeding, so it supplies the draws. This is torch's implementation, not its documented contract:
`head_matches_torch` compares the two once per process and `randperm_head` falls back to torch if
they ever differ (another torch version), so the indices are torch's either way.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from numba import njit
from torch import Tensor

#: torch's CPU randperm takes 32-bit draws below this d (`randperm_cpu`: n < UINT32_MAX / 20);
#: beyond it, 64-bit ones, which this module does not reproduce.
LARGEST_DIM = 0xFFFFFFFF // 20 - 1
#: Heads longer than dim / HEAD_SHARE come from torch's whole permutation: past it, the table of
#: moved entries (16 bytes × 4k) is the slower of the two (d = 10⁷: a head of d/8 took 0.49 of
#: torch's time, d/4 took 1.39 of it, and all of it 12×, at 1.7 GB).
HEAD_SHARE = 8
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


@njit(cache=True)
def _shuffle_head(draws, dim, out):  # pragma: no cover - compiled
    """out[i] = entry i of the permutation of range(dim) that the forward Fisher–Yates shuffle
    with these 32-bit draws makes, for i < len(out) = len(draws). Moved entries live in an
    open-addressing table (keys: positions, -1 empty) of at least 4 × len(out) slots."""
    k = out.shape[0]
    size = 1
    while size < 4 * k:
        size *= 2
    shift = np.uint64(64 - int(np.log2(size))) if size > 1 else np.uint64(63)
    keys = np.full(size, -1, np.int64)
    values = np.empty(size, np.int64)
    mask = size - 1
    for i in range(k):
        j = i + np.int64(draws[i] % np.uint64(dim - i))
        # the value at i (moved there by an earlier swap, or i itself)
        slot = np.int64((np.uint64(i) * _GOLDEN) >> shift) & mask
        value_i = i
        while keys[slot] != -1:
            if keys[slot] == i:
                value_i = values[slot]
                break
            slot = (slot + 1) & mask
        # the value at j, replaced by the value at i (position i is never read again)
        slot = np.int64((np.uint64(j) * _GOLDEN) >> shift) & mask
        while keys[slot] != -1 and keys[slot] != j:
            slot = (slot + 1) & mask
        value_j = values[slot] if keys[slot] == j else j
        keys[slot] = j
        values[slot] = value_i
        out[i] = value_j


def _head(dim: int, k: int, seed: int) -> np.ndarray:
    draws = np.random.RandomState(int(seed) & 0xFFFFFFFF).randint(0, 2**32, size=k, dtype=np.uint32)
    out = np.empty(k, np.int64)
    _shuffle_head(draws.astype(np.uint64), dim, out)
    return out


def _torch_head(dim: int, k: int, seed: int) -> Tensor:
    generator = torch.Generator(device="cpu")
    generator.manual_seed(int(seed))
    return torch.randperm(dim, generator=generator)[:k]


@functools.cache
def head_matches_torch() -> bool:
    """Whether this process's torch draws its permutations as `_shuffle_head` does: checked
    once, on a few seeds, dimensions and head lengths (ends included)."""
    cases = [(1, 1, 0), (2, 2, 7), (97, 13, 2**40 + 3), (1000, 1000, 5), (4099, 64, 2**63 - 1)]
    return all(
        np.array_equal(_head(dim, k, seed), _torch_head(dim, k, seed).numpy())
        for dim, k, seed in cases
    )


def randperm_head(dim: int, k: int, seed: int) -> Tensor:
    """`torch.randperm(dim, generator=<CPU generator seeded with seed>)[:k]` (int64), in O(k)
    where this torch's draws are reproduced (`head_matches_torch`) and k is at most
    dim / HEAD_SHARE, else by torch itself (in O(dim), which k is then a fair share of)."""
    if not 0 <= k <= dim:
        raise ValueError(f"k must be in [0, {dim}], got {k}")
    if dim > LARGEST_DIM or k > dim // HEAD_SHARE or not head_matches_torch():
        return _torch_head(dim, k, seed)
    return torch.from_numpy(_head(dim, k, seed))
