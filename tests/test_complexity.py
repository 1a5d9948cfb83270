"""byzps.sim.complexity: the step sizes prescribed for ε, first-hit times of real simulator runs
(hit, at x⁰, censored), and the slope fit that turns them into an exponent."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.common.tasks.a9a import weighted_logistic
from byzps.common.tasks.regularizers import Regularizer
from byzps.sim import complexity as cx
from byzps.sim.build import build_simulation


def schedule(method: str = "byz-dm21", **changes: float) -> cx.StepSchedule:
    values = {"sigma": 0.5, "L": 2.0, "c_eta": 0.25, "c_gamma": 1.0, "gamma_max": 0.4} | changes
    return cx.StepSchedule(method, **values)


def tiny_config() -> RunConfig:
    """A quadratic small enough to run hundreds of rounds in well under a second."""
    params = {"dim": 8, "heterogeneity": 0.0, "noise": 0.1, "mu": 0.1, "L": 1.0}
    return RunConfig.from_dict(
        {
            "run": {"seed": 3, "rounds": 10},
            "task": {"name": "quadratic", "params": params},
            "cluster": {"workers": 5, "byzantine": 1},
            "algorithm": {"name": "byz-dm21"},
            "compressor": {"name": "topk", "k": 4},
            "aggregator": {"name": "cm", "pre": ["nnm"], "suspicion_halflife": 0.0},
            "attack": {"name": "alie", "knowledge": "omniscient"},
        }
    )


def tiny_schedule(method: str = "byz-dm21") -> cx.StepSchedule:
    """The schedule of tiny_config's task (σ = noise·√d), with room to step fast."""
    config = tiny_config()
    sigma, L = cx.quadratic_noise_and_smoothness(config, build_run_task(config))
    return cx.StepSchedule(method, sigma, L, c_eta=0.25, c_gamma=1.0, gamma_max=0.9)


def log_slope(f: Callable[[float], float], eps: float) -> float:
    """d log f / d log ε, by a small finite difference."""
    return math.log(f(eps * 1.01) / f(eps)) / math.log(1.01)


# --- the schedule -------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "gamma_exponent"), [("byz-dm21", 2.0), ("byz-vr-dm21", 1.0)])
def test_the_schedule_has_the_exponents_of_the_analysis(method: str, gamma_exponent: float) -> None:
    s = schedule(method)
    for eps in np.geomspace(1e-3, 0.9 * s.largest_asymptotic_eps(), 7):
        assert s.asymptotic(eps)
        assert log_slope(s.eta, eps) == pytest.approx(2.0, abs=1e-6)
        assert log_slope(s.gamma, eps) == pytest.approx(gamma_exponent, abs=1e-6)


@pytest.mark.parametrize("method", ["byz-dm21", "byz-vr-dm21"])
def test_the_schedule_is_monotone_and_clips_at_one_and_gamma_max(method: str) -> None:
    s = schedule(method)
    grid = np.geomspace(1e-3, 10.0, 60)
    etas, gammas = [s.eta(e) for e in grid], [s.gamma(e) for e in grid]
    assert all(b >= a for a, b in itertools.pairwise(etas))
    assert all(b >= a for a, b in itertools.pairwise(gammas))
    assert s.eta(10.0) == 1.0 and s.gamma(10.0) == s.gamma_max
    top = s.largest_asymptotic_eps()
    assert s.asymptotic(0.999 * top) and not s.asymptotic(1.001 * top)


def test_the_clip_that_sets_in_first_bounds_the_grid() -> None:
    # η = 1 at ε = σ/√c_η = 1; γ = c_γ η/L reaches γ_max = 0.1 at η = 0.1, ε = σ√(η/c_η) = √0.1.
    s = schedule(sigma=0.5, L=1.0, c_eta=0.25, c_gamma=1.0, gamma_max=0.1)
    assert s.largest_asymptotic_eps() == pytest.approx(math.sqrt(0.1))
    assert schedule(gamma_max=10.0).largest_asymptotic_eps() == pytest.approx(1.0)


def test_a_plan_refuses_a_grid_in_the_clipped_regime() -> None:
    s = schedule()
    with pytest.raises(ValueError, match="clipped"):
        cx.MethodPlan(s, (0.1, 2 * s.largest_asymptotic_eps()))
    with pytest.raises(ValueError, match="no schedule"):
        schedule("br-sgdm")


def test_the_plan_file_of_the_experiment_loads_inside_the_regime() -> None:
    here = Path(__file__).resolve().parents[1] / "experiments/claims/complexity"
    base = RunConfig.load(here / "base.toml")
    sigma, L = cx.quadratic_noise_and_smoothness(base, build_run_task(base))
    plan = cx.load_plan(here / "sweep.toml", sigma, L)
    assert {m.schedule.method for m in plan.methods} == set(cx.CLAIMED_EXPONENT)
    assert len(plan.seeds) >= 5


