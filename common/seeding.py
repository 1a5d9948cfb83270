"""Deterministic randomness derived from one run seed.

Every random choice in byzps (mini-batches, Rand-k coordinates, bucketing permutations, attack
noise, shared coin flips) is keyed by the run seed plus names such as a worker id and a round
number. Keying by position, not by draw order, is what lets a restarted process, the server and the
simulator reproduce exactly the same draws without replaying history.
"""

from __future__ import annotations

import functools
import hashlib

import numpy as np
import torch

from byzps.common._seed_kernels import seed_state_63


def _key_int(key: int | str) -> int:
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"seed keys must be non-negative, got {key}")
        return key
    return _name_int(key)


@functools.lru_cache(maxsize=4096)
def _name_int(name: str) -> int:
    """A string key's integer: a handful of names ("randk", "page", ...) recur every round."""
    return int.from_bytes(hashlib.blake2b(name.encode(), digest_size=8).digest(), "little")


def _words(values: list[int]) -> np.ndarray:
    """The little-endian 32-bit words NumPy's SeedSequence makes of a list of non-negative ints
    (0 is one zero word), as uint64 for the compiled hash."""
    words = []
    for value in values:
        words.append(value & 0xFFFFFFFF)
        value >>= 32
        while value:
            words.append(value & 0xFFFFFFFF)
            value >>= 32
    return np.array(words, dtype=np.uint64)


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that depends on `seed` and every key, in order: the first 64 bits of
    `np.random.SeedSequence([seed, *keys]).generate_state`, shifted right by one (computed by
    `_seed_kernels.seed_state_63`, bit for bit NumPy's, at a seventh of its cost)."""
    return int(seed_state_63(_words([_key_int(seed), *(_key_int(k) for k in keys)])))


def generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from `derive_seed(seed, *keys)`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def uniform(seed: int, *keys: int | str) -> float:
    """One U[0, 1) draw that is a pure function of its keys (shared coin flips)."""
    return derive_seed(seed, *keys) / float(2**63)


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(z: np.ndarray) -> np.ndarray:
    """The SplitMix64 finaliser (Steele, Lea & Flood 2014), elementwise on uint64 arrays.

    It is a bijective mixer with full avalanche, so hashing consecutive counters gives a stream of
    independent-looking 64-bit words; uint64 array arithmetic wraps by definition in NumPy.
    """
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def keyed_randint(keys: np.ndarray, counter: int, count: int, highs: np.ndarray) -> np.ndarray:
    """(len(keys), count) int64 draws, row i uniform on [0, highs[i]).

    Row i is positions counter·count … counter·count + count − 1 of the SplitMix64 stream seeded
    by keys[i]: a pure function of (key, counter), vectorised over rows. It replaces one
    torch.Generator per worker and round, whose seeding cost dominated a simulator round. The
    modulo bias is below highs / 2**64, negligible for shard sizes.
    """
    if counter < 0:
        raise ValueError(f"counter must be non-negative, got {counter}")
    steps = np.arange(1, count + 1, dtype=np.uint64) + np.uint64(counter) * np.uint64(count)
    words = splitmix64(keys.astype(np.uint64)[:, None] + steps[None, :] * _GOLDEN)
    return (words % highs.astype(np.uint64)[:, None]).astype(np.int64)
