"""The passes that ask for their next reads ahead (`common/_prefetch.py`) compile the hint and
read exactly what the plain loops read, at every length around the prefetch distance and up to
the last entry of their arrays. (The band on some columns is checked the same way in
`tests/test_incremental.py::test_a_band_read_at_some_columns_is_the_full_bands_entries`.)"""

from __future__ import annotations

import numpy as np
import pytest
from numba import njit

from byzps.common import _state_kernels
from byzps.common._prefetch import AHEAD
from byzps.common.aggregators import _kernels, ops

LENGTHS = (0, 1, AHEAD - 1, AHEAD, AHEAD + 1, 3 * AHEAD + 7)


def columns_to_the_end(rng: np.random.Generator, d: int, count: int) -> np.ndarray:
    """`count` sorted distinct columns of [0, d), the last one among them when count > 0."""
    if count == 0:
        return np.empty(0, np.int64)
    rest = rng.choice(d - 1, count - 1, replace=False)
    return np.sort(np.append(rest, d - 1)).astype(np.int64)


@pytest.mark.parametrize("count", LENGTHS)
def test_the_rewrite_of_g_hat_is_the_plain_one(count: int) -> None:
    rng = np.random.default_rng(count)
    d = 4 * AHEAD + 11
    old = rng.integers(-5, 5, d).astype(np.int32)
    columns = columns_to_the_end(rng, d, count)
    new = old[columns].copy()
    new[::2] += 1
    aggregate = old.copy()
    indices, changed = _state_kernels.rewrite_columns(aggregate, columns, new)
    expected = old.copy()
    expected[columns] = new
    assert aggregate.tobytes() == expected.tobytes()
    differ = old[columns] != new
    assert indices.tolist() == columns[differ].tolist()
    assert changed.tolist() == new[differ].tolist()


@pytest.mark.parametrize("count", LENGTHS)
def test_the_scatter_into_rows_is_the_plain_one(count: int) -> None:
    """Repeated indices included: each add lands in order, as the torch path adds them."""
    rng = np.random.default_rng(count + 1)
    d, n = 4 * AHEAD + 11, 3
    target = rng.standard_normal((n, d)).astype(np.float32)
    indices = np.stack([np.sort(rng.integers(0, d, count)) for _ in range(n)]).astype(np.int64)
    if count:
        indices[:, -1] = d - 1
    values = rng.standard_normal((n, count)).astype(np.float32)
    expected = target.copy()
    for i in range(n):
        for j in range(count):
            expected[i, indices[i, j]] += values[i, j]
    rows = np.arange(n)
    serial, parallel = target.copy(), target.copy()
    _state_kernels.scatter_add_rows(serial, rows, indices, values)
    _state_kernels.scatter_add_distinct_rows(parallel, rows, indices, values)
    assert serial.tobytes() == expected.tobytes()
    assert parallel.tobytes() == expected.tobytes()


def test_the_passes_compile_the_hint() -> None:
    """The hint is in the compiled code (a numba or LLVM change that dropped it would leave
    the passes correct but as slow as before, and no other test would notice). Cached code
    cannot be inspected, so each pass's function is compiled afresh here, uncached."""
    x = np.zeros((3, 10), np.float32)
    columns = np.arange(10, dtype=np.int64)
    network = ops.window_network(3, 1, 2, 0)
    calls = (
        (_kernels.band_mean_columns_serial, (x, columns, network, 1, 2, 0, 16, x[0].copy())),
        (_state_kernels.rewrite_columns, (np.zeros(10, np.int32), columns, np.ones(10, np.int32))),
        (_state_kernels._add_into_row, (x[0].copy(), columns, np.ones(10, np.float32))),
        (_kernels._weighted_columns, (x, columns, np.ones(3), 0, 10, np.empty(10))),
    )
    for kernel, args in calls:
        fresh = njit(cache=False)(kernel.py_func)
        fresh(*args)
        assert any("llvm.prefetch" in ir for ir in fresh.inspect_llvm().values()), kernel
