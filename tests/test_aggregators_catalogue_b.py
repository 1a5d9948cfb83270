"""bulyan, mda, smea, monna, caf and dnc: against plain-numpy references, their tolerance
refusals and parameter checks, and against adversarial numbers.

The references work on the d-dimensional rows (the rules work on the n × n Gram), so agreement
checks the Gram-space derivations too: eigenvalues of the covariance from the centred Gram
(smea, caf), projections on the top direction from Gram products (caf, dnc).

Robustness cases reuse the generators of test_aggregator_properties (honest rows at magnitudes
1e±30, f adversarial rows: ±inf, NaN, ±FLT_MAX, copies, collusion, cancelling pairs …), plain,
under nnm and under bucketing (bulyan: not bucketing, whose ⌈n/s⌉ buckets rarely satisfy
n' ≥ 4f + 3). The output must be finite and, where the rule's paper gives a worst-case bound,
within it — each bound's derivation is in the test's docstring and the rule's.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_aggregator_properties import (
    PROFILE,
    REL_SLACK,
    TINY,
    WRAPS,
    Case,
    Config,
    base_view,
    configs,
    make_case,
    slack,
)

from byzps.common.aggregators import AGGREGATORS, build_aggregator, forced_backend
from byzps.common.aggregators.rows import RESOLUTION

RULES = ("bulyan", "mda", "smea", "monna", "caf", "dnc")
#: A twentieth of the property file's examples for the reference checks, a tenth for the
#: adversarial ones (BYZPS_PROPERTY_EXAMPLES scales all of them).
EXAMPLES = max(10, int(os.environ.get("BYZPS_PROPERTY_EXAMPLES", "2000")) // 20)
SETTINGS = settings(PROFILE, max_examples=EXAMPLES)
ADVERSARIAL = settings(PROFILE, max_examples=2 * EXAMPLES)
ORACLE = settings(
    SETTINGS, suppress_health_check=[*PROFILE.suppress_health_check, HealthCheck.filter_too_much]
)


# ---------------------------------------------------------------------------------- references


def nnm_ref(x: np.ndarray, f: int) -> np.ndarray:
    """Each row replaced by the mean of its n − f nearest rows (itself first)."""
    n = x.shape[0]
    dists = ((x[:, None] - x[None]) ** 2).sum(axis=2)
    np.fill_diagonal(dists, -np.inf)
    nearest = np.argsort(dists, axis=1, kind="stable")[:, : n - f]
    return np.array([x[idx].mean(axis=0) for idx in nearest])


def bulyan_ref(x: np.ndarray, f: int, beta: int | None = None) -> np.ndarray:
    """Bulyan on x; with `beta`, only its coordinate stage (x are the selected rows)."""
    n = x.shape[0]
    theta, beta = (n - 2 * f, n - 4 * f) if beta is None else (n, beta)
    dists = ((x[:, None] - x[None]) ** 2).sum(axis=2)
    left = list(range(n))
    chosen = []
    for _ in range(theta):
        r = len(left)
        k = min(max(1, r - f - 2), r - 1)
        scores = [
            sum(sorted(dists[j, i] for i in left if i != j)[:k]) if r > 1 else 0.0 for j in left
        ]
        pick = left[int(np.argmin(scores))]
        chosen.append(pick)
        left.remove(pick)
    s = np.sort(x[chosen], axis=0)
    median = np.median(s, axis=0)
    out = np.empty(x.shape[1])
    for t in range(x.shape[1]):  # the β values nearest the median, the lower of a tied pair
        nearest = sorted(s[:, t], key=lambda v, m=median[t]: (abs(v - m), v))[:beta]
        out[t] = np.mean(nearest)
    return out


def mda_ref(x: np.ndarray, f: int) -> np.ndarray:
    dists = ((x[:, None] - x[None]) ** 2).sum(axis=2)
    best = min(
        itertools.combinations(range(x.shape[0]), x.shape[0] - f),
        key=lambda s: max((dists[i, j] for i, j in itertools.combinations(s, 2)), default=0.0),
    )
    return x[list(best)].mean(axis=0)


def smea_ref(x: np.ndarray, f: int) -> np.ndarray:
    def top(s: tuple[int, ...]) -> float:
        y = x[list(s)] - x[list(s)].mean(axis=0)
        return float(np.linalg.svd(y, compute_uv=False)[0] ** 2)

    best = min(itertools.combinations(range(x.shape[0]), x.shape[0] - f), key=top)
    return x[list(best)].mean(axis=0)


def monna_ref(x: np.ndarray, f: int, pivot: str | int) -> np.ndarray:
    n = x.shape[0]
    dists = ((x[:, None] - x[None]) ** 2).sum(axis=2)
    if pivot == "densest":  # the mean of the rows whose k-th nearest other is nearest
        k = max(1, math.ceil(n / 2) - 1)
        kth = np.array([np.sort(np.delete(dists[i], i))[k - 1] if n > 1 else 0.0 for i in range(n)])
        z = x[kth <= kth.min() * (1 + RESOLUTION)].mean(axis=0)
    else:
        z = x[pivot]
    nearest = np.argsort(((x - z) ** 2).sum(axis=1), kind="stable")[: n - f]
    return x[nearest].mean(axis=0)


def caf_ref(x: np.ndarray, f: int) -> np.ndarray:
    n = x.shape[0]
    c = np.ones(n)
    best, out = np.inf, x.mean(axis=0)
    while c.sum() > n - 2 * f:
        mu = c @ x / c.sum()
        y = x - mu
        values, vectors = np.linalg.eigh((y.T * c) @ y / c.sum())
        lam = max(values[-1], 0.0)
        if lam < best:
            best, out = lam, mu
        if lam == 0.0:
            break
        tau = np.where(c > 0, (y @ vectors[:, -1]) ** 2, 0.0)
        c = c * np.maximum(1.0 - tau / tau.max(), 0.0)
    return out


def dnc_ref(x: np.ndarray, f: int, columns: list[np.ndarray | None], c: float) -> np.ndarray:
    n = x.shape[0]
    kept = np.zeros(n, int)
    for cols in columns:
        sub = x if cols is None else x[:, cols]
        y = sub - sub.mean(axis=0)
        v = np.linalg.svd(y)[2][0]
        kept[np.argsort((y @ v) ** 2, kind="stable")[: n - int(c * f)]] += 1
    chosen = kept == kept.max()
    return x[chosen].mean(axis=0)


def tolerated(rule: str, n: int) -> int:
    """The largest f the rule accepts on n rows."""
    return (n - 3) // 4 if rule == "bulyan" else (n - 1) // 2


# ------------------------------------------------------------------------------ oracle checks


@pytest.mark.parametrize("pre", [(), ("nnm",)])
@pytest.mark.parametrize("rule", RULES)
def test_matches_the_numpy_reference(rule: str, pre: tuple[str, ...]) -> None:
    """Continuous random rows (ties have probability 0), some of them shifted far away; under
    nnm the reference applies to numpy's nnm rows (not for bulyan: at its f ≤ (n − 3)/4, nnm's
    n − f neighbourhoods repeat, and the repeated rows tie in Krum's scores)."""
    if rule == "bulyan" and pre:
        pytest.skip("nnm∘bulyan's mixed rows tie; covered by the adversarial test")

    @ORACLE
    @given(
        n=st.integers(3, 10),
        f=st.integers(0, 4),
        d=st.integers(1, 6),
        outliers=st.integers(0, 3),
        seed=st.integers(0, 2**32 - 1),
    )
    def inner(n: int, f: int, d: int, outliers: int, seed: int) -> None:
        n = max(n, 7) if rule == "bulyan" else n
        f = min(f, tolerated(rule, n))
        rng = np.random.default_rng(seed)
        x = rng.standard_normal((n, d))
        x[: min(outliers, f)] += 10.0 ** rng.uniform(0, 6) * rng.standard_normal(d)
        params = {"pivot": int(rng.integers(n))} if rule == "monna" and rng.random() < 0.5 else {}
        if rule == "dnc":
            params = {
                "subsample": int(rng.integers(1, d + 1)),
                "filter_frac": float(rng.uniform(0.5, 2)),
            }
            params["niters"] = int(rng.integers(1, 4))
            if n - int(params["filter_frac"] * f) < 1:
                params["filter_frac"] = 1.0
        agg = build_aggregator(rule, f, pre=pre, params=params, seed=seed % 1000)
        base = agg.base if pre else agg
        rows = nnm_ref(x, f) if pre else x
        # nnm maps rows with the same neighbourhood to the same point: exact ties, which the
        # Gram's rounding and the reference's break differently
        gaps = ((rows[:, None] - rows[None]) ** 2).sum(axis=2) + np.diag(np.full(n, np.inf))
        assume(gaps.min() > 1e-12 * float((rows**2).sum()))
        if rule == "dnc":
            cols = [base.columns(d, r) for r in range(base.niters)]
            expected = dnc_ref(rows, f, cols, base.filter_frac)
        elif rule == "monna":
            expected = monna_ref(rows, f, params.get("pivot", "densest"))
        else:
            expected = globals()[f"{rule}_ref"](rows, f)
        out = agg(torch.from_numpy(x)).numpy()
        scale = float(np.abs(rows).max())
        np.testing.assert_allclose(out, expected, rtol=1e-7, atol=1e-9 * scale)

    inner()


