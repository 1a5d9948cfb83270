"""Deterministic randomness derived from one run seed.

Every random choice in byzps (mini-batches, Rand-k coordinates, bucketing permutations, attack
noise, shared coin flips) is keyed by the run seed plus names such as a worker id and a round
number. Keying by position, not by draw order, is what lets a restarted process, the server and the
simulator reproduce exactly the same draws without replaying history.
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch


def _key_int(key: int | str) -> int:
    if isinstance(key, int):
        if key < 0:
            raise ValueError(f"seed keys must be non-negative, got {key}")
        return key
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed that depends on `seed` and every key, in order."""
    seq = np.random.SeedSequence([_key_int(seed), *(_key_int(k) for k in keys)])
    return int(seq.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def generator(seed: int, *keys: int | str, device: str | torch.device = "cpu") -> torch.Generator:
    """A torch generator seeded from `derive_seed(seed, *keys)`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen


def uniform(seed: int, *keys: int | str) -> float:
    """One U[0, 1) draw that is a pure function of its keys (shared coin flips)."""
    return derive_seed(seed, *keys) / float(2**63)
