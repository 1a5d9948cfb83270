"""The attacks of docs/algorithms.md#attacks, one small class each, built by name through ATTACKS.

Each class chooses target candidates from an AttackView; the cohort (cohort.py) turns targets into
k-sparse messages. The colluding attacks (alie, ipm, minmax, scale; alie-opt and ipm-opt in
optimal.py) give every member the same target. `scale` and `overflow` are not from the
robust-learning literature: they test the server's numerics (large norms, the float32 range)
rather than the robust aggregator's statistics.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from statistics import NormalDist

import numpy as np
import torch
from torch import Tensor

from byzps.common.attacks._kernels import sample_std
from byzps.common.attacks.base import ATTACKS, Attack, AttackView, RunsView


def _repeat(target: Tensor, m: int) -> Tensor:
    """The same (d,) target for all m colluding members."""
    return target.unsqueeze(0).expand(m, -1).clone()


def _honest_std(honest: Tensor) -> Tensor:
    """Coordinate-wise sample standard deviation over the rows (dim −2 of (h, d), or of
    (R, h, d) for R runs at once); zero when fewer than two honest rows. float32 on CPU goes
    through the compiled kernel (`_kernels.sample_std`, the same float64 accumulation as
    `torch.std`, 10–30× faster at these shapes); anything else through torch."""
    if honest.shape[-2] < 2:
        return torch.zeros_like(honest[..., 0, :])
    if honest.device.type != "cpu" or honest.dtype != torch.float32:
        return honest.std(dim=-2)
    stack = np.ascontiguousarray(honest.detach().numpy().reshape(-1, *honest.shape[-2:]))
    return torch.from_numpy(sample_std(stack)).reshape(honest.shape[:-2] + honest.shape[-1:])


def _line_targets(
    honest: Tensor, members: int, line: Callable[[Tensor], tuple[Tensor, Tensor]], scale: float
) -> Tensor:
    """Each run's colluding target origin + scale · direction on `line` of its honest rows
    (honest: (R, h, d), one run's rows per slice), repeated for its `members`, run after run.
    The runs are reduced together: torch reduces each (h, d) slice over its rows exactly as
    alone (the same outer reduction, the runs one more output dimension), and the rest is
    elementwise."""
    origin, direction = line(honest.contiguous())
    return (origin + scale * direction).repeat_interleave(members, dim=0)


def _run_line_targets(
    runs: RunsView, line: Callable[[Tensor], tuple[Tensor, Tensor]], scale: float
) -> Tensor:
    """`_line_targets` of every run of `runs`, from its stacked honest rows."""
    members = runs.bases.shape[0] // runs.runs
    return _line_targets(runs.stacked(runs.honest, runs.runs), members, line, scale)


#: ipm's default ε, also the fixed scale that ipm-opt evaluates beside its search.
IPM_EPSILON = 0.1

#: The largest finite float32, 3.4028235e38: the wire's and the server state's range.
FLT_MAX = float(torch.finfo(torch.float32).max)


def _check_magnitude(attack: str, value: float, limit: float, limit_name: str) -> float:
    """`value` as a float in (0, limit]; a ValueError that names the attack otherwise."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{attack} magnitude must be a number, got {value!r}")
    if not (math.isfinite(value) and 0 < value <= limit):
        raise ValueError(f"{attack} magnitude must be in (0, {limit_name}], got {value!r}")
    return float(value)


