"""`RunsRows`: the rows of R runs of one shape, aggregated by one rule as a single call.

Why: a batched simulation (byzps.sim.batched) advances R runs whose rounds are a few hundred
operations on 20 × 123 floats each, so aggregating them one by one is mostly per-call overhead
— the Gram, the precision check, nnm's neighbourhoods, the band's lists and kernel, every one a
call per run. `RunsRows` serves the requests of the rules that batch (`batches_runs`: the band
rules cm, cwtm, meamed, and nnm over them) with a leading runs axis: the same `aggregate(rows, f)`
code runs once for all R, on stacks of n × n matrices and through one band kernel call.

Bit for bit: each run's output and verdict are what `Rows` gives it alone — the Gram by the same
kernel call per run, nnm's mix by the same operations on each matrix of the stack, and the band
by the same compiled `_band_chunk` on the same values (`_kernels.band_mean_runs`). What `Rows`
does only in rare cases — a Gram recentred on the median because the mean is imprecise, far
rows — is not repeated here: a run that needs it raises `NotBatched`, and its caller aggregates
the runs one by one (tests/test_aggregator_runs.py compares both ways, including that fallback).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators import _kernels, ops
from byzps.common.aggregators.gram import pairwise_sq_dists
from byzps.common.aggregators.rows import imprecise_runs
from byzps.common.aggregators.verdict import Banded, Verdict


class NotBatched(Exception):
    """Some run needs what only the one-run path (`Rows`) does; aggregate the runs one by one."""


class RunsRows:
    """R stacks of rows M_r · x_r, x (R, n0, d) on the CPU, M (R, n, n0) (None: x itself)."""

    def __init__(self, x: Tensor, mix: np.ndarray | None = None) -> None:
        if x.dim() != 3 or not ops.use_numba(x):
            raise NotBatched(f"runs batch CPU float32/float64 (R, n, d) inputs, got {x.shape}")
        self.x = x.detach().contiguous()
        self.mix = mix
        #: Each run's verdict of the last reduction over any view of these inputs.
        self._verdicts: list[Verdict | None] = [None] * x.shape[0]

    @property
    def runs(self) -> int:
        return self.x.shape[0]

    @property
    def n(self) -> int:
        return self.x.shape[1] if self.mix is None else self.mix.shape[1]

    def mixed(self, mix: np.ndarray) -> RunsRows:
        """The rows mix[r] · (run r's rows), without touching the data."""
        if mix.shape[0] != self.runs or mix.shape[2] != self.n:
            raise ValueError(f"mixing matrices of shape {mix.shape} cannot mix {self.n} rows")
        total = mix if self.mix is None else mix @ self.mix
        view = RunsRows(self.x, np.ascontiguousarray(total, dtype=np.float64))
        view._verdicts = self._verdicts  # shared: the base rule's reduction is the output
        return view

    def pairwise_sq_dists(self) -> np.ndarray:
        """(R, n, n) ‖row_i − row_j‖² of each run's raw rows (`Rows.pairwise_sq_dists`)."""
        if self.mix is not None:
            raise NotBatched("distances between mixed rows")
        grams = ops.centred_grams(self.x)
        if imprecise_runs(grams, self.x.shape[2]).any():  # which also rules out far rows
            raise NotBatched("a run's Gram needs the median centre or has far rows")
        return pairwise_sq_dists(grams)

    def band_mean(self, a: int, b: int, slide: int = 0) -> Tensor:
        """(R, d): per run, `Rows.band_mean` of its rows; records each run's verdict."""
        runs, n0, d = self.x.shape
        if self.mix is None:
            idx, wts = np.zeros((runs, 0, 0), np.int64), np.zeros((runs, 0, 0))
            by_complement, exc, rw = np.zeros(runs, np.bool_), idx, np.zeros((runs, 0))
        else:
            lists = _kernels.runs_lists(self.mix, n0, ops.may_mix_by_complement(self.x))
            idx, wts, by_complement, exc, rw = lists
        out = np.empty((runs, d), dtype=self.x.numpy().dtype)
        kernel = _kernels.band_mean_runs_serial if d <= _kernels.CHUNK else _kernels.band_mean_runs
        with ops.threads_for(d):
            kernel(
                self.x.numpy(),
                idx,
                wts,
                exc,
                rw,
                by_complement,
                ops.window_network(self.n, a, b, slide),
                a,
                b,
                slide,
                _kernels.block_size(self.n, self.x.element_size()),
                out,
            )
        mixes = [None] * runs if self.mix is None else list(self.mix)
        self._verdicts[:] = [Banded(mix, a, b, slide) for mix in mixes]
        return torch.from_numpy(out)

    def verdicts(self) -> list[Verdict | None]:
        """Each run's verdict of the last reduction (`Rows.verdict`); None before one ran."""
        return list(self._verdicts)