@pytest.mark.parametrize("pre", [(), ("nnm",), ("bucketing", "nnm")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rule", RULES)
def test_the_torch_fallback_agrees_bitwise(rule: str, pre: tuple[str, ...], dtype) -> None:
    """The torch path (the GPU's) chooses the same rows from its own Gram and combines them in
    the same order; bulyan's coordinate stage sums its window in the kernel's order.

    caf is the exception, as gm and cclip are in test_aggregators: its weights are a continuous
    function of the Gram (each step scales them by 1 − τ_i / max τ), and the two backends' Grams
    differ in rounding (numba's blocked sum against torch's matmul). Bitwise equality held on
    the project's earlier AVX2 machines by chance; on an AVX-512 one (Zen 5) the outputs
    differed by one float32 ulp. So for caf the rows it keeps must be the same and the output
    equal to within rounding."""
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.standard_normal((15, 300))).to(dtype)
    x[2, 10:] *= 1e4
    x[4, :5] = torch.inf
    params = {"subsample": 16} if rule == "dnc" else {}
    f = 1 if rule == "bulyan" and pre else 2  # bucketing leaves n' = 8 ≥ 4f + 3
    outs, verdicts = [], []
    for backend in ("numba", "torch"):
        with forced_backend(backend):
            aggregator = build_aggregator(rule, f, pre=pre, params=params, seed=1)
            outs.append(aggregator(x))
            verdicts.append(aggregator.last_verdict)
    assert torch.isfinite(outs[0]).all()
    if rule != "caf":
        assert torch.equal(outs[0], outs[1])
        return
    kept = [np.flatnonzero(verdict.weights) for verdict in verdicts]
    np.testing.assert_array_equal(kept[0], kept[1])
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    scale = float(x[x.isfinite()].abs().max())
    torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol * scale)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_bulyan_keeps_the_values_nearest_the_median_on_ties(backend: str) -> None:
    """Half-integers tie often, both in value and in distance to the median: the window must
    be the β nearest values, the lower of two equally far ones. Four far rows leave Krum no
    choice (n = 11, f = 2), so the θ = 7 selected rows are known; β = 3."""
    rng = np.random.default_rng(3)
    close = rng.integers(-3, 4, (7, 200)) * 0.5
    far = np.array([1e3, -1e3, 5e3, -5e3])[:, None] * np.ones(200)
    with forced_backend(backend):
        out = build_aggregator("bulyan", 2)(torch.from_numpy(np.vstack([close, far]))).numpy()
    np.testing.assert_allclose(out, bulyan_ref(close, 0, beta=3), rtol=1e-12)


