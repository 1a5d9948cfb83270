"""NumPy's SeedSequence hash, compiled: `derive_seed` is called for every Rand-k row and shared
coin of every round, and `np.random.SeedSequence` costs ~9 µs a call in object set-up alone
(a third of a Byz-VR-MARINA round on a9a went there). This is the same arithmetic as NumPy's
`SeedSequence(entropy).generate_state(1, np.uint64)` for a pool of 4 words and no spawn key
(numpy/random/bit_generator.pyx: `mix_entropy`, `hashmix`, `mix`, `generate_state`), and a test
compares the two bit for bit on random keys of one to several 32-bit words.
"""

from __future__ import annotations

import numpy as np
from numba import njit

_MASK = 0xFFFFFFFF
_INIT_A, _MULT_A = 0x43B0D7E5, 0x931E8875
_INIT_B, _MULT_B = 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R = 0xCA01F9DD, 0x4973F715
_POOL = 4


@njit(cache=True)
def _hashmix(value, hash_const):  # pragma: no cover - compiled
    """(hashed value, next hash constant), in 32-bit arithmetic held in uint64."""
    mask = np.uint64(_MASK)
    value = (value ^ hash_const) & mask
    hash_const = (hash_const * np.uint64(_MULT_A)) & mask
    value = (value * hash_const) & mask
    return value ^ (value >> np.uint64(16)), hash_const


@njit(cache=True)
def _mix(x, y):  # pragma: no cover - compiled
    result = (np.uint64(_MIX_L) * x - np.uint64(_MIX_R) * y) & np.uint64(_MASK)
    return result ^ (result >> np.uint64(16))


@njit(cache=True)
def seed_state_63(words):  # pragma: no cover - compiled
    """The first uint64 of SeedSequence(entropy).generate_state, shifted right by one (63 bits),
    for entropy given as its little-endian 32-bit words (uint64 array, each < 2**32)."""
    mask = np.uint64(_MASK)
    pool = np.zeros(_POOL, np.uint64)
    hash_const = np.uint64(_INIT_A)
    for i in range(_POOL):
        value = words[i] if i < words.shape[0] else np.uint64(0)
        pool[i], hash_const = _hashmix(value, hash_const)
    for src in range(_POOL):
        for dst in range(_POOL):
            if src != dst:
                hashed, hash_const = _hashmix(pool[src], hash_const)
                pool[dst] = _mix(pool[dst], hashed)
    for src in range(_POOL, words.shape[0]):
        for dst in range(_POOL):
            hashed, hash_const = _hashmix(words[src], hash_const)
            pool[dst] = _mix(pool[dst], hashed)
    hash_const = np.uint64(_INIT_B)
    halves = np.zeros(2, np.uint64)
    for i in range(2):
        value = (pool[i] ^ hash_const) & mask
        hash_const = (hash_const * np.uint64(_MULT_B)) & mask
        value = (value * hash_const) & mask
        halves[i] = value ^ (value >> np.uint64(16))
    return (halves[0] | (halves[1] << np.uint64(32))) >> np.uint64(1)
