"""Seeding: keyed derivation is a pure function of its keys; the SplitMix64 stream is the
reference one."""

from __future__ import annotations

import numpy as np
import pytest

from byzps.common.seeding import derive_seed, generator, keyed_randint, splitmix64, uniform


def test_derive_seed_depends_on_every_key_in_order() -> None:
    base = derive_seed(7, "batch", 3, 10)
    assert base == derive_seed(7, "batch", 3, 10)
    assert len({base, derive_seed(8, "batch", 3, 10), derive_seed(7, "batch", 10, 3)}) == 3
    assert 0 <= base < 2**63
    with pytest.raises(ValueError):
        derive_seed(7, -1)


def test_generator_and_uniform_are_keyed() -> None:
    a = generator(1, "x").initial_seed()
    assert a == generator(1, "x").initial_seed() != generator(1, "y").initial_seed()
    draws = [uniform(3, "coin", t) for t in range(2000)]
    assert all(0.0 <= u < 1.0 for u in draws)
    assert abs(np.mean(draws) - 0.5) < 0.03


def test_splitmix64_matches_the_reference_stream() -> None:
    # splitmix64.c (Vigna) seeded with 1234567: the first three outputs.
    golden = 0x9E3779B97F4A7C15
    state = np.array([(1234567 + k * golden) % 2**64 for k in (1, 2, 3)], dtype=np.uint64)
    assert splitmix64(state).tolist() == [
        6457827717110365317,
        3203168211198807973,
        9817491932198370423,
    ]


def test_keyed_randint_rows_are_independent_of_their_neighbours() -> None:
    keys = np.array([11, 22, 33], dtype=np.uint64)
    highs = np.array([5, 1000, 7], dtype=np.int64)
    both = keyed_randint(keys, 4, 6, highs)
    alone = keyed_randint(keys[1:2], 4, 6, highs[1:2])
    assert np.array_equal(both[1], alone[0])
    assert ((both >= 0) & (both < highs[:, None])).all()
    assert not np.array_equal(keyed_randint(keys, 5, 6, highs), both)


def numpy_derive_seed(seed: int, *keys: int | str) -> int:
    """The definition `derive_seed` compiles: NumPy's SeedSequence over the keys' integers."""
    import hashlib

    def key_int(key: int | str) -> int:
        if isinstance(key, int):
            return key
        return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")

    sequence = np.random.SeedSequence([key_int(seed), *(key_int(k) for k in keys)])
    return int(sequence.generate_state(1, dtype=np.uint64)[0] >> np.uint64(1))


def test_derive_seed_is_numpys_seed_sequence_bit_for_bit() -> None:
    """Random key lists of 1–8 keys: zeros, 32-bit boundaries, multi-word ints (2**64 and past,
    which NumPy splits into several words), names; the pool's 4 words filled and overflowed."""
    rng = np.random.default_rng(0)
    special = [0, 1, 2**31, 2**32 - 1, 2**32, 2**63 - 1, 2**64 - 1, 2**64, 2**100 + 7]
    for _ in range(3000):
        keys: list[int | str] = []
        for _ in range(int(rng.integers(1, 9))):
            kind = int(rng.integers(0, 4))
            if kind == 0:
                keys.append(special[int(rng.integers(0, len(special)))])
            elif kind == 1:
                keys.append(int(rng.integers(0, 2**63 - 1)))
            elif kind == 2:
                keys.append(int(rng.integers(0, 1000)))
            else:
                keys.append(["randk", "page", "marina", "batches", ""][int(rng.integers(0, 5))])
        seed = keys.pop(0) if isinstance(keys[0], int) else 0
        assert derive_seed(seed, *keys) == numpy_derive_seed(seed, *keys), (seed, keys)


def test_derive_seed_refuses_negative_keys() -> None:
    with pytest.raises(ValueError, match="non-negative"):
        derive_seed(1, -3)
