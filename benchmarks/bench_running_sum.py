"""The mean's sparse round: a full pass over the states against a running sum, in one run.

Usage:  python benchmarks/bench_running_sum.py [--dims 1000000 10000000] [--workers 20]
        [--ratio 0.01] [--repeats 7]

Issue 15's second goal asks the server's share of a sparse round to stay within 1.5× of the raw
transfer. For the plain mean the server today recomputes ĝ from all n states and then finds where
its bits changed: `ops.combine` (float64 accumulation, the path `Mean` takes) plus the compiled
comparison `changed_entries`. A running sum S = Σ_i h_i would instead be updated by each round's
sparse messages alone (O(n·k) scattered adds), and ĝ rewritten only at the messages' indices.
This prints both costs and their ratio, to say whether that redesign would pay: it is not
byzps's path (it changes the summation order of every mean, so the simulator's bit-identity with
the server would have to move with it).

The running-sum side: S in float64, the existing compiled scatter (`scatter_add_rows`, on one
thread, where `ops.combine` uses two; the states' own scatter ran 2× faster on two threads, which
bounds what threading it could gain), then ĝ[i] = S[i] / n at every message's indices. It leaves
out building the union of indices that the sparse downlink would also need. The full pass's
comparison finds what a real round's does: the entries on the union of the messages' indices
(~17 % of d for 20 Top-1 % messages).
"""

from __future__ import annotations

import argparse
import shlex
import sys

import numpy as np
import torch
from numba import njit
from timing import median_ms

from byzps.common._state_kernels import changed_entries, scatter_add_rows
from byzps.common.aggregators import ops


@njit(cache=True, nogil=True)
def _rewrite_at(aggregate, running_sum, indices, scale):  # pragma: no cover - compiled
    """aggregate[j] = float32(running_sum[0, j] * scale) at every message index j."""
    for i in range(indices.shape[0]):
        for j in indices[i]:
            aggregate[j] = running_sum[0, j] * scale


def time_one_size(d: int, n: int, ratio: float, repeats: int) -> tuple[float, float]:
    """Median ms of the full pass and of the running-sum update, for n Top-`ratio` messages."""
    rng = np.random.default_rng(0)
    k = max(1, int(ratio * d))
    states = torch.from_numpy(rng.standard_normal((n, d), dtype=np.float32))
    indices = np.stack([np.sort(rng.choice(d, k, replace=False)) for _ in range(n)])
    values = rng.standard_normal((n, k), dtype=np.float32)
    rows = np.zeros(n, dtype=np.int64)  # every message adds into the one running-sum row
    weights = np.full(n, 1.0 / n)
    # Last round's ĝ differs from this round's exactly on the union of the messages' indices.
    previous = ops.combine(states, weights)
    previous[torch.from_numpy(indices.ravel())] += 1.0
    previous_bits = previous.view(torch.int32).numpy()
    running_sum = states.double().sum(dim=0, keepdim=True).numpy()
    aggregate = states[0].numpy().copy()

    def full_pass() -> None:
        mean = ops.combine(states, weights)
        changed_entries(mean.view(torch.int32).numpy(), previous_bits, d)

    def running() -> None:
        scatter_add_rows(running_sum, rows, indices, values)
        _rewrite_at(aggregate, running_sum, indices, 1.0 / n)

    return median_ms(full_pass, repeats), median_ms(running, repeats)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dims", type=int, nargs="+", default=[1_000_000, 10_000_000])
    parser.add_argument("--workers", type=int, default=20)
    parser.add_argument("--ratio", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args(argv)
    print("command:", shlex.join([sys.executable, *sys.argv]))
    print("| d | full pass: combine + compare | running sum: scatter + rewrite | full / running |")
    print("|---|---|---|---|")
    for d in args.dims:
        full_ms, running_ms = time_one_size(d, args.workers, args.ratio, args.repeats)
        print(f"| {d:.0e} | {full_ms:.1f} ms | {running_ms:.1f} ms | {full_ms / running_ms:.2f}× |")


if __name__ == "__main__":
    main()
