"""Spectral filters: caf and dnc remove inputs along the top principal direction of the inputs.

Both work in n-dimensional coefficient space. The d × d (weighted) covariance Σ = Yᵀ C Y / W
of centred rows Y shares its nonzero eigenvalues with the n × n matrix C^{1/2} Y Yᵀ C^{1/2} / W,
and for its eigenvector u the unit top direction of Σ is v = Yᵀ C^{1/2} u / √(λ W), so the
projections every filter scores by are Y v = (Y Yᵀ) C^{1/2} u / √(λ W): the Gram is all they need.

Non-finite rows (`Rows.far`) start with weight 0 (caf) or are never kept (dnc), so the output is
a combination of finite rows and finite while at least n − f rows are.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators import collective
from byzps.common.aggregators.rows import Rows
from byzps.common.aggregators.rule import MajorityRule, RowsAggregator, register, require
from byzps.common.seeding import derive_seed


def recentred(gram: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """The Gram of y_i − z for the point z = Σ_k α_k y_k (α summing to one)."""
    g_alpha = gram @ alpha
    return gram - g_alpha[:, None] - g_alpha[None, :] + alpha @ g_alpha


def top_direction(gram: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
    """(λ, Y v): the top eigenvalue of Σ = Yᵀ diag(weights) Y and each row's projection on
    its unit eigenvector v, from the Gram Y Yᵀ of the rows (module docstring, W = 1)."""
    root = np.sqrt(weights)
    values, vectors = np.linalg.eigh(root[:, None] * gram * root[None, :])
    lam = max(float(values[-1]), 0.0)
    if lam == 0.0:
        return 0.0, np.zeros(gram.shape[0])
    return lam, gram @ (root * vectors[:, -1]) / np.sqrt(lam)


@register("caf")
class CovarianceAgnosticFilter(MajorityRule):
    """Covariance-bound Agnostic Filter (Allouah, Guerraoui, Stephan, "Towards trustworthy
    federated learning with untrusted participants", ICML 2025; ByzFL `CAF`): inputs are
    down-weighted along the top eigenvector of their weighted covariance until the weights sum
    to n − 2f, and the output is the weighted mean whose covariance had the smallest top
    eigenvalue.

    Weights c_i start at 1; while Σ c_i > n − 2f:

        μ_c = Σ c_i x_i / Σ c_i,   Σ_c = Σ c_i (x_i − μ_c)(x_i − μ_c)ᵀ / Σ c_i,
        (λ, v) = top eigenpair of Σ_c,   τ_i = ((x_i − μ_c)·v)²,   c_i ← c_i (1 − τ_i / max τ),

    and the output is the μ_c with the smallest λ met. All of it runs on the n × n Gram (module
    docstring): one pass for the Gram, one for the output, so it is shardable like krum.

    Differences from ByzFL 0.0.11, both making the rule deterministic and terminating: the top
    eigenpair is exact (ByzFL takes one power step from a random vector, so its λ and v are
    random); max τ is over rows still weighted (ByzFL's over all rows lets an already removed
    far outlier hold max τ, after which the weights barely move and the loop runs on for as
    long as the outlier is far). Each step zeroes the weight of the row with max τ, so there
    are at most n steps. A step whose λ is 0 (the weighted rows coincide) ends the loop: its μ_c
    cannot be beaten. Non-finite rows start at c_i = 0.

    Guarantee. The paper's (2f < n): ‖x̂ − μ_H‖ = O(√(λ_max(Σ_H) f/n)). A constant for this
    iteration (n > 3f; W_H, W_B the honest and other rows' weights, σ² = λ_max(Σ_H) ≤ r_H²):
    * for any weights, along the unit u from μ_{c,H} (the weighted honest mean, within r_H of
      μ_H) to μ_c, the weighted variance gives W λ ≥ W_H Δ² + W_B (W_H Δ/W_B)², so
      Δ = ‖μ_c − μ_{c,H}‖ ≤ √(λ W_B/W_H);
    * a step removes weight c_i τ_i / max τ; along v the honest part of W λ is
      S_H + W_H δ² (S_H ≤ n σ²) and the others' is ≥ (W_H²/W_B) δ², so at the first step whose
      honest part is the larger (honest rows lost less than the others before it, so
      W_H − W_B ≥ n − 2f) λ ≤ 2 S_H W_H/(W (W_H − W_B)) ≤ 2 n σ²/(n − 2f). Such a step exists:
      while honest rows lose less, the total lost stays below 2f and the loop goes on;
    * the output's iterate has λ* ≤ that and W > n − 2f, so W_B/W_H ≤ f/(n − 3f):
      ‖x̂ − μ_H‖ ≤ r_H + σ √(2 n f/((n − 2f)(n − 3f))).
    """

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        self.check(n, f)
        gram = rows.gram()
        c = (~rows.far()).astype(np.float64)
        if not c.any():
            return rows.mean()
        best, best_alpha = np.inf, c / c.sum()
        while c.sum() > n - 2 * f:
            total = c.sum()
            alpha = c / total
            lam, proj = top_direction(recentred(gram, alpha), c / total)
            if lam < best:
                best, best_alpha = lam, alpha
            if lam == 0.0:
                break
            tau = np.where(c > 0, proj**2, 0.0)
            if not tau.max() > 0.0:  # λ > 0 in rounding only: nothing left to filter along v
                break
            c = c * np.maximum(1.0 - tau / tau.max(), 0.0)
        return rows.combine(best_alpha)


@register("dnc")
class DivideAndConquer(RowsAggregator):
    """Divide-and-Conquer (Shejwalkar, Houmansadr, "Manipulating the Byzantine: optimizing model
    poisoning attacks and defenses for federated learning", NDSS 2021, Algorithm 2; Blades
    `DnC`): the mean of the inputs that no round of outlier filtering along the top singular
    direction of a random coordinate subset removed.

    `niters` rounds of:

        r = b random coordinates,  Y = rows restricted to r, centred on their mean,
        v = top right singular vector of Y,  s_i = (Y v)_i²,  kept_r = the n − ⌊c f⌋ lowest s_i,

    and x̂ = the mean of the rows kept in every round. Each round is one pass over b columns
    (their Gram: Y v = σ u for the Gram's top eigenpair (σ², u)), plus one for the output and,
    to find non-finite rows, one for the full Gram. Should no row be kept in every round, the
    rows kept in the most rounds are averaged (the intersection, when it is not empty). Blades'
    defaults: niters = 5, b = `subsample` = 10000 (all coordinates when d ≤ b), c = `filter_frac`
    = 1 (Blades' name; a bare `c` would go to the `clip` wrapper, whose parameter it is). (Some
    Blades versions average the union of the kept sets; the paper's intersection is used here.)

    The coordinates are drawn by a generator keyed by (seed, "dnc", call counter, round), so a
    run is reproducible from its seed; the counter is the state (`state_dict`). Shardable: with
    the seed shared, each shard adds the Gram of its drawn coordinates, one n × n all-reduce
    per round. Non-finite rows are never kept.

    No worst-case guarantee: the paper's analysis is empirical, and f colluding rows placed
    orthogonally to every drawn subspace are not filtered. Needs 2f < n (n − ⌊c f⌋ ≥ 1 kept).
    """

    def __init__(
        self,
        f: int = 0,
        niters: int = 5,
        subsample: int = 10000,
        filter_frac: float = 1.0,
        seed: int = 0,
    ) -> None:
        super().__init__(f)
        if not (isinstance(niters, int) and niters >= 1):
            raise ValueError(f"niters must be a positive integer, got {niters!r}")
        if not (isinstance(subsample, int) and subsample >= 1):
            raise ValueError(f"subsample must be a positive integer, got {subsample!r}")
        if not (filter_frac >= 0.0 and np.isfinite(filter_frac)):
            raise ValueError(f"filter_frac must be non-negative and finite, got {filter_frac}")
        if not (isinstance(seed, int) and seed >= 0):
            raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
        self.niters = niters
        self.subsample = subsample
        self.filter_frac = float(filter_frac)
        self.seed = seed
        self.calls = 0

    def check(self, n: int, f: int) -> None:
        kept = n - int(self.filter_frac * f)
        require(2 * f < n and kept >= 1, self.name, "2f < n, n − ⌊c f⌋ ≥ 1", f, n)

    def columns(self, d: int, round_: int) -> np.ndarray | None:
        """The sorted coordinates round `round_` of the next call draws (None: all of them)."""
        if self.subsample >= d:
            return None
        gen = np.random.default_rng(derive_seed(self.seed, "dnc", self.calls, round_))
        return np.sort(gen.choice(d, size=self.subsample, replace=False))

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        self.check(n, f)
        far = rows.far()
        kept = np.zeros(n, np.int64)
        for round_ in range(self.niters):
            d = rows.x.shape[1]  # on a shard: its own columns of the global sample
            sampled = self.columns(collective.total_columns(d), round_)
            mine = None if sampled is None else collective.local_columns(sampled, d)
            sub = self._subsampled(rows, mine)
            gram, sub_far = sub.gram(), sub.far() | far
            usable = (~sub_far).astype(np.float64)
            if not usable.any():
                break
            _, proj = top_direction(recentred(gram, usable / usable.sum()), usable)
            scores = np.where(sub_far, np.inf, proj**2)
            kept[np.argsort(scores, kind="stable")[: n - int(self.filter_frac * f)]] += 1
        kept[far] = -1
        chosen = kept == kept.max()
        self.calls += 1
        return rows.combine(chosen / chosen.sum())

    @staticmethod
    def _subsampled(rows: Rows, columns: np.ndarray | None) -> Rows:
        """The rows restricted to `columns` (None: `rows` itself), mixed like `rows`."""
        if columns is None:
            return rows
        x = rows.x
        if x.device.type == "cpu":  # numpy's gather; a torch op would wake torch's thread pool
            sub = Rows(torch.from_numpy(np.ascontiguousarray(x.numpy()[:, columns])))
        else:
            sub = Rows(x.index_select(1, torch.from_numpy(columns).to(x.device)))
        return sub if rows.mix is None else sub.mixed(rows.mix)

    def state_dict(self) -> dict[str, Any]:
        return {"calls": self.calls}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls = int(state["calls"])
