"""Distance-based rules: krum, multikrum, gm (smoothed Weiszfeld) and cclip (centered clipping).

All of them only need distances between the inputs and affine combinations of them, so each makes
one pass over the data for the centred Gram matrix (`Rows.gram`), iterates in n-dimensional
coefficient space (`gram`), and makes one more pass for the output (`Rows.combine`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import Tensor

from byzps.common.aggregators.gram import pairwise_sq_dists, sq_dists_to
from byzps.common.aggregators.rows import Rows
from byzps.common.aggregators.rule import RowsAggregator, register, require


def _copy(t: Tensor) -> Tensor:
    """A private copy; on CPU through numpy, because a torch op here would wake torch's OpenMP
    pool, whose spinning threads then slow down the next numba kernel on the same cores."""
    return torch.from_numpy(t.numpy().copy()) if t.device.type == "cpu" else t.clone()


def _positive(name: str, value: float) -> None:
    if not value > 0:
        raise ValueError(f"{name} must be positive, got {value}")


def _non_negative(name: str, value: int) -> None:
    if value < 0:
        raise ValueError(f"{name} must be non-negative, got {value}")


@register("multikrum")
class MultiKrum(RowsAggregator):
    """x̂ = (1/m) Σ_{j ∈ S} x_j, S = the m inputs with the smallest scores

        score_j = Σ_{i ∈ N_j} ‖x_i − x_j‖²,  N_j = the n − f − 2 nearest other inputs of x_j.

    Ties go to the lower index. m defaults to n − f. Needs n − f − 2 ≥ 1.
    """

    def __init__(self, f: int = 0, m: int | None = None) -> None:
        super().__init__(f)
        if m is not None and m < 1:
            raise ValueError(f"m must be at least 1, got {m}")
        self.m = m

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        require(n - f - 2 >= 1, self.name, "n − f − 2 ≥ 1", f, n)
        m = n - f if self.m is None else self.m
        if m > n:
            raise ValueError(f"{self.name} cannot select m={m} of n={n} inputs")
        dists = pairwise_sq_dists(rows.gram())
        np.fill_diagonal(dists, np.inf)
        scores = np.sort(dists, axis=1)[:, : n - f - 2].sum(axis=1)
        chosen = np.argsort(scores, kind="stable")[:m]
        weights = np.zeros(n)
        weights[chosen] = 1.0 / m
        return rows.combine(weights)


@register("krum")
class Krum(MultiKrum):
    """x̂ = x_j* with j* = argmin_j score_j (multikrum with m = 1)."""

    def __init__(self, f: int = 0) -> None:
        super().__init__(f, m=1)


@register("gm")
class GeometricMedian(RowsAggregator):
    """Smoothed Weiszfeld iterations towards argmin_z Σ_i ‖x_i − z‖, started at the mean:

        z⁰ = (1/n) Σ_i x_i,   w_i = 1 / max(ν, ‖x_i − zᵗ‖),   zᵗ⁺¹ = Σ_i w_i x_i / Σ_i w_i.

    ν keeps the weights finite when zᵗ lands on an input. Tolerates f < n/2.
    """

    def __init__(self, f: int = 0, iterations: int = 8, nu: float = 0.1) -> None:
        super().__init__(f)
        _non_negative("iterations", iterations)
        _positive("nu", nu)
        self.iterations = iterations
        self.nu = nu

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        require(2 * f < n, self.name, "2f < n", f, n)
        gram = rows.gram()
        alpha = np.full(n, 1.0 / n)
        for _ in range(self.iterations):
            weights = 1.0 / np.maximum(self.nu, np.sqrt(sq_dists_to(gram, alpha)))
            alpha = weights / weights.sum()
        return rows.combine(alpha)


@register("cclip")
class CenteredClipping(RowsAggregator):
    """L steps of clipping around the previous output v⁰ (zeros before the first call):

        vˡ⁺¹ = vˡ + (1/n) Σ_i (x_i − vˡ) · min(1, τ / ‖x_i − vˡ‖),   x̂ = v^L,

    and x̂ becomes the next call's v⁰. The centre is the rule's only state (`state_dict`), so a
    restored checkpoint reproduces the next output exactly. Tolerates f < n/2.
    """

    def __init__(self, f: int = 0, tau: float = 10.0, iterations: int = 3) -> None:
        super().__init__(f)
        _positive("tau", tau)
        _non_negative("iterations", iterations)
        self.tau = tau
        self.iterations = iterations
        self.centre: Tensor | None = None

    def aggregate(self, rows: Rows, f: int) -> Tensor:
        n = rows.n
        require(2 * f < n, self.name, "2f < n", f, n)
        x = rows.x
        if self.centre is None:
            centre = torch.zeros(x.shape[1], dtype=x.dtype, device=x.device)
        else:
            centre = self.centre.to(x.device, x.dtype)
        # Basis: the n rows, then the old centre (index n); c holds vˡ's coefficients.
        gram = rows.gram_with(centre[None])
        c = np.zeros(n + 1)
        c[n] = 1.0
        for _ in range(self.iterations):
            dist = np.sqrt(sq_dists_to(gram, c)[:n])
            clip = self.tau / np.maximum(self.tau, dist)  # = min(1, τ/‖x_i − vˡ‖), 1 at distance 0
            c *= 1.0 - clip.sum() / n
            c[:n] += clip / n
        out = rows.combine(c[:n], centre[None], c[n:])
        self.centre = _copy(out)
        return out

    def state_dict(self) -> dict[str, Any]:
        return {"centre": None if self.centre is None else self.centre.clone()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        centre = state["centre"]
        self.centre = None if centre is None else centre.detach().clone()