@pytest.mark.parametrize(("method", "flow_exponent"), [("byz-dm21", -3.0), ("byz-vr-dm21", -2.0)])
def test_the_quadratic_model_has_the_exponents_its_doc_derives(
    method: str, flow_exponent: float
) -> None:
    model, s = cx.QuadraticModel(dim=32, kappa=1000.0, g0=1.5), schedule(method)
    eps = 0.01
    assert log_slope(lambda e: model.flow_rounds(s, e), eps) == pytest.approx(
        flow_exponent, abs=1e-3
    )
    damping = -2.0 - 1.0 / math.log(1.5 / eps)
    assert log_slope(lambda e: model.damping_rounds(s, e), eps) == pytest.approx(damping, abs=1e-2)
    both = (model.flow_rounds(s, eps), model.damping_rounds(s, eps))
    assert model.rounds(s, eps) == max(both)


# --- first hits on real runs --------------------------------------------------------------------


def test_first_hit_is_the_first_round_below_eps_squared() -> None:
    eps = 0.3
    run = cx.configure(tiny_config(), tiny_schedule(), eps, seed=3, cap=400)
    task = build_run_task(run)
    t, status = cx.first_hit(run, task, eps)
    assert status == "hit" and t > 1
    replay = build_simulation(run, task)
    norms = []
    for _ in range(t):
        replay.step()
        norms.append(cx.grad_norm_sq(task, replay.x))
    assert all(n > eps * eps for n in norms[:-1]) and norms[-1] <= eps * eps
    coarse, _ = cx.first_hit(run, task, eps, every=7)
    assert coarse % 7 == 0 and t <= coarse < t + 7


def test_a_run_that_starts_stationary_hits_at_round_zero() -> None:
    run = cx.configure(tiny_config(), tiny_schedule(), 0.3, seed=3, cap=5)
    task = build_run_task(run)
    assert cx.first_hit(run, task, 1e3) == (0, "hit")


def test_a_run_that_cannot_reach_eps_by_the_cap_is_censored() -> None:
    s = tiny_schedule("byz-vr-dm21")
    hit = cx.measure(tiny_config(), s, 1e-4, seed=3, cap=6)
    assert (hit.rounds, hit.status, hit.censored) == (6, "censored", True)
    assert hit.eta == s.eta(1e-4) and hit.gamma == s.gamma(1e-4)


def test_configure_sets_the_prescribed_step_sizes() -> None:
    s = schedule("byz-vr-dm21")
    run = cx.configure(tiny_config(), s, 0.2, seed=7, cap=123)
    assert run.algorithm.name == "byz-vr-dm21"
    assert (run.algorithm.eta, run.algorithm.lr) == (s.eta(0.2), s.gamma(0.2))
    assert (run.run.seed, run.run.rounds) == (7, 123)


# --- the fit ------------------------------------------------------------------------------------


def synthetic(slope: float, noise: float, seeds: int = 5, seed: int = 0) -> tuple[list, list]:
    rng = np.random.default_rng(seed)
    eps = list(np.geomspace(0.2, 0.02, 6))
    rounds = [
        list(50 * (e / 0.2) ** slope * np.exp(noise * rng.standard_normal(seeds))) for e in eps
    ]
    return eps, rounds


@pytest.mark.parametrize("slope", [-4.0, -3.0, -2.0])
def test_the_fit_recovers_a_known_slope_with_an_interval_that_covers_it(slope: float) -> None:
    fit = cx.fit_slope(*synthetic(slope, noise=0.3))
    assert fit.slope == pytest.approx(slope, abs=0.25)
    assert fit.covers(slope) and fit.boot_low <= slope <= fit.boot_high
    assert fit.high - fit.low < 1.0  # informative, not vacuous


def test_the_fit_tells_two_slopes_apart() -> None:
    assert not cx.fit_slope(*synthetic(-2.0, noise=0.3)).covers(-3.0)


def test_censored_runs_keep_a_minority_median_and_drop_a_majority_one() -> None:
    eps, rounds = synthetic(-3.0, noise=0.0)
    minority = [*rounds[:-1], [*rounds[-1][:3], math.inf, math.inf]]
    majority = [*rounds[:-1], [rounds[-1][0], *[math.inf] * 4]]
    exact = cx.fit_slope(eps, rounds)
    assert cx.fit_slope(eps, minority).slope == pytest.approx(exact.slope)
    dropped = cx.fit_slope(eps, majority)
    assert dropped.eps_excluded == (eps[-1],) and len(dropped.eps_used) == len(eps) - 1
    with pytest.raises(ValueError, match=">= 3"):
        cx.fit_slope(eps[:2], rounds[:2])


