"""A deterministic GradientOracle for reference tests: it replays a fixed gradient sequence.

grad(x, ξ_t) = B[t] + S[t] ⊙ x  and  full_grad(x) = F + R ⊙ x, row by row, with B, S, F, R drawn
once from a seeded numpy generator. The gradient depends on x (unless `x_dependent=False`), so the
two evaluations of a variance-reduced estimator on one batch differ; the mini-batch of round t is
just the index t, so a reference loop can recompute every gradient in numpy float64.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


class ReplayOracle:
    """Replays round t's gradients; records every `sample` call (to check one batch per round)."""

    def __init__(
        self, num_workers: int, dim: int, rounds: int, seed: int = 0, *, x_dependent: bool = True
    ) -> None:
        rng = np.random.default_rng(seed)
        self.num_workers = num_workers
        self.dim = dim
        self.rounds = rounds
        scale = 1.0 if x_dependent else 0.0
        self.B = rng.standard_normal((rounds, num_workers, dim))
        self.S = scale * rng.uniform(0.5, 1.5, (rounds, num_workers, dim))
        self.F = rng.standard_normal((num_workers, dim))
        self.R = scale * rng.uniform(0.5, 1.5, (num_workers, dim))
        self.sampled: list[int] = []

    # --- the GradientOracle protocol (torch) ---
    def sample(self, round: int) -> int:
        self.sampled.append(round)
        return round % self.rounds

    def grad(self, x: Tensor, batch: int, out: Tensor | None = None) -> Tensor:
        return torch.from_numpy(self.np_grad(x.double().cpu().numpy(), batch))

    def full_grad(self, x: Tensor) -> Tensor:
        return torch.from_numpy(self.np_full_grad(x.double().cpu().numpy()))

    # --- the same numbers in numpy float64, for reference recursions ---
    def np_grad(self, x: np.ndarray, t: int) -> np.ndarray:
        t = t % self.rounds
        return self.B[t] + self.S[t] * x[None, :]

    def np_full_grad(self, x: np.ndarray) -> np.ndarray:
        return self.F + self.R * x[None, :]


def model_sequence(dim: int, rounds: int, seed: int = 1) -> list[Tensor]:
    """A fixed sequence of models x^0..x^{T−1} (float64), standing in for the server's steps."""
    rng = np.random.default_rng(seed)
    return [torch.from_numpy(rng.standard_normal(dim)) for _ in range(rounds)]
