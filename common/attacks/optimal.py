"""alie-opt and ipm-opt: ALIE's and IPM's directions, with the scale re-chosen every round by a
line search that maximises the damage against the aggregator the run actually uses.

Why: ALIE's z (Baruch et al. 2019) and IPM's ε (Xie et al. 2020) are fixed numbers tuned for
no rule in particular; the "optimal" variants of ByzFL (`Optimal_ALittleIsEnough`,
`Optimal_InnerProductManipulation`; used by Allouah et al. 2023, "Fixing by mixing", AISTATS)
instead pick the scale s that maximises

    damage(s) = ‖ F(h_1, …, h_{n−f}, t(s), …, t(s)) − μ ‖,   t(s) = origin + s · direction,

with F the run's aggregator (pre-aggregators included), h_i the honest candidates and μ their
mean; ALIE's line is μ − s·σ, IPM's is −s·μ (strategies.alie_line, strategies.ipm_line).

The search is ByzFL's, step for step (`LineSearch`): evaluate s = start; *expansion*: try
s + δ, doubling δ after every improvement, until one fails (then δ ← ratio·δ); *contraction*:
try best + δ and shrink δ ← ratio·δ after every try, until `evals` evaluations are spent. One
difference, on purpose: the fixed attack's own scale (alie_z(n, f), resp. ipm's ε = 0.1) is
evaluated as well, after the search, so the optimal variant never does less damage than the
fixed one on the same inputs. Cost per round: evals + 1 aggregations of n rows (plus one
more in a deployed cohort, which advances its own copy of a stateful aggregator).
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Callable
from dataclasses import dataclass

from torch import Tensor

from byzps.common.attacks.base import ATTACKS, Attack, AttackView
from byzps.common.attacks.strategies import IPM_EPSILON, _repeat, alie_line, alie_z, ipm_line

#: The largest `evals` accepted: each evaluation is one aggregation of n rows per round.
MAX_EVALS = 1000


def _finite_number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class LineSearch:
    """ByzFL's expansion–contraction line search for the maximum of a function of one scale.

    Parameters (validated, ValueError naming them): `evals` evaluations in all (1 … MAX_EVALS),
    the first at `start`; the first step `delta` (finite, non-zero; its sign is the direction
    explored); the contraction `ratio` in (0.5, 1).
    """

    evals: int = 20
    start: float = 0.0
    delta: float = 10.0
    ratio: float = 0.8

    def __post_init__(self) -> None:
        evals = self.evals
        if isinstance(evals, bool) or not isinstance(evals, int) or not 1 <= evals <= MAX_EVALS:
            raise ValueError(f"evals must be an integer in [1, {MAX_EVALS}], got {evals!r}")
        object.__setattr__(self, "start", _finite_number("start", self.start))
        delta = _finite_number("delta", self.delta)
        if delta == 0:
            raise ValueError("delta must be non-zero, got 0")
        object.__setattr__(self, "delta", delta)
        ratio = _finite_number("ratio", self.ratio)
        if not 0.5 < ratio < 1:
            raise ValueError(f"ratio must be in (0.5, 1), got {self.ratio!r}")
        object.__setattr__(self, "ratio", ratio)

    def maximise(self, objective: Callable[[float], float]) -> list[tuple[float, float]]:
        """Every (scale, value) evaluated, in order; the best is the first of the largest."""
        trials = [(self.start, objective(self.start))]
        best_x, best_y = trials[0]
        delta = self.delta
        expanding = True
        while len(trials) < self.evals:
            x = best_x + delta
            y = objective(x)
            trials.append((x, y))
            if y > best_y:
                best_x, best_y = x, y
                delta = 2 * delta if expanding else self.ratio * delta
            else:
                expanding = False
                delta *= self.ratio
        return trials


@dataclass(frozen=True)
class SearchResult:
    """The chosen scale, its damage, and every (scale, damage) the search evaluated."""

    scale: float
    damage: float
    trials: tuple[tuple[float, float], ...]


def damage(view: AttackView, target: Tensor) -> float:
    """‖F(honest rows, f copies of `target`) − μ‖ with F = view.aggregate and μ the honest
    mean; NaN damage (an aggregate that is not finite) counts as −inf, never as the best."""
    if view.aggregate is None:
        raise ValueError("this attack needs the run's aggregator (AttackView.aggregate)")
    rows = view.rows(target.unsqueeze(0).expand(view.f, -1))
    gap = view.aggregate(rows).double() - view.honest.double().mean(dim=0)
    value = float(gap.norm())
    return value if not math.isnan(value) else -math.inf


class OptimalScale(Attack):
    """A line of targets origin + s·direction, s chosen each round by `LineSearch` against the
    run's aggregator (see the module doc). Parameters: `evals`, `start`, `delta`, `ratio`."""

    uses_honest = True
    uses_aggregator = True

    def __init__(
        self, evals: int = 20, start: float = 0.0, delta: float = 10.0, ratio: float = 0.8
    ) -> None:
        self.search_params = LineSearch(evals, start, delta, ratio)

    @abstractmethod
    def line(self, honest: Tensor) -> tuple[Tensor, Tensor]:
        """(origin, direction), both (d,), of the attack's family of targets."""

    @abstractmethod
    def fixed_scale(self, view: AttackView) -> float:
        """The fixed attack's scale, evaluated beside the search."""

    def search(self, view: AttackView) -> SearchResult:
        """The best scale for this round's view; the aggregator's state is not advanced."""
        origin, direction = self.line(view.honest)

        def objective(scale: float) -> float:
            return damage(view, origin + scale * direction)

        trials = self.search_params.maximise(objective)
        anchor = self.fixed_scale(view)
        trials.append((anchor, objective(anchor)))
        best = max(range(len(trials)), key=lambda i: (trials[i][1], -i))
        return SearchResult(trials[best][0], trials[best][1], tuple(trials))

    def targets(self, view: AttackView) -> Tensor:
        origin, direction = self.line(view.honest)
        scale = self.search(view).scale
        return _repeat(origin + scale * direction, view.bases.shape[0])


@ATTACKS.register("alie-opt")
class OptimalALittleIsEnough(OptimalScale):
    """Optimal ALIE (ByzFL's Optimal_ALittleIsEnough; Allouah et al. 2023): t = μ − z*·σ, with
    z* = argmax_z ‖F(h, t(z)) − μ‖ over ByzFL's line search from z = `start` (plus ALIE's
    own z = Φ⁻¹((n − m − s)/(n − m)), Baruch et al. 2019) against the run's aggregator F.

    ByzFL writes ALIE as μ + τσ and searches τ ≥ 0; byzps keeps ALIE's μ − zσ, so z here is
    ByzFL's −τ (a negative `delta` searches the other side).
    """

    def line(self, honest: Tensor) -> tuple[Tensor, Tensor]:
        return alie_line(honest)

    def fixed_scale(self, view: AttackView) -> float:
        return alie_z(view.n, view.f)


@ATTACKS.register("ipm-opt")
class OptimalInnerProductManipulation(OptimalScale):
    """Optimal IPM (ByzFL's Optimal_InnerProductManipulation; Allouah et al. 2023): t = −ε*·μ,
    with ε* = argmax_ε ‖F(h, t(ε)) − μ‖ over ByzFL's line search from ε = `start` (plus ipm's
    default ε = 0.1, Xie et al. 2020) against the run's aggregator F."""

    def line(self, honest: Tensor) -> tuple[Tensor, Tensor]:
        return ipm_line(honest)

    def fixed_scale(self, view: AttackView) -> float:
        del view
        return IPM_EPSILON
