"""A vectorised numpy reference of one a9a run: Byz-DM21, Top-1, ALIE (omniscient), NNM∘cm.

The same recursion as byzps's simulator on `experiments/a9a/base.toml` (docs/algorithms.md), in
a page of plain numpy with no checks, no door, no cohort bookkeeping and no keyed streams:
the floor that `benchmarks/bench_simulator.py` compares byzps's per-round cost against. It is not
bit-identical to byzps (its mini-batches come from one numpy generator, with replacement or
walking a reshuffled permutation of each shard as the run's `task.sampling` says; its Gram is
uncentred, Top-1 ties are argmax's), only the same algorithm on the same data and split: fed
byzps's mini-batches, it follows byzps's loss to 3–4 digits.

Per round t, with h = n − f honest rows and the f Byzantine rows sharing one target:

    s_i = ∇f_i(x; one row of shard i)                     (logistic loss + λ/2 ‖x‖²)
    v ← s, u ← s at t = 0; else v ← (1 − η) v + η s, u ← (1 − η) u + η v
    c_i = Top1(u_i − g_i),  g_i ← g_i + c_i               (honest error-feedback states)
    t = mean(g) − z·std(g),  b_j ← b_j + Top1(t − b_j)    (ALIE on the honest states)
    y_i = mean of the n − f rows of [g; b] nearest row i  (NNM), ĝ = median_i y_i (cm)
    x ← x − γ ĝ
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


class NumpyA9aRun:
    """One run of the recursion above; `step()` advances it by a round."""

    def __init__(
        self,
        features: np.ndarray,
        labels: np.ndarray,
        shards: Sequence[np.ndarray],
        *,
        byzantine: int,
        lr: float,
        eta: float,
        lam: float,
        z: float,
        sampling: str = "replace",
        seed: int = 0,
    ) -> None:
        self.features = np.ascontiguousarray(features, dtype=np.float32)
        self.labels = np.ascontiguousarray(labels, dtype=np.float32)
        self.h, self.f, self.d = len(shards), byzantine, self.features.shape[1]
        self.n = self.h + self.f
        self.sizes = np.array([len(s) for s in shards])
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)[:-1]])
        self.flat = np.concatenate([np.asarray(s, dtype=np.int64) for s in shards])
        self.lr, self.eta, self.lam, self.z = lr, eta, lam, z
        self.rng = np.random.default_rng(seed)
        self.shuffle = sampling == "shuffle"
        self.order = np.zeros((self.h, int(self.sizes.max())), np.int64)  # each shard's pass
        self.position = self.sizes.copy()  # every pass is used up: shuffle at the first round
        self.x = np.zeros(self.d, np.float32)
        self.v = np.zeros((self.h, self.d), np.float32)
        self.u = np.zeros_like(self.v)
        self.states = np.zeros((self.n, self.d), np.float32)  # [honest g; Byzantine b]
        self.round = 0

    def _top1_update(self, rows: slice, delta: np.ndarray) -> None:
        """states[rows] += Top1(delta), row by row."""
        j = np.abs(delta).argmax(axis=1)
        r = np.arange(delta.shape[0])
        self.states[rows][r, j] += delta[r, j]

    def _picks(self) -> np.ndarray:
        """One training row per honest worker, from its own shard."""
        if not self.shuffle:
            return self.flat[self.starts + self.rng.integers(0, self.sizes)]
        for i in np.flatnonzero(self.position == self.sizes):  # a new pass: reshuffle
            shard = self.flat[self.starts[i] : self.starts[i] + self.sizes[i]]
            self.order[i, : self.sizes[i]] = self.rng.permutation(shard)
            self.position[i] = 0
        picks = self.order[np.arange(self.h), self.position]
        self.position += 1
        return picks

    def step(self) -> np.ndarray:
        h, eta = self.h, self.eta
        picks = self._picks()
        a = self.features[picks]  # (h, d), batch 1
        residual = 1.0 / (1.0 + np.exp(-(a @ self.x))) - self.labels[picks]
        s = residual[:, None] * a + self.lam * self.x
        if self.round == 0:
            self.v[:] = s
            self.u[:] = s
        else:
            self.v *= 1.0 - eta
            self.v += eta * s
            self.u *= 1.0 - eta
            self.u += eta * self.v
        g = self.states[:h]
        self._top1_update(slice(0, h), self.u - g)
        target = g.mean(axis=0) - self.z * g.std(axis=0, ddof=1)
        self._top1_update(slice(h, self.n), target - self.states[h:])
        rows = self.states.astype(np.float64)
        sq = np.einsum("ij,ij->i", rows, rows)
        dists = sq[:, None] + sq[None, :] - 2.0 * rows @ rows.T
        np.fill_diagonal(dists, -np.inf)  # each row is in its own neighbourhood
        nearest = np.argsort(dists, axis=1, kind="stable")[:, : self.n - self.f]
        mixed = rows[nearest].mean(axis=1)  # (n, d)
        aggregate = np.median(mixed, axis=0).astype(np.float32)
        self.x -= np.float32(self.lr) * aggregate
        self.round += 1
        return aggregate