def test_hits_round_trip_through_json(tmp_path: Path) -> None:
    hits = [cx.Hit("byz-dm21", 0.1, s, 0.01, 0.02, 10 + s, "hit", 0.5) for s in range(3)]
    hits.append(cx.Hit("byz-dm21", 0.05, 0, 0.004, 0.006, 99, "censored", 1.0))
    cx.save_hits(tmp_path / "hits.json", hits, "python run.py", 12.5)
    assert cx.load_hits(tmp_path / "hits.json") == (hits, "python run.py", 12.5)
    grid, table = cx.rounds_by_eps(hits)
    assert grid == [0.1, 0.05] and table == [[10.0, 11.0, 12.0], [math.inf]]


# --- the a9a variant: σ from per-row gradients, L from a bound, batched seeds -------------------


def test_the_gradient_variance_is_the_mean_over_shards_of_the_per_row_variance() -> None:
    # Two shards of two unit rows at x = 0, where every residual is σ(0) − y = 1/2 − y.
    features = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8], [0.6, 0.8]])
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0])
    shards = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    x = torch.zeros(2)
    # Shard 0: gradients (−½, 0) and (0, ½), mean (−¼, ¼), each ‖g − ḡ‖² = 1/8; shard 1: equal
    # gradients, variance 0. Mean over the shards: 1/16.
    assert cx.logistic_gradient_variance(features, labels, shards, x) == pytest.approx(1 / 16)
    # Away from 0: the brute-force variance of (σ(aᵀx) − y)·a.
    x = torch.tensor([0.3, -1.2])
    grads = (torch.sigmoid(features @ x) - labels)[:, None] * features
    brute = [float(grads[s].var(0, unbiased=False).sum()) for s in shards]
    got = cx.logistic_gradient_variance(features, labels, shards, x)
    assert got == pytest.approx(sum(brute) / 2, rel=1e-5)
    with pytest.raises(ValueError, match="shard"):
        cx.logistic_gradient_variance(features, labels, [], x)


@pytest.mark.parametrize("regularizer", ["nonconvex", "l2"])
def test_the_smoothness_bound_holds_and_is_attained_by_the_regulariser_at_zero(
    regularizer: str,
) -> None:
    lam = 0.1
    bound = cx.logistic_smoothness_bound(regularizer, lam)
    assert bound == pytest.approx(0.25 + (2 * lam if regularizer == "nonconvex" else lam))
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(40, 5, generator=gen, dtype=torch.float64)
    features /= features.norm(dim=1, keepdim=True)
    labels = (torch.rand(40, generator=gen, dtype=torch.float64) > 0.5).to(torch.float64)
    reg = Regularizer(regularizer, lam)

    def objective(x: torch.Tensor) -> torch.Tensor:
        return weighted_logistic(x, features, labels, 1.0 / 40, reg)[0]

    points = [torch.zeros(5, dtype=torch.float64)]
    points += [3 * torch.randn(5, generator=gen, dtype=torch.float64) for _ in range(5)]
    for x in points:
        hessian = torch.autograd.functional.hessian(objective, x)
        assert float(torch.linalg.matrix_norm(hessian, ord=2)) <= bound
    # The regulariser alone reaches its part of the bound at x = 0 (2λ, resp. λ).
    curvature = torch.autograd.functional.hessian(
        lambda x: reg.value(x), torch.zeros(5, dtype=torch.float64)
    )
    assert float(curvature.diagonal().max()) == pytest.approx(bound - 0.25)
    with pytest.raises(ValueError, match="no smoothness bound"):
        cx.logistic_smoothness_bound("huber", lam)


def test_the_a9a_plan_loads_inside_the_regime_with_its_estimated_constants() -> None:
    here = Path(__file__).resolve().parents[1] / "experiments/claims/complexity-a9a"
    base = RunConfig.load(here / "base.toml")
    assert (base.task.name, base.task.regularizer) == ("a9a-logreg", "nonconvex")
    sigma, smoothness = cx.noise_and_smoothness(base, build_run_task(base))
    assert smoothness == pytest.approx(0.45)  # 1/4 + 2λ, λ = 0.1
    assert 0.3 < sigma < 0.7  # rows are unit-norm and residuals at x⁰ = 0 are ±1/2
    plan = cx.load_plan(here / "sweep.toml", sigma, smoothness)
    assert {m.schedule.method for m in plan.methods} == set(cx.CLAIMED_EXPONENT)
    assert len(plan.seeds) >= 3 and plan.batch_seeds and plan.every > 1
    with pytest.raises(ValueError, match="a9a-logreg"):
        cx.a9a_noise_and_smoothness(tiny_config(), build_run_task(tiny_config()))


