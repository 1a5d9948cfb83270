"""Regularisers of the logistic-regression task, with analytic gradients (no autograd on the hot
path): "l2" (λ/2)‖x‖² keeps the problem strongly convex; "nonconvex" λ Σ x_j²/(1 + x_j²) is the
bounded non-convex penalty of the Byz-EF21 line of work."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

#: Default λ of each regulariser (the paper's settings).
DEFAULT_LAMBDA: dict[str, float] = {"l2": 5.6e-4, "nonconvex": 0.1}


@dataclass(frozen=True)
class Regularizer:
    """A named penalty r(x) with strength `lam`."""

    kind: str
    lam: float

    def __post_init__(self) -> None:
        if self.kind not in DEFAULT_LAMBDA:
            known = ", ".join(sorted(DEFAULT_LAMBDA))
            raise ValueError(f"unknown regularizer {self.kind!r}; known: {known}")
        if self.lam < 0:
            raise ValueError(f"regularizer strength must be >= 0, got {self.lam}")

    @classmethod
    def named(cls, kind: str, lam: float | None = None) -> Regularizer:
        """`kind` with the paper's default λ unless `lam` is given."""
        return cls(kind, DEFAULT_LAMBDA.get(kind, 0.0) if lam is None else lam)

    def value(self, x: Tensor) -> Tensor:
        sq = x.square()
        if self.kind == "l2":
            return 0.5 * self.lam * sq.sum()
        return self.lam * (sq / (1 + sq)).sum()

    def grad(self, x: Tensor) -> Tensor:
        if self.kind == "l2":
            return self.lam * x
        return (2 * self.lam) * x / (1 + x.square()).square()

    def curvature(self, x: Tensor) -> Tensor:
        """The Hessian's diagonal (it is diagonal for both): λ, or 2λ(1 − 3x²)/(1 + x²)³."""
        if self.kind == "l2":
            return torch.full_like(x, self.lam)
        sq = x.square()
        return 2 * self.lam * (1 - 3 * sq) / (1 + sq) ** 3