@functools.cache  # a run asks it every round with the same n and m
def alie_z(n: int, m: int) -> float:
    """ALIE's z (Baruch et al. 2019): z = Φ⁻¹((n − m − s)/(n − m)), s = ⌊n/2 + 1⌋ − m.

    s is how many honest workers the attackers must "win over" for a majority. When the quantile
    leaves (0, 1) (too few or too many attackers for the formula), it is clamped so z stays finite.
    """
    if not 0 <= m < n:
        raise ValueError(f"alie needs 0 <= m < n, got m={m}, n={n}")
    s = (n // 2 + 1) - m
    q = (n - m - s) / (n - m)
    q = min(max(q, 1e-6), 1 - 1e-6)
    return NormalDist().inv_cdf(q)


def alie_line(honest: Tensor) -> tuple[Tensor, Tensor]:
    """ALIE's family of targets μ + z·(−σ), as (origin μ, direction −σ); alie picks z = alie_z,
    alie-opt searches it. Over the rows: (h, d) → (d,), or (R, h, d) → (R, d)."""
    return honest.mean(dim=-2), -_honest_std(honest)


def ipm_line(honest: Tensor) -> tuple[Tensor, Tensor]:
    """IPM's family of targets 0 + ε·(−μ), as (origin 0, direction −μ); ipm fixes ε, ipm-opt
    searches it. Over the rows: (h, d) → (d,), or (R, h, d) → (R, d)."""
    mu = honest.mean(dim=-2)
    return torch.zeros_like(mu), -mu


@ATTACKS.register("na")
class NoAttack(Attack):
    """No attack: Byzantine workers are absent. Asking it for targets is a programming error."""

    def targets(self, view: AttackView) -> Tensor:
        raise RuntimeError("attack 'na' has no Byzantine members to choose targets for")


@ATTACKS.register("alie")
class ALittleIsEnough(Attack):
    """ALIE: t = μ − z·σ with μ, σ the coordinate-wise mean and std of the honest candidates."""

    uses_honest = True

    def __init__(self, z: float | None = None) -> None:
        self.z = z

    def targets(self, view: AttackView) -> Tensor:
        z = self._z(view.n, view.f)
        return _line_targets(view.honest[None], view.bases.shape[0], alie_line, z)

    def targets_runs(self, runs: RunsView) -> Tensor:
        return _run_line_targets(runs, alie_line, self._z(runs.n, runs.f))

    def _z(self, n: int, f: int) -> float:
        return self.z if self.z is not None else alie_z(n, f)


@ATTACKS.register("ipm")
class InnerProductManipulation(Attack):
    """IPM (Xie et al. 2020): t = −ε·μ, turning the aggregate's inner product with μ negative."""

    uses_honest = True

    def __init__(self, epsilon: float = IPM_EPSILON) -> None:
        self.epsilon = epsilon

    def targets(self, view: AttackView) -> Tensor:
        return _line_targets(view.honest[None], view.bases.shape[0], ipm_line, self.epsilon)

    def targets_runs(self, runs: RunsView) -> Tensor:
        return _run_line_targets(runs, ipm_line, self.epsilon)


@ATTACKS.register("sf")
class SignFlip(Attack):
    """Sign flip: each member targets −a_r for an honest candidate a_r drawn at random."""

    uses_honest = True

    def targets(self, view: AttackView) -> Tensor:
        m, h = view.bases.shape[0], view.honest.shape[0]
        picks = torch.randint(h, (m,), generator=view.generator)
        return -view.honest[picks.to(view.honest.device)]


@ATTACKS.register("lf")
class LabelFlip(Attack):
    """Label flip: run the honest estimator on labels y → (C − 1) − y; the target is that result."""

    flips_labels = True
    uses_shadow = True

    def targets(self, view: AttackView) -> Tensor:
        return view.shadow.clone()


@ATTACKS.register("bf")
class BitFlip(Attack):
    """Bit flip: t = −(the member's own honest candidate)."""

    uses_shadow = True

    def targets(self, view: AttackView) -> Tensor:
        return -view.shadow


@ATTACKS.register("gauss")
class GaussianNoise(Attack):
    """Gaussian noise: t ~ N(0, σ² I), drawn per member from the round's generator."""

    def __init__(self, sigma: float = 0.5) -> None:
        if sigma < 0:
            raise ValueError(f"gauss sigma must be non-negative, got {sigma}")
        self.sigma = sigma

    def targets(self, view: AttackView) -> Tensor:
        noise = torch.randn(view.bases.shape, generator=view.generator, dtype=view.bases.dtype)
        return (self.sigma * noise).to(view.bases.device)


@ATTACKS.register("mimic")
class Mimic(Attack):
    """Mimic (Karimireddy et al. 2022): every member copies one fixed honest worker's candidate,
    over-weighting that worker's data in the aggregate (harmful under heterogeneity)."""

    uses_honest = True

    def __init__(self, target: int = 0) -> None:
        if target < 0:
            raise ValueError(f"mimic target must be non-negative, got {target}")
        self.target = target

    def targets(self, view: AttackView) -> Tensor:
        return _repeat(view.honest[self.target % view.honest.shape[0]], view.bases.shape[0])


@ATTACKS.register("minmax")
class MinMax(Attack):
    """Min-max (Shejwalkar & Houmansadr 2021): t = μ − γσ with the largest γ ≥ 0 such that
    max_i ‖t − a_i‖ ≤ max_{i,j} ‖a_i − a_j‖ over the honest candidates a_i.

    Each constraint ‖(μ − a_i) − γσ‖² ≤ D² is a quadratic in γ, so γ is solved in closed form
    (the smallest upper root over i) instead of by bisection. γ = 0 is always feasible because μ
    is a convex combination of the a_i.
    """

    uses_honest = True

    def targets(self, view: AttackView) -> Tensor:
        honest = view.honest.double()
        mu = honest.mean(dim=0)
        sigma = _honest_std(honest)
        m = view.bases.shape[0]
        c = float(sigma @ sigma)
        if c == 0.0:
            return _repeat(mu.to(view.bases.dtype), m)
        max_dist_sq = float(torch.cdist(honest, honest).max() ** 2)
        offsets = mu.unsqueeze(0) - honest  # (h, d): μ − a_i
        a = (offsets * offsets).sum(dim=1)
        b = offsets @ sigma
        disc = (b * b - c * (a - max_dist_sq)).clamp_min(0.0)
        gamma = float(((b + disc.sqrt()) / c).min().clamp_min(0.0))
        return _repeat((mu - gamma * sigma).to(view.bases.dtype), m)


@ATTACKS.register("scale")
class LargeNorm(Attack):
    """Large-norm collusion: every member targets t = −M·μ/‖μ‖, μ the mean honest candidate.

    The opposite of the honest direction at norm M (`magnitude`, default 1e6, in (0, FLT_MAX/2]);
    when μ = 0 the direction is −1/√d · (1, …, 1). The classic test of an aggregator without
    a norm bound (the plain mean moves by f·M/n), and of the server's numerics: a state of norm
    M squared in a distance computation (Krum, NNM: ‖a_i − a_j‖² ~ M²) overflows float32 for
    M ≳ 1.8e19. Bounded by FLT_MAX/2 so that t − b stays finite while the members' own states
    (|b| ≤ M once they reached t) are within range.
    """

    uses_honest = True

    def __init__(self, magnitude: float = 1e6) -> None:
        self.magnitude = _check_magnitude("scale", magnitude, FLT_MAX / 2, "FLT_MAX/2")

    def targets(self, view: AttackView) -> Tensor:
        mu = view.honest.double().mean(dim=0)
        norm = float(mu.norm())
        if norm > 0 and math.isfinite(norm):
            direction = mu / norm
        else:
            direction = torch.full_like(mu, 1.0 / math.sqrt(mu.numel()))
        target = (-self.magnitude * direction).to(view.bases.dtype)
        return _repeat(target, view.bases.shape[0])


@ATTACKS.register("overflow")
class Overflow(Attack):
    """Float32 overflow: every message value is ±M (M = `magnitude`, default FLT_MAX =
    3.4028235e38), always with the same sign (`sign`, +1 or −1), so the state it lands in leaves
    float32's range.

    Target t_j = b_j + sign·M/gain (float64: it lies beyond float32 when b_j is large), so the
    cohort's message C(t_j − b_j) carries ±M on the coordinates the compressor keeps — finite
    float32, passing the wire's finiteness check. What that does on the server:

    * "state" rule (Byz-DM21, EF21): g_j ← g_j + c_j. The first accepted push makes g_j = ±M on
      the k kept coordinates (finite, but the mean of f ≥ 2 such rows already overflows); the
      second, with Top-k keeping the same coordinates (ties go to the lower index), makes
      g_j = ±inf. A server must refuse that push at the door (its application would make the
      sender's state non-finite), leaving the state unchanged; the cohort then retries the same
      push every round and is refused every time.
    * rules whose candidate is the message (CSGD): the candidate is ±M every round; the
      aggregate of several such rows overflows unless the aggregator is robust to it.
    * Rand-k: the values are ±M all the same (`gain` undoes the d/k scaling where the cohort
      does not), but each push lands on freshly drawn coordinates, so under the "state" rule
      the overflow waits until a coordinate is drawn a second time.

    A coordinate whose server-side state is already ±inf (a server that accepted the overflow)
    gets a zero message there (see cohort._deviation), so later messages stay finite.
    """

    def __init__(self, magnitude: float = FLT_MAX, sign: int = 1) -> None:
        self.magnitude = _check_magnitude("overflow", magnitude, FLT_MAX, "FLT_MAX")
        if sign not in (1, -1) or isinstance(sign, bool):
            raise ValueError(f"overflow sign must be 1 or -1, got {sign!r}")
        self.sign = sign

    def targets(self, view: AttackView) -> Tensor:
        step = self.sign * self.magnitude / view.gain
        return view.bases.double() + step


@ATTACKS.register("inf")
class Infinity(Attack):
    """Inf (ByzFL's and ByzPy's `Inf`): every coordinate of every Byzantine vector is +inf.

    Target t_j = +inf everywhere, so the cohort's message C(t_j − b_j) carries +inf on every
    coordinate the compressor keeps — through the same compressor, k_max and wire path as every
    attack. byzps's door refuses a message with a non-finite value (INVALID_ARGUMENT; the
    simulator runs the same check), so every push is refused, the members' server-side states
    keep their initial values, and the run goes on exactly as if the members were silent (the
    simulator counts the refusals in `Simulation.refused`). It checks that the door, not the
    aggregator, stops a non-finite vector; `overflow` is the finite relative that does reach the
    aggregator (±FLT_MAX).
    """

    def targets(self, view: AttackView) -> Tensor:
        return torch.full_like(view.bases, math.inf)
