"""Per-worker suspicion scores: how strongly the robust rule has been discounting each worker.

Each round the rule's verdict (byzps.common.aggregators.verdict) gives every worker a discount
δ_i ∈ [0, 1] — 0 when its state counted as an equal share of the aggregate, 1 when the aggregate
ignored it. The score is the exponentially weighted mean of those discounts with a half-life of
h rounds,

    s_i = Σ_k β^k δ_i(t − k) / Σ_k β^k,     β = 2^(−1/h),

normalised by the weights' sum so that the first rounds are not biased towards 0.

Why it exists: the rule already decides, every round, whose state to trust; the score only keeps
that decision so an operator can see *which* workers it keeps discounting. It is read-only: it
never feeds back into aggregation, so it cannot become a new lever for an attacker, and a worker
that stays within the honest spread (ALIE is built to) is not expected to score high.

Cost. A weighted rule's discount is n numbers it already has; a coordinate-wise rule's is a share
of coordinates, estimated on a fixed-size random sample of columns drawn per round from
(seed, round) — so the scores are reproducible and a resumed run continues them exactly.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators import collective
from byzps.common.aggregators.verdict import Verdict
from byzps.common.seeding import derive_seed


class SuspicionScores:
    """The exponentially weighted discounts of n workers (`scores`), updated once per round."""

    def __init__(self, num_workers: int, halflife: float, columns: int, seed: int = 0) -> None:
        if not halflife >= 0:
            raise ValueError(f"halflife must be >= 0, got {halflife}")
        if columns < 1:
            raise ValueError(f"columns must be at least 1, got {columns}")
        self.enabled = halflife > 0
        self.decay = 0.5 ** (1.0 / halflife) if self.enabled else 0.0
        self.columns = columns
        self.seed = seed
        self._weighted = np.zeros(num_workers)  # Σ β^k δ(t − k)
        self._total = 0.0  # Σ β^k

    @property
    def scores(self) -> np.ndarray:
        """(n,) the current scores (zeros before the first scored round)."""
        if self._total == 0.0:
            return np.zeros_like(self._weighted)
        return self._weighted / self._total

    def report(self) -> list[float] | None:
        """The scores as metrics records carry them (6 decimals, by worker id); None when off."""
        if not self.enabled:
            return None
        return [round(float(v), 6) for v in self.scores]

    def observe(
        self,
        verdict: Verdict | None,
        candidates: Tensor,
        round: int,
        discount: np.ndarray | None = None,
    ) -> None:
        """Fold in the discounts `verdict` gives the aggregated `candidates` (n, d) of `round`;
        a rule that recorded no verdict leaves the scores as they are. `discount`: those
        discounts, computed already (a batched simulation's, all its runs at once, over every
        column: only where `scores_every_column`)."""
        if not self.enabled or verdict is None:
            return
        if discount is None and verdict.reads_columns:
            discount = self._band_discount(verdict, candidates, round)
        elif discount is None:
            discount = verdict.discount(candidates, None)
        self._weighted = self.decay * self._weighted + discount
        self._total = self.decay * self._total + 1.0

    def _band_discount(self, verdict: Verdict, candidates: Tensor, round: int) -> np.ndarray:
        """A band rule's discount, the mean over this round's column sample. On a shard of a
        sharded server (`collective`) the sample is drawn over every column, each shard scores
        the sampled columns it holds, and the per-shard sums are summed: the same mean as one
        server's, on every shard."""
        local = candidates.shape[1]
        total = collective.total_columns(local)
        sample = self.sample(total, round)
        if total == local:
            return verdict.discount(candidates, sample)
        mine = collective.local_columns(np.arange(total) if sample is None else sample, local)
        n = candidates.shape[0]
        part = np.zeros(n + 1)
        if mine.size:
            part[:n] = verdict.discount(candidates, mine) * mine.size
            part[n] = mine.size
        summed = collective.all_sum(part)
        return summed[:n] / summed[n]

    def scores_every_column(self, dim: int) -> bool:
        """Whether a band is scored on all `dim` columns (no sample is drawn): then a verdict's
        discount is the same whatever the round, and may be computed outside `observe`."""
        return dim <= self.columns

    def sample(self, dim: int, round: int) -> np.ndarray | None:
        """The sorted columns a band rule is scored on in `round`: None (all of them) when d is
        at most `columns`, else about `columns` distinct ones drawn from (seed, round) — drawn
        with replacement and deduplicated, which costs O(columns log columns) where an exact
        draw without replacement would permute all d (~5 ms at d = 1e6)."""
        if self.scores_every_column(dim):
            return None
        rng = np.random.default_rng(derive_seed(self.seed, "suspicion", round))
        return np.unique(rng.integers(0, dim, self.columns))

    def state_dict(self) -> dict[str, Any]:
        """Tensors, not numpy arrays: checkpoints are read with torch.load(weights_only=True)."""
        return {
            "weighted": torch.from_numpy(self._weighted.copy()),
            "total": self._total,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._weighted = torch.as_tensor(state["weighted"], dtype=torch.float64).numpy().copy()
        self._total = float(state["total"])