def test_mda_and_smea_search_twenty_choose_eight_quickly() -> None:
    """n = 20, f = 8 is C(20, 8) = 125,970 subsets; branch and bound visits a fraction."""
    import time

    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.standard_normal((20, 30)))
    x[:8] += 3.0 * torch.from_numpy(rng.standard_normal(30))
    for rule, limit in (("mda", 0.5), ("smea", 5.0)):
        agg = build_aggregator(rule, 8, n=20)
        agg(x[:17, :3])  # compile outside the clock
        start = time.perf_counter()
        agg(x)
        assert time.perf_counter() - start < limit, rule


# ------------------------------------------------------------------ refusals and validation


@pytest.mark.parametrize(
    ("rule", "n", "f"),
    [
        ("bulyan", 10, 2),
        ("bulyan", 6, 1),
        ("mda", 6, 3),
        ("smea", 4, 2),
        ("monna", 8, 4),
        ("caf", 2, 1),
        ("dnc", 10, 5),
    ],
)
def test_refuses_more_byzantine_inputs_than_it_tolerates(rule: str, n: int, f: int) -> None:
    with pytest.raises(ValueError, match=f"f={f}, n={n}"):
        build_aggregator(rule, f, n=n)
    build_aggregator(rule, f - 1, n=n)  # one fewer is accepted
    with pytest.raises(ValueError, match=f"f={f}, n={n}"):
        build_aggregator(rule, f)(torch.zeros(n, 3))