def test_batched_seeds_hit_when_each_run_alone_does() -> None:
    s, eps, seeds = tiny_schedule(), 0.3, [3, 4, 5]
    alone = [cx.measure(tiny_config(), s, eps, seed, cap=400, every=5) for seed in seeds]
    together = cx.measure_seeds(tiny_config(), s, eps, seeds, cap=400, every=5)
    assert [(h.seed, h.rounds, h.status) for h in together] == [
        (h.seed, h.rounds, h.status) for h in alone
    ]
    assert all(h.status == "hit" for h in together)
    # Runs that cannot reach ε by the cap are censored at it, as alone.
    configs = [cx.configure(tiny_config(), s, 1e-4, seed, cap=6) for seed in seeds[:2]]
    found = cx.first_hits(configs, [build_run_task(c) for c in configs], 1e-4, every=4)
    assert found == [(6, "censored"), (6, "censored")]


def test_a_report_without_a_model_shows_the_time_scales(tmp_path: Path) -> None:
    eps, rounds = synthetic(-2.0, noise=0.1, seeds=3)
    s = schedule()
    hits = [
        cx.Hit("byz-dm21", e, seed, s.eta(e), s.gamma(e), round(r), "hit", 0.1)
        for e, row in zip(eps, rounds, strict=True)
        for seed, r in enumerate(row)
    ]
    plan = cx.Plan((cx.MethodPlan(s, tuple(eps)),), (0, 1, 2), cap=10**6, every=10)
    here = Path(__file__).resolve().parents[1] / "experiments/claims/complexity-a9a"
    base = RunConfig.load(here / "base.toml")
    fits = {"byz-dm21": cx.fit_hits(hits)}
    landscape = cx.Landscape(g0=0.18, x_max=0.3, grad_at_x=1e-11, mu=0.1, top=0.3, zeta_sq=1e-4)
    notes = cx.a9a_notes(base, plan, landscape)
    report = cx.render_report(base, plan, hits, fits, None, "python run.py", 1.0, notes)
    assert report.startswith("# Iteration complexity on a9a (nonconvex regulariser)")
    assert "| γ·T | η·T |" in report and "model: flow" not in report
    assert f"η·T ∝ ε^{fits['byz-dm21'].slope + 2:.2f}" in report
    assert "condition number 3.0" in report and "{" not in notes.limits
    cx.plot_rounds(plan, hits, fits, None, tmp_path / "complexity.png")
    assert (tmp_path / "complexity.png").stat().st_size > 0
    assert cx.report_notes(tiny_config(), plan) is cx.QUADRATIC_NOTES


def test_the_landscape_finds_the_stationary_point_and_its_curvature() -> None:
    gen = torch.Generator().manual_seed(1)
    features = torch.randn(60, 4, generator=gen, dtype=torch.float64)
    features /= features.norm(dim=1, keepdim=True)
    labels = (torch.rand(60, generator=gen, dtype=torch.float64) > 0.5).to(torch.float64)
    reg = Regularizer("nonconvex", 0.1)
    same = [torch.arange(60), torch.arange(60)]
    shape = cx.logistic_landscape(features, labels, reg, same, torch.zeros(4, dtype=torch.float64))
    assert shape.grad_at_x <= 1e-10 and shape.zeta_sq == pytest.approx(0.0, abs=1e-20)
    _, grad0 = weighted_logistic(torch.zeros(4, dtype=torch.float64), features, labels, 1 / 60, reg)
    assert shape.g0 == pytest.approx(float(grad0.norm()))
    x = torch.zeros(4, dtype=torch.float64)  # the stationary point, found again by plain descent
    for _ in range(3000):
        x -= 2.0 * weighted_logistic(x, features, labels, 1 / 60, reg)[1]
    hessian = torch.autograd.functional.hessian(
        lambda z: weighted_logistic(z, features, labels, 1 / 60, reg)[0], x
    )
    eigenvalues = torch.linalg.eigvalsh(hessian)
    assert (shape.mu, shape.top) == pytest.approx((float(eigenvalues[0]), float(eigenvalues[-1])))
    assert shape.x_max == pytest.approx(float(x.abs().max()), abs=1e-8)
    halves = [torch.arange(30), torch.arange(30, 60)]
    assert cx.logistic_landscape(features, labels, reg, halves, x).zeta_sq > 0
