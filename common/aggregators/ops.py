"""The data passes, dispatched to numba (CPU float32/float64), to Triton (`band_mean` on a CUDA
GPU, `_triton`) or to plain torch (anything else).

The backends do the same floating-point operations in the same order where that is practical
(`band_mean` and `combine` agree bitwise; the Gram differs in rounding only), so the torch path is
tested on CPU by forcing it with `forced_backend("torch")`, and the GPU against the CPU by
tests/test_gpu.py. The reductions over columns (`centred_gram`, `sq_norms`) are summed over the
shards when the caller is one (`collective`).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from typing import Literal

import numba
import numpy as np
import torch
from torch import Tensor

from byzps.common._state_kernels import within
from byzps.common.aggregators import _kernels, _triton, collective
from byzps.common.aggregators._networks import band_network

Backend = Literal["auto", "numba", "torch"]
_BACKEND: ContextVar[Backend] = ContextVar("byzps_aggregator_backend", default="auto")
_NUMBA_DTYPES = (torch.float32, torch.float64)
#: Columns per step of the torch Gram, bounding its float64 temporaries to ~n · 2^18 · 8 bytes.
_TORCH_GRAM_COLUMNS = 1 << 18
#: Columns per step of the Gram and the mix on a GPU: ~n · 2^22 · 8 bytes of temporaries (0.7 GB
#: at n = 20), few enough steps that their launch overhead stays small at d = 1e8.
_GPU_COLUMNS = 1 << 22


@contextmanager
def forced_backend(backend: Backend) -> Iterator[None]:
    """Run the enclosed aggregations on `backend` ("numba" fails loudly where it cannot run)."""
    token = _BACKEND.set(backend)
    try:
        yield
    finally:
        _BACKEND.reset(token)


@contextmanager
def threads_for(columns: int) -> Iterator[None]:
    """One numba thread for inputs of a single chunk: there is no parallel work to share, and
    waking numba's pool between torch ops makes the two thread pools fight over the cores (seen
    as a 30x slower simulator round on a 2-core machine). The simulator wraps a whole round of a
    small model in it, so the switch is paid once a round, not around each of its kernels
    (their own `threads_for` then finds one thread and does nothing)."""
    previous = numba.get_num_threads()
    if columns > _kernels.CHUNK or previous == 1:
        yield
        return
    numba.set_num_threads(1)
    try:
        yield
    finally:
        numba.set_num_threads(previous)


def _single_chunk(x: Tensor) -> bool:
    """True when `threads_for` would run x's pass on one thread: the serial twins of the
    kernels without reassociation (`_kernels._serial_twin`) then do it, bitwise the same, without
    entering a parallel region."""
    return x.shape[1] <= _kernels.CHUNK


def use_numba(x: Tensor) -> bool:
    backend = _BACKEND.get()
    eligible = x.is_cpu and x.dtype in _NUMBA_DTYPES
    if backend == "numba" and not eligible:
        raise ValueError(f"the numba backend needs a CPU float32/float64 tensor, got {x.dtype}")
    return eligible and backend != "torch"


def band_mean(
    x: Tensor, idx: np.ndarray, wts: np.ndarray, a: int, b: int, slide: int = 0
) -> Tensor:
    """Per coordinate, the mean of ranks a..b-1 among the rows  r_i = Σ_k wts[i,k] x[idx[i,k]];
    with slide > 0, of the window a+s..b+s-1 (0 ≤ s ≤ slide) nearest the median
    (`_kernels.band_mean`).

    An empty `idx` (shape (0, 0)) means the rows are x itself.
    """
    n = idx.shape[0] if idx.shape[0] > 0 else x.shape[0]
    network = window_network(n, a, b, slide)
    exc, rw = complement(x, idx, wts)
    if use_numba(x):
        out = np.empty(x.shape[1], dtype=x.numpy().dtype)
        block = _kernels.block_size(n, x.element_size())
        serial = _single_chunk(x)
        if exc.shape[0] > 0:
            kernel = _kernels.band_mean_complement
            kernel = _kernels.band_mean_complement_serial if serial else kernel
            args = (x.numpy(), idx, wts, exc, rw, network, a, b, slide, block, out)
        else:
            kernel = _kernels.band_mean_serial if serial else _kernels.band_mean
            args = (x.numpy(), idx, wts, network, a, b, slide, block, out)
        with nullcontext() if serial else threads_for(x.shape[1]):
            kernel(*args)
        return torch.from_numpy(out)
    rw_or_none = rw if exc.shape[0] > 0 else None
    gpu_kernel = slide == 0 and _triton.supports(n, x.dtype) and _BACKEND.get() != "torch"
    if x.is_cuda and gpu_kernel and _triton.available():
        rows = x if idx.shape[0] == 0 else _mixed_rows_gpu(x, idx, wts, rw_or_none)
        return _triton.band_mean(rows, network, a, b)
    return _band_mean_torch(x, idx, wts, network, a, b, slide, rw_or_none)


def band_mean_columns(x: Tensor, columns: Tensor, a: int, b: int, slide: int = 0) -> Tensor:
    """`band_mean` of x's raw rows restricted to `columns` (int64 indices into x's columns):
    bitwise band_mean(x)[columns]. The numba kernel reads the columns in place
    (`_kernels.band_mean_columns`); other backends gather them first."""
    if not use_numba(x):
        empty = np.empty((0, 0), np.int64), np.empty((0, 0), np.float64)
        return band_mean(take_columns(x, columns), *empty, a, b, slide)
    cols = _checked_columns(x, columns)
    n = x.shape[0]
    data = x.detach().numpy()
    out = np.empty(cols.shape[0], dtype=data.dtype)
    args = (data, cols, window_network(n, a, b, slide), a, b, slide)
    block = _kernels.block_size(n, x.element_size())
    if cols.shape[0] <= _kernels.CHUNK:
        _kernels.band_mean_columns_serial(*args, block, out)
    else:
        with threads_for(cols.shape[0]):
            _kernels.band_mean_columns(*args, block, out)
    return torch.from_numpy(out)


def combine_columns(x: Tensor, columns: Tensor, weights: np.ndarray) -> Tensor:
    """`combine(x, weights)` restricted to `columns` (int64 indices into x's columns): bitwise
    its entries there. The numba kernel reads the columns in place
    (`_kernels.combine_columns`); other backends gather them first."""
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if not use_numba(x):
        return combine(take_columns(x, columns), weights)
    cols = _checked_columns(x, columns)
    data = x.detach().numpy()
    out = np.empty(cols.shape[0], dtype=data.dtype)
    if cols.shape[0] <= _kernels.CHUNK:
        _kernels.combine_columns_serial(data, cols, weights, out)
    else:
        with threads_for(cols.shape[0]):
            _kernels.combine_columns(data, cols, weights, out)
    return torch.from_numpy(out)


def _checked_columns(x: Tensor, columns: Tensor) -> np.ndarray:
    """`columns` as contiguous int64, or IndexError when one falls outside x's columns (the
    compiled passes do not check their subscripts): the states' own check, `within`."""
    cols = np.ascontiguousarray(columns.numpy(), dtype=np.int64)
    if not within(cols, x.shape[1]):
        raise IndexError(f"a column outside [0, {x.shape[1]})")
    return cols