@pytest.mark.parametrize("rule", ["mda", "smea"])
def test_exact_search_beyond_the_cap_is_refused_before_the_run(rule: str) -> None:
    with pytest.raises(ValueError, match="max_subsets=2,000,000"):
        build_aggregator(rule, 12, n=26)
    build_aggregator(rule, 12, n=26, params={"max_subsets": math.comb(26, 12)})
    with pytest.raises(ValueError, match="max_subsets=10"):
        build_aggregator(rule, 2, params={"max_subsets": 10})(torch.zeros(6, 2))


@pytest.mark.parametrize(
    ("rule", "params", "name"),
    [
        ("mda", {"max_subsets": 0}, "max_subsets"),
        ("smea", {"max_subsets": 1.5}, "max_subsets"),
        ("monna", {"pivot": -1}, "pivot"),
        ("monna", {"pivot": "first"}, "pivot"),
        ("dnc", {"niters": 0}, "niters"),
        ("dnc", {"subsample": 0}, "subsample"),
        ("dnc", {"filter_frac": -0.5}, "filter_frac"),
        ("dnc", {"filter_frac": math.inf}, "filter_frac"),
    ],
)
def test_bad_parameters_are_refused_by_name(rule: str, params: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name} "):
        build_aggregator(rule, 1, params=params)


def test_dnc_refuses_a_negative_seed() -> None:
    with pytest.raises(ValueError, match=r"^seed "):
        build_aggregator("dnc", 1, seed=-1)


def test_monna_refuses_a_pivot_outside_the_inputs() -> None:
    with pytest.raises(ValueError, match="pivot=7"):
        build_aggregator("monna", 1, params={"pivot": 7}, n=5)


# --------------------------------------------------------------------------- dnc's randomness


def test_dnc_is_reproducible_from_its_seed_and_checkpoint() -> None:
    rng = np.random.default_rng(2)
    x = torch.from_numpy(rng.standard_normal((12, 500))).float()
    x[:3] += 0.5
    params = {"subsample": 20}
    first = build_aggregator("dnc", 3, params=params, seed=7)
    again = build_aggregator("dnc", 3, params=params, seed=7)
    other = build_aggregator("dnc", 3, params=params, seed=8)
    assert not np.array_equal(first.columns(500, 0), other.columns(500, 0))
    outs = [first(x) for _ in range(3)]
    assert torch.equal(outs[0], again(x))
    assert not np.array_equal(first.columns(500, 0), again.columns(500, 0))  # counter moved on
    restored = build_aggregator("dnc", 3, params=params, seed=7)
    restored.load_state_dict(again.state_dict())
    assert restored.state_dict() == {"calls": 1}
    assert torch.equal(restored(x), outs[1])


# ------------------------------------------------------------------------ adversarial numbers


