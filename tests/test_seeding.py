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