def take_columns(x: Tensor, columns: Tensor) -> Tensor:
    """x[:, columns] as a new tensor (numpy's fancy gather on the CPU, ~3x index_select's)."""
    if x.device.type == "cpu":
        return torch.from_numpy(x.detach().numpy()[:, columns.numpy()])
    return x.index_select(1, columns)


def complement(x: Tensor, idx: np.ndarray, wts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(exc, rw) when `band_mean` mixes the rows (idx, wts) by complement, else two empty arrays.

    By complement (`_kernels.band_mean_complement`): row i is rw[i] times the sum of all n0
    inputs but exc[i] (ascending, padded with −1). Taken for float32 inputs (the exactness proof,
    `_kernels.exact_sums`, is float32's) when every row weighs its members alike (nnm: 1/(n − f))
    and it saves work — per coordinate, the total over n0 inputs, its check (≈ 2 n0 more), and
    Σ_i |exc_i| subtractions, against Σ_i |members_i| additions for the lists.
    """
    none = np.empty((0, 0), np.int64), np.empty(0)
    if idx.shape[0] == 0 or not may_mix_by_complement(x):
        return none
    ok, exc, rw = _kernels.complement_lists(idx, np.ascontiguousarray(wts, np.float64), x.shape[0])
    return (exc, rw) if ok else none


def may_mix_by_complement(x: Tensor) -> bool:
    """Whether `band_mean` may mix x's rows by complement at all: float32 inputs, the dtype
    `_kernels.exact_sums` proves subset sums exact for."""
    return x.dtype == torch.float32


def sparse_mix(mix: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """A mix (n, n0) as padded (index, weight) lists per row, indices ascending, padding
    (0, 0.0): what `band_mean` takes (None: two empty arrays, the rows themselves). nnm and
    bucketing mixes are sparse (`_kernels.sparse_lists`)."""
    if mix is None:
        return np.empty((0, 0), np.int64), np.empty((0, 0), np.float64)
    return _kernels.sparse_lists(np.ascontiguousarray(mix, np.float64))


def window_network(n: int, a: int, b: int, slide: int) -> np.ndarray:
    """The comparators `band_mean` needs: the band a..b-1 as a set when slide = 0; else the
    middle a+slide..b-1 as a set (when the slide is narrower than the window) and, one by one,
    the ranks that may enter or leave the window and the two middle ranks the median is taken
    from."""
    if slide == 0:
        return band_network(n, a, b)
    if slide < 0 or b + slide > n:
        raise ValueError(f"need 0 < slide and b + slide <= n, got {a=}, {b=}, {slide=}")
    edges = {*range(a, a + slide), *range(b, b + slide), (n - 1) // 2, n // 2}
    if a + slide >= b:  # no rank is inside every window: each one is an edge
        return band_network(n, a, b + slide, tuple(sorted(edges | set(range(a, b + slide)))))
    return band_network(n, a + slide, b, tuple(sorted(edges)))


def _band_mean_torch(
    x: Tensor,
    idx: np.ndarray,
    wts: np.ndarray,
    network: np.ndarray,
    a: int,
    b: int,
    slide: int = 0,
    rw: np.ndarray | None = None,
) -> Tensor:
    """The comparator network over whole rows, any device; bitwise what the numba kernel does.

    NaN becomes +inf first, and a comparator swaps exactly when  hi < lo  — not min/max, which
    would propagate NaN and order −0.0 before +0.0 where the kernel keeps them in place. With
    `rw` (a mix by complement, `complement`), a row in a column whose subset sums are exact
    (`exact_columns`) is rw[i] · Σ members, the kernel's value there (any order of an exact sum
    gives it); elsewhere it is mixed member by member, in the kernel's order.
    """
    if idx.shape[0] > 0:
        rows = [_nan_as_inf(row) for row in _mixed_rows_torch(x, idx, wts, rw)]
    else:
        rows = [_nan_as_inf(row) for row in x.unbind(0)]
    for i, j in network.tolist():
        swap = rows[j] < rows[i]
        rows[i], rows[j] = torch.where(swap, rows[j], rows[i]), torch.where(swap, rows[i], rows[j])
    if slide > 0:
        acc = _window_sum_torch([row.double() for row in rows], a, b, slide)
    else:
        acc = rows[a].double()
        for r in range(a + 1, b):
            acc = acc + rows[r].double()
    return (acc * (1.0 / (b - a))).to(x.dtype)


def band_mean_sorted(rows: Tensor, a: int, b: int) -> Tensor:
    """Per column, the mean of ranks a..b-1 of `rows` (NaN as +inf) by torch.sort along the
    rows: the other torch formulation of `band_mean` (any device), measured against the
    comparator network in benchmarks/bench_aggregators.py. Equal to the kernel's up to the sign
    of a zero and the float64 summation order of the band."""
    ranked = torch.sort(_nan_as_inf(rows), dim=0).values[a:b]
    return (ranked.double().sum(0) * (1.0 / (b - a))).to(rows.dtype)


def _mixed_rows_torch(
    x: Tensor, idx: np.ndarray, wts: np.ndarray, rw: np.ndarray | None
) -> list[Tensor]:
    """The rows Σ_k wts[i,k] x[idx[i,k]] in x's dtype, summed member by member in float64 in
    the kernels' order; with `rw` (a mix by complement) rw[i] · Σ members in the columns whose
    subset sums are exact (the kernels' value there)."""
    exact = None if rw is None else exact_columns(x)
    rows = []
    for i in range(idx.shape[0]):
        acc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        members = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
        for k in range(idx.shape[1]):
            if wts[i, k] != 0.0:
                acc = acc + float(wts[i, k]) * x[int(idx[i, k])].double()
                members = members + x[int(idx[i, k])].double()
        if exact is not None and rw is not None:
            acc = torch.where(exact, members * float(rw[i]), acc)
        rows.append(acc.to(x.dtype))
    return rows


def _mixed_rows_gpu(x: Tensor, idx: np.ndarray, wts: np.ndarray, rw: np.ndarray | None) -> Tensor:
    """`_mixed_rows_torch` stacked, bit for bit, with the exact columns of a mix by complement
    done as one float64 matrix product of the 0/1 membership matrix (an exact sum in any order,
    so the tensor cores' order is as good as the kernels'); the other columns, and mixes that
    are not by complement, member by member. Non-finite values are zeroed before the product
    (0 · inf would be NaN in rows that do not hold them); their columns are never exact."""
    if rw is None:
        return torch.stack(_mixed_rows_torch(x, idx, wts, None))
    membership = np.zeros((idx.shape[0], x.shape[0]))
    rows = np.broadcast_to(np.arange(idx.shape[0])[:, None], idx.shape)
    membership[rows[wts != 0.0], idx[wts != 0.0]] = 1.0
    members = torch.from_numpy(membership).to(x.device)
    scale = torch.from_numpy(np.asarray(rw, np.float64)).to(x.device)[:, None]
    out = torch.empty((idx.shape[0], x.shape[1]), dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[1], _GPU_COLUMNS):
        part = x[:, s : s + _GPU_COLUMNS]
        finite = torch.where(torch.isfinite(part), part, 0.0).double()
        mixed = ((members @ finite) * scale).to(x.dtype)
        inexact = (~exact_columns(part)).nonzero().flatten()
        if inexact.numel():
            slow = _mixed_rows_torch(part.index_select(1, inexact), idx, wts, rw)
            mixed[:, inexact] = torch.stack(slow)
        out[:, s : s + _GPU_COLUMNS] = mixed
    return out


def exact_columns(x: Tensor) -> Tensor:
    """(d,) bool: the columns of float32 x whose every subset sum is exact in float64
    (`_kernels.exact_sums`: all finite, n0 · max|x| ≤ 2²⁹ · min nonzero |x|)."""
    size = x.abs()  # exact in float32; only the (d,) extremes are compared in float64
    small = torch.where(size > 0, size, torch.inf).amin(0).double()
    finite = torch.isfinite(x).all(0)
    return finite & (size.amax(0).double() * x.shape[0] <= _kernels.EXACT_SPAN * small)


def _window_sum_torch(rows: list[Tensor], a: int, b: int, slide: int) -> Tensor:
    """`_kernels._window_sum` on whole sorted rows (float64), adding in the kernel's order."""
    n = len(rows)
    med = 0.5 * (rows[(n - 1) // 2] + rows[n // 2])
    shift = torch.zeros(med.shape, dtype=torch.int64, device=med.device)
    for j in range(slide):
        shift += (rows[b + j] - med < med - rows[a + j]).long()
    acc = torch.zeros_like(med)
    for r in range(a, b + slide):
        inside = (a + shift <= r) & (r < b + shift)
        acc = acc + torch.where(inside, rows[r], 0.0)
    return acc


def _nan_as_inf(row: Tensor) -> Tensor:
    """`row` with NaN replaced by +inf (the kernel's `v if v < inf else inf`)."""
    return torch.where(row < torch.inf, row, torch.inf)


def centred_gram(
    x: Tensor, extra: Tensor | None = None, centre: Tensor | None = None
) -> np.ndarray:
    """float64 Gram of [x; extra] after subtracting `centre` (x's column mean when None), as numpy
    (m, m). `centre` is a (d,) tensor of x's dtype and device. On a shard (`collective`), the
    Gram over every shard's columns: the local one summed over the shards."""
    return collective.all_sum(_local_gram(x, extra, centre))


def centred_grams(x: Tensor) -> np.ndarray:
    """(R, n, n): `centred_gram` of each of R runs' rows x[r] (x (R, n, d), whole runs, not a
    shard's columns), by the same kernel called per run from one compiled loop (a batched
    simulation's `aggregators.runs`)."""
    if not use_numba(x) or x.shape[2] == 0:
        return np.stack([centred_gram(run) for run in x])
    with threads_for(x.shape[2]):
        return _kernels.centred_grams_runs(x.numpy(), _kernels.gram_block(x.shape[1]))


def _local_gram(x: Tensor, extra: Tensor | None, centre: Tensor | None) -> np.ndarray:
    if x.shape[1] == 0:  # a shard may hold none of a column sample (dnc)
        m = x.shape[0] + (0 if extra is None else extra.shape[0])
        return np.zeros((m, m))
    if use_numba(x):
        data = x.numpy()
        extra_data = data[:0] if extra is None else extra.numpy()
        origin = data[0, :0] if centre is None else centre.numpy()
        block = _kernels.gram_block(x.shape[0] + extra_data.shape[0])
        with threads_for(x.shape[1]):
            return _kernels.centred_gram(data, extra_data, origin, block)
    if extra is None:
        extra = x[:0]
    gram = torch.zeros((x.shape[0] + extra.shape[0],) * 2, dtype=torch.float64, device=x.device)
    step = _TORCH_GRAM_COLUMNS if x.is_cpu else _GPU_COLUMNS
    for s in range(0, x.shape[1], step):
        cols = slice(s, s + step)
        xs = x[:, cols].double()
        origin = xs.mean(0) if centre is None else centre[cols].double()
        y = torch.cat([xs, extra[:, cols].double()]) - origin
        gram += y @ y.T
    return gram.cpu().numpy()


def coordinate_median(x: Tensor) -> Tensor:
    """Per coordinate, the median of x's rows (NaN counted as +inf), non-finite results set to 0.

    A centre for the Gram that no minority of rows can move outside the others' range; where a
    majority of a column is non-finite it falls back to 0, so the centre itself is always finite.
    """
    n = x.shape[0]
    empty = np.empty((0, 0), np.int64), np.empty((0, 0), np.float64)
    median = band_mean(x, *empty, (n - 1) // 2, n // 2 + 1)
    if median.device.type == "cpu":  # through numpy: a torch op would wake torch's thread pool
        values = median.numpy()
        values[~np.isfinite(values)] = 0.0
        return median
    return torch.where(torch.isfinite(median), median, 0.0)


def sq_norms(x: Tensor) -> np.ndarray:
    """(n,) float64 ‖x_i‖², summed in float64 (+inf for a row holding ±inf; NaN for one holding
    NaN): the one pass the norm-based rules (cge, clip, arc) make over unmixed rows; on a
    shard, over every shard's columns."""
    if use_numba(x) and x.shape[1] > 0:
        with threads_for(x.shape[1]):
            return collective.all_sum(_kernels.sq_norms(x.numpy()))
    return collective.all_sum(x.double().square().sum(dim=1).cpu().numpy())


def combine(
    x: Tensor,
    weights: np.ndarray,
    extra: Tensor | None = None,
    extra_weights: np.ndarray | None = None,
) -> Tensor:
    """Σ_k weights[k] x_k (+ Σ_k extra_weights[k] extra_k), accumulated in float64, in x's dtype.

    One pass over the rows with non-zero weight; both backends add the terms in the same order.
    """
    weights = np.ascontiguousarray(weights, dtype=np.float64)
    if extra is None or extra_weights is None:
        extra, extra_weights = None, np.zeros(0)
    extra_weights = np.ascontiguousarray(extra_weights, dtype=np.float64)
    if use_numba(x):
        data = x.numpy()
        out = np.empty(x.shape[1], dtype=data.dtype)
        extra_data = data[:0] if extra is None else extra.numpy()
        if _single_chunk(x):
            _kernels.combine_serial(data, weights, extra_data, extra_weights, out)
        else:
            with threads_for(x.shape[1]):
                _kernels.combine(data, weights, extra_data, extra_weights, out)
        return torch.from_numpy(out)
    acc = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device)
    terms = list(zip(weights.tolist(), x, strict=True))
    if extra is not None:
        terms += zip(extra_weights.tolist(), extra, strict=True)
    for weight, row in terms:
        if weight != 0.0:
            acc = acc + weight * row.double()
    return acc.to(x.dtype)


def mix_rows(x: Tensor, mix: np.ndarray) -> Tensor:
    """The rows  mix · x  (mix: (n', n), zeros skipped), each summed in float64 like `combine`,
    in x's dtype. For the rare mixes that cannot stay lazy (`rows.Rows`). A mix `band_mean`
    would take by complement (`complement`) is computed the same way here: in a column whose
    subset sums are exact, w · (total − Σ excluded); elsewhere `combine`'s sum, bit for bit."""
    idx, wts = sparse_mix(mix)
    exc, rw = complement(x, idx, wts)
    if use_numba(x):
        data = x.numpy()
        out = np.empty((mix.shape[0], x.shape[1]), dtype=data.dtype)
        serial = _single_chunk(x)
        with nullcontext() if serial else threads_for(x.shape[1]):
            if exc.shape[0] > 0:
                kernel = _kernels.mix_rows_complement
                kernel = _kernels.mix_rows_complement_serial if serial else kernel
                kernel(data, idx, wts, exc, rw, out)
                return torch.from_numpy(out)
            none, no_weights = data[:0], np.zeros(0)
            kernel = _kernels.combine_serial if serial else _kernels.combine
            for i in range(mix.shape[0]):
                weights = np.ascontiguousarray(mix[i], dtype=np.float64)
                kernel(data, weights, none, no_weights, out[i])
        return torch.from_numpy(out)
    rows = torch.stack([combine(x, weights) for weights in mix])
    if exc.shape[0] == 0:
        return rows
    exact = exact_columns(x)
    members = torch.from_numpy((mix != 0.0).astype(np.float64)).to(x.device) @ x.double()
    fast = (members * torch.from_numpy(rw).to(x.device)[:, None]).to(x.dtype)
    return torch.where(exact, fast, rows)
