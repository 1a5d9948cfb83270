"""Would storing the server's states by column make cm's incremental round cheaper? The row-major
pass the server runs against a column-major prototype, on the same columns, in one run.

    python benchmarks/bench_state_layout.py [--dims 10000000] [--workers 20] [--share 0.165]
        [--repeats 5]

A Top-1 % round of 20 workers touches |U| ≈ 16.5 % of the columns, and cm recomputes those
(`_kernels.band_mean_columns`). With the states stored as n rows of d, nearly every cache line
of every row holds a touched column, so that pass reads about all n·d values whatever |U| is; a
(d, n) layout would read only U's columns, n contiguous values each. This times, for the
median's band:

- **row-major**: the server's pass over (n, d) states, in place, each row's reads asking for
  the column `AHEAD` further on (`common/_prefetch.py`);
- **column-major**: the same comparators and band sum over a (d, n) copy (a prototype kernel,
  here only), its output checked bitwise against the row-major one;
- **column-major, prefetched**: the same, asking for the column `AHEAD` further on before
  reading each one;
- **`x.sum(0)`**: torch reading every state once, for scale;
- **network alone**: the row-major kernel on U's columns gathered beforehand into a contiguous
  (n, |U|) array, i.e. the comparators without the gather.

Times are medians over `--repeats` calls after a warm-up call, with numba's default threads.
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch
from numba import njit, prange
from timing import median_ms

from byzps.common._prefetch import AHEAD, prefetch
from byzps.common.aggregators import _kernels, ops


@njit(parallel=True, cache=True, fastmath=False)
def band_mean_columns_by_column(  # pragma: no cover - compiled
    xt, columns, network, a, b, slide, block, ahead, out
):
    """`_kernels.band_mean_columns` over states stored as xt (d, n): column c's n values are
    xt[c, :], contiguous. The same blocks, comparators and float64 band sum, so the same bits.
    `ahead` > 0: prefetch the column that many ahead in `columns` before reading each one."""
    n, m = xt.shape[1], columns.shape[0]
    flat = xt.reshape(-1)
    scale = 1.0 / (b - a)
    for k in prange((m + block - 1) // block):  # one task a block (the server's: a chunk of them)
        first, w = k * block, min(block, m - k * block)
        buf = np.empty((n + 1, block), dtype=xt.dtype)
        acc = np.empty(block, dtype=np.float64)
        for t in range(w):
            if ahead and first + t + ahead < m:
                later = columns[first + t + ahead] * n
                prefetch(flat, later)
                prefetch(flat, later + n - 1)  # a column may straddle two cache lines
            for i in range(n):
                v = flat[columns[first + t] * n + i]
                buf[i, t] = v if v < np.inf else np.inf
        wire, med = np.empty(n + 1, dtype=np.int64), np.empty(block, dtype=np.float64)
        _kernels._band_of_block(
            buf, wire, network, a, b, slide, w, med, np.empty(block, np.int64), acc
        )
        for t in range(w):
            out[first + t] = acc[t] * scale


def layout_times(
    x: np.ndarray, share: float, repeats: int, rng: np.random.Generator
) -> list[float]:
    """ms of the five passes (module doc) over states x (n, d) and a random share of columns;
    raises if the layouts' band means differ."""
    n, d = x.shape
    a, b = (n - 1) // 2, n // 2 + 1  # the median's band: ranks a..b-1
    network = ops.window_network(n, a, b, 0)
    block = _kernels.block_size(n, x.itemsize)
    xt = np.ascontiguousarray(x.T)
    columns = np.flatnonzero(rng.random(d) < share).astype(np.int64)
    gathered = np.ascontiguousarray(x[:, columns])
    rows_out, cols_out, ahead_out, net_out = (np.empty(columns.size, x.dtype) for _ in range(4))
    no_idx, no_wts = np.zeros((0, 0), np.int64), np.zeros((0, 0))
    states = torch.from_numpy(x)
    passes = (
        lambda: _kernels.band_mean_columns(x, columns, network, a, b, 0, block, rows_out),
        lambda: band_mean_columns_by_column(xt, columns, network, a, b, 0, block, 0, cols_out),
        lambda: band_mean_columns_by_column(xt, columns, network, a, b, 0, block, AHEAD, ahead_out),
        lambda: states.sum(0),
        lambda: _kernels.band_mean(gathered, no_idx, no_wts, network, a, b, 0, block, net_out),
    )
    times = [median_ms(fn, repeats) for fn in passes]
    if any(rows_out.tobytes() != out.tobytes() for out in (cols_out, ahead_out, net_out)):
        raise AssertionError("the layouts' band means differ")
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[10_000_000])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--share", type=float, default=0.165, help="|U| / d")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print(f"n = {args.workers}, cm (the median's band), |U|/d = {args.share}")
    print(
        "| d | row-major (server) | column-major (prototype) | column-major, prefetched"
        " | x.sum(0) | network alone |"
    )
    print("|---|---|---|---|---|---|")
    rng = np.random.default_rng(0)
    for d in args.dims:
        x = rng.standard_normal((args.workers, d), dtype=np.float32)
        times = layout_times(x, args.share, args.repeats, rng)
        print(f"| {d:.0e} | " + " | ".join(f"{t:.1f} ms" for t in times) + " |")


if __name__ == "__main__":
    main()