def _box(case: Case, out: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> None:
    amplitude = np.maximum(np.abs(lo), np.abs(hi))
    tol = 32 * case.n * case.eps * amplitude + REL_SLACK * (hi - lo) + TINY
    assert np.all(out >= lo - tol) and np.all(out <= hi + tol), (out, lo, hi)


def check_bound(case: Case, out: np.ndarray) -> None:
    """Finite, and within the rule's bound (H: honest base rows, r, D: their radius around μ_H
    and diameter, [lo, hi] their range; nnm and bucketing change these as in
    test_aggregator_properties):

    * bulyan (n ≥ 4f + 3): the θ selected rows hold ≤ f Byzantine ones and θ ≥ 2f + 1, so the
      median is in [lo, hi]; θ − f ≥ β honest values lie within w = hi − lo of it, so every
      value of the β-window does: x̂ ∈ [lo − w, hi + w] per coordinate.
    * mda (2f < n): H has n − f rows within D, so the chosen subset's diameter is ≤ D, and it
      holds an honest row: ‖x̂ − μ_H‖ ≤ D + r.
    * smea (2f < n): an (n − f)-subset of H has top covariance eigenvalue ≤ r², hence so has the
      chosen S; its honest part T (share α ≥ (n − 2f)/(n − f)) has a mean within
      √(λ (1 − α)/α) of x̂ (Var_S ≥ α δ²/(1 − α) along the gap): ‖x̂ − μ_H‖ ≤ r (1 + √(f/(n − 2f))).
    * monna, densest pivot (2f < n): the pivot is within D + r of μ_H, every honest row within
      D + 2r of it, so are its n − f nearest: ‖x̂ − μ_H‖ ≤ 2D + 3r.
    * caf (n > 3f; the rule's docstring has the steps): the first step that takes at least as
      much weight from honest rows as from the others has λ ≤ 2 n r²/(n − 2f) (before it the
      honest rows lost less weight than the others, so W_H − W_B ≥ n − 2f), and such a step
      comes before the loop ends; the output's iterate has W > n − 2f, so W_B/W_H ≤ f/(n − 3f),
      and ‖x̂ − μ_H‖ ≤ r + √(λ W_B/W_H) ≤ r (1 + √(2 n f/((n − 2f)(n − 3f)))). Finite only
      for n ≤ 3f.
    * dnc: finite only — its paper's analysis is empirical.
    """
    assert np.isfinite(out).all(), out
    n, f, g = base_view(case)
    distance = float(np.linalg.norm(out - g.centre))
    if case.rule == "bulyan":
        w = g.hi - g.lo
        _box(case, out, g.lo - w, g.hi + w)
        return
    bounds = {
        "mda": g.diameter + g.radius,
        "smea": g.radius * (1 + math.sqrt(f / max(n - 2 * f, 1))),
        "monna": 2 * g.diameter + 3 * g.radius,
    }
    if n > 3 * f:
        bounds["caf"] = g.radius * (1 + math.sqrt(2 * n * f / ((n - 2 * f) * (n - 3 * f))))
    if case.rule in bounds:
        bound = bounds[case.rule]
        assert distance <= bound + slack(case, bound), (distance, bound)


@pytest.mark.parametrize("rule", RULES)
def test_output_is_finite_and_within_the_rules_bound(rule: str) -> None:
    """Each drawn configuration under every wrapper the rule's tolerance allows; the exact
    searches (mda, smea) on n ≤ 12 rows."""
    wraps = WRAPS[:2] if rule == "bulyan" else WRAPS

    @ADVERSARIAL
    @given(config=configs("cm"))
    def inner(config: Config) -> None:
        n = max(config.n, 3) if rule != "bulyan" else max(config.n, 7)
        n = min(n, 12) if rule in ("mda", "smea") else n
        config = dataclasses.replace(config, n=n, f=min(config.f, tolerated(rule, n)))
        rng = np.random.default_rng(config.seed)
        for pre in wraps:
            case = make_case(config, rule, pre, rng)
            with forced_backend(config.backend):
                out = case.agg(case.x)
            check_bound(case, out.double().numpy())

    inner()


def test_every_rule_is_registered() -> None:
    assert set(RULES) <= set(AGGREGATORS.names())
