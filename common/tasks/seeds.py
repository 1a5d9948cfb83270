"""`derive_seed(seed, key, worker, round)` for many workers at once, bit-identical and fast.

Every worker's mini-batch of round t is keyed by `derive_seed(seed, "batch", worker, t)`, so a
worker daemon (w = 1) and the simulator (w = n) draw the very same batches. Calling `derive_seed`
per worker costs ~10 µs (NumPy's SeedSequence), which for w = 20 would dominate a simulator round.
SeedSequence absorbs its entropy words one after another, so the pool after the fixed prefix
(seed, key, worker) can be computed once; each round then only mixes the round's words into the
cached pools, vectorised over workers. `tests/test_tasks.py` checks equality with `derive_seed`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from byzps.common.seeding import _key_int, derive_seed

# Constants of NumPy's SeedSequence (numpy/random/bit_generator.pyx; stable since NumPy 1.17).
_MASK = 0xFFFFFFFF
_INIT_A = 0x43B0D7E5
_MULT_A = 0x931E8875
_INIT_B = 0x8B51F9DD
_MULT_B = 0x58F38DED
_MIX_MULT_L = 0xCA01F9DD
_MIX_MULT_R = 0x4973F715
_POOL_SIZE = 4


def _words(value: int) -> list[int]:
    """The little-endian uint32 words SeedSequence makes of a non-negative int (0 → [0])."""
    out = [value & _MASK]
    value >>= 32
    while value:
        out.append(value & _MASK)
        value >>= 32
    return out


class KeyedSeeds:
    """`[derive_seed(seed, key, w, round) for w in workers]` as a function of `round`."""

    def __init__(self, seed: int, key: int | str, workers: Sequence[int]) -> None:
        if any(w < 0 or w > _MASK for w in workers):
            raise ValueError("worker ids must lie in [0, 2**32)")
        prefix = [_key_int(seed), _key_int(key)]
        n_words = sum(len(_words(k)) for k in prefix) + 1
        # With fewer than 4 prefix words the round would land in the pool's initial fill, so
        # there is nothing to cache: fall back to derive_seed (never the case for a string key).
        self._fallback = (seed, key, list(workers)) if n_words < _POOL_SIZE else None
        # Pools after the prefix words (>= 4 words, so later words take the "extra entropy" path).
        self._pools = np.stack(
            [np.random.SeedSequence([*prefix, w]).pool for w in workers], axis=1
        ).astype(np.uint32)  # (4, w)
        hashmix_calls = _POOL_SIZE + _POOL_SIZE * (_POOL_SIZE - 1) + _POOL_SIZE * (n_words - 4)
        self._hash_const = (_INIT_A * pow(_MULT_A, hashmix_calls, 1 << 32)) & _MASK

    def __call__(self, round: int) -> list[int]:
        if round < 0:
            raise ValueError(f"round must be non-negative, got {round}")
        if self._fallback is not None:
            seed, key, workers = self._fallback
            return [derive_seed(seed, key, w, round) for w in workers]
        pool = self._pools
        hash_const = self._hash_const
        for word in _words(round):
            mixed = np.empty(_POOL_SIZE, dtype=np.uint32)
            for dst in range(_POOL_SIZE):  # hashmix(word) is the same for every worker
                value = word ^ hash_const
                hash_const = (hash_const * _MULT_A) & _MASK
                value = (value * hash_const) & _MASK
                mixed[dst] = value ^ (value >> 16)
            pool = _MIX_MULT_L * pool - _MIX_MULT_R * mixed[:, None]
            pool ^= pool >> np.uint32(16)
        out = []
        hash_const = _INIT_B
        for i in range(2):  # generate_state(1, uint64) = two uint32 words
            value = pool[i] ^ np.uint32(hash_const)
            hash_const = (hash_const * _MULT_B) & _MASK
            value = value * np.uint32(hash_const)
            out.append((value ^ (value >> np.uint32(16))).astype(np.uint64))
        return ((out[0] | (out[1] << np.uint64(32))) >> np.uint64(1)).tolist()
