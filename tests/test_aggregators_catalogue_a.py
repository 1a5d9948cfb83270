"""meamed, cge and the clipping pre-aggregators (clip, arc): against plain-numpy references, on
their tolerance conditions and parameters, and against adversarial numbers with the property
suite's generators (tests/test_aggregator_properties.py), each within the bound its docstring
derives:

* meamed (f < n/2): lo_t − e_t ≤ x̂_t ≤ hi_t + e_t,  e_t = f/(n − f) · (hi_t − lo_t);
* cge (3f < n): ‖x̂‖ ≤ max over the honest base rows of ‖y_i‖ (about the origin);
* clip, arc: the base rule's bound, on the honest rows after clipping (with τ recomputed here).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace

import numpy as np
import pytest
import torch
from hypothesis import assume, given, note, settings
from hypothesis import strategies as st
from test_aggregator_properties import PROFILE as SUITE_PROFILE
from test_aggregator_properties import (
    Case,
    Config,
    Geometry,
    base_view,
    check_box,
    check_krum,
    configs,
    honest_base_rows,
    honest_geometry,
    make_case,
    nnm_geometry,
    slack,
)
from test_aggregators import (
    close,
    krum_choice_is_clear,
    ref_cm,
    ref_cwtm,
    ref_krum,
    ref_nnm_rows,
    sample,
)

from byzps.common.aggregators import (
    AGGREGATORS,
    WRAPPERS,
    AdaptiveRobustClipping,
    NearestNeighborMixing,
    StaticClipping,
    build_aggregator,
    forced_backend,
)
from byzps.common.aggregators.clipping import arc_clipped
from byzps.common.aggregators.ops import window_network

SETTINGS = settings(max_examples=40, deadline=None)
#: The property suite's example count (BYZPS_PROPERTY_EXAMPLES, default 2000), scaled so that this
#: file stays under a minute by default: 400 examples per property test.
EXAMPLES = max(1, int(os.environ.get("BYZPS_PROPERTY_EXAMPLES", "2000")) // 5)
PROFILE = settings(SUITE_PROFILE, max_examples=EXAMPLES)


# ---------------------------------------------------------------- brute-force references (float64)


def ref_meamed(x: np.ndarray, f: int) -> np.ndarray:
    """Per column, the mean of the n − f values nearest the median (mean of the middle pair for
    even n), NaN as +inf; of two values equally far, the lower is kept (meamed's docstring)."""
    n = len(x)
    out = np.empty(x.shape[1])
    for t in range(x.shape[1]):
        column = np.sort(np.where(np.isnan(x[:, t]), np.inf, x[:, t]))
        median = 0.5 * (column[(n - 1) // 2] + column[n // 2])
        with np.errstate(invalid="ignore"):
            distance = np.abs(column - median)
        # lexsort: by distance, then by value (the lower of a tie first)
        out[t] = column[np.lexsort((column, distance))[: n - f]].mean()
    return out


def ref_cge(x: np.ndarray, f: int) -> np.ndarray:
    norms = np.linalg.norm(x, axis=1)
    return x[np.argsort(norms, kind="stable")[: len(x) - f]].mean(axis=0)


def clip_rows(x: np.ndarray, tau: float) -> np.ndarray:
    """min(1, τ/‖x_i‖) x_i; rows without a finite norm unchanged."""
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt((x**2).sum(axis=1))
    scale = np.ones(len(x))
    over = np.isfinite(norms) & (norms > tau)
    scale[over] = tau / norms[over]
    return x * scale[:, None]


def arc_radius(x: np.ndarray, f: int) -> float:
    with np.errstate(over="ignore", invalid="ignore"):
        norms = np.sqrt((x**2).sum(axis=1))
    norms[~np.isfinite(norms)] = np.inf
    return float(np.sort(norms)[len(x) - arc_clipped(len(x), f) - 1])


def arc_rows(x: np.ndarray, f: int) -> np.ndarray:
    return clip_rows(x, arc_radius(x, f))


def choice_is_clear(rule: str, rows: np.ndarray, f: int) -> bool:
    """False when the n − f kept values (meamed, per column) or rows (cge) hinge on a near-tie —
    nnm makes them common (rows with the same neighbours mix alike) — where any choice is right
    and rounding of the mixed rows decides."""
    n = len(rows)
    if f == 0:
        return True
    if rule == "cge":
        keys = np.sort(np.linalg.norm(rows, axis=1))[:, None]
    else:
        median = np.median(rows, axis=0)
        keys = np.sort(np.abs(rows - median), axis=0)
    return bool(np.all(keys[n - f] - keys[n - f - 1] > 1e-6 * np.maximum(keys[-1], 1e-300)))


REFERENCES = {"meamed": ref_meamed, "cge": ref_cge, "cm": ref_cm, "cwtm": ref_cwtm}


def max_f(rule: str, n: int) -> int:
    return (n - 1) // 3 if rule == "cge" else (n - 1) // 2


# ------------------------------------------------------------------------------------- the rules


@SETTINGS
@given(
    rule=st.sampled_from(["meamed", "cge"]),
    pre=st.sampled_from([(), ("nnm",)]),
    n=st.integers(1, 25),
    d=st.integers(1, 40),
    f_frac=st.floats(0, 1),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_rule_matches_reference(rule, pre, n, d, f_frac, seed, dtype):
    f = round(f_frac * max_f(rule, n))
    x = sample(seed, n, d, dtype)
    rows = x.double().numpy()
    if pre:
        rows = ref_nnm_rows(rows, f)
    assume(choice_is_clear(rule, rows, f))
    out = build_aggregator(rule, f, pre=pre)(x)
    assert out.shape == (d,) and out.dtype == dtype
    close(out, REFERENCES[rule](rows, f), dtype)


def test_meamed_examples():
    """The n − f values nearest the median, not the honest range: {0, 0, 10} with two values at
    −1 give −1/3 (meamed's docstring); even n takes the middle pair's mean as the median; a tie
    keeps the lower value; f = 0 is the mean."""
    x = torch.tensor([[0.0], [0.0], [10.0], [-1.0], [-1.0]], dtype=torch.float64)
    assert build_aggregator("meamed", 2)(x).item() == pytest.approx(-1 / 3)
    x = torch.tensor([[1.0], [2.0], [4.0], [100.0]], dtype=torch.float64)  # median 3: {2, 4, 1}
    assert build_aggregator("meamed", 1)(x).item() == pytest.approx(7 / 3)
    x = torch.tensor([[-1.0], [0.0], [1.0]], dtype=torch.float64)  # −1 and 1 tie around 0
    assert build_aggregator("meamed", 1)(x).item() == -0.5
    x = sample(1, 7, 30)
    close(build_aggregator("meamed", 0)(x), x.numpy().mean(axis=0), torch.float64)


@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_meamed_ignores_non_finite_values(backend):
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 500))
    for t in range(500):  # ≤ 4 values per column replaced by inf, −inf, NaN or 0
        bad = rng.permutation(9)[: rng.integers(0, 5)]
        x[bad, t] = rng.choice([np.nan, np.inf, -np.inf, 0.0], len(bad))
    with forced_backend(backend):
        out = build_aggregator("meamed", 4)(torch.from_numpy(x)).numpy()
    assert np.isfinite(out).all()
    np.testing.assert_allclose(out, ref_meamed(x, 4), rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("pre", [(), ("nnm",), ("bucketing",)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_meamed_backends_agree_bitwise(pre, dtype):
    rng = np.random.default_rng(5)
    x = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0, 2.5], (11, 700))
    x[:, :350] = rng.standard_normal((11, 350))
    outs = []
    for backend in ("numba", "torch"):
        with forced_backend(backend):
            agg = build_aggregator("meamed", 2, pre=pre, seed=2)
            outs.append(agg(torch.from_numpy(x).to(dtype)).numpy())
    np.testing.assert_array_equal(outs[0].view(np.uint8), outs[1].view(np.uint8))


@pytest.mark.parametrize("d", [1, 700, 16385])
def test_meamed_columns_are_bitwise_the_full_aggregate(d):
    """meamed is coordinate-wise: the server's incremental round re-runs it on changed columns."""
    x = sample(d, 13, d, torch.float32)
    x[2, : d // 2] = torch.inf
    agg = build_aggregator("meamed", 4)
    assert agg.coordinatewise
    columns = torch.from_numpy(np.random.default_rng(d).permutation(d)[: max(1, d // 3)])
    full = agg(x)
    assert torch.equal(agg.aggregate_columns(x, columns), full[columns])


@pytest.mark.parametrize("n", range(1, 26))
def test_window_networks_sort_what_meamed_reads(n):
    """The ranks that may enter or leave the window, and the middle pair, come out exactly; the
    rest of the window as a set (inputs full of ties, where pruning bugs show)."""
    rng = np.random.default_rng(n)
    x = rng.integers(0, 4, (n, 2000)).astype(float)
    expected = np.sort(x, axis=0)
    for f in range(1, (n + 1) // 2):
        wires = x.copy()
        for i, j in window_network(n, 0, n - f, f):
            wires[i], wires[j] = np.minimum(wires[i], wires[j]), np.maximum(wires[i], wires[j])
        exact = sorted({*range(f), *range(n - f, n), (n - 1) // 2, n // 2})
        np.testing.assert_array_equal(wires[exact], expected[exact])
        np.testing.assert_array_equal(wires[f : n - f].sum(axis=0), expected[f : n - f].sum(axis=0))


def test_cge_keeps_the_smallest_norms_and_never_a_non_finite_row():
    x = sample(2, 10, 6)
    x[0] = torch.inf
    x[1, 2] = torch.nan
    x[2] *= 1e-3  # small: always kept
    out = build_aggregator("cge", 3)(x).numpy()
    finite = x.numpy()[2:]
    close(torch.from_numpy(out), ref_cge(finite, 1), torch.float64)  # 7 of the 8 finite rows
    x[:4] = torch.nan  # more non-finite rows than f: the finite ones alone are averaged
    close(build_aggregator("cge", 3)(x), x.numpy()[4:].mean(axis=0), torch.float64)


# -------------------------------------------------------------------------------------- wrappers


BASES = {"mean": lambda x, f: x.mean(axis=0), "cm": ref_cm, "cwtm": ref_cwtm, "krum": ref_krum}


@SETTINGS
@given(
    wrapper=st.sampled_from(["clip", "arc"]),
    base=st.sampled_from(sorted(BASES)),
    nnm=st.sampled_from([None, "before", "after"]),
    n=st.integers(4, 20),
    seed=st.integers(0, 2**31),
    c=st.floats(0.1, 30),
)
def test_clipping_composes_with_bases_and_nnm(wrapper, base, nnm, n, seed, c):
    """wrapper∘base, nnm∘wrapper∘base (nnm first) and wrapper∘nnm∘base against references."""
    f = max(0, ((n - 3) // 2 if base == "krum" else (n - 1) // 2) // 2)
    x = sample(seed, n, 7)
    rows = x.numpy()
    clip = (lambda r: clip_rows(r, c)) if wrapper == "clip" else (lambda r: arc_rows(r, f))
    if nnm == "before":
        pre, rows = ["nnm", wrapper], clip(ref_nnm_rows(rows, f))
    elif nnm == "after":
        pre, rows = [wrapper, "nnm"], ref_nnm_rows(clip(rows), f)
    else:
        pre, rows = [wrapper], clip(rows)
    assume(krum_choice_is_clear(base, rows, f))
    params = {"c": c} if wrapper == "clip" else {}
    out = build_aggregator(base, f, pre=pre, params=params)(x)
    close(out, BASES[base](rows, f), torch.float64)


def test_arc_clips_the_k_largest_to_the_next_norm():
    """n = 10, f = 3: k = ⌊2 · 3 · 7/10⌋ = 4; norms 1..10 → the four largest clipped to 6."""
    x = torch.diag(torch.arange(1.0, 11.0, dtype=torch.float64))
    out = build_aggregator("mean", 3, pre=["arc"])(x).numpy()
    np.testing.assert_allclose(out, np.minimum(np.arange(1.0, 11.0), 6.0) / 10)


def test_arc_k_is_the_papers_and_byzfls():
    """Exact integers; ByzFL's float product int((2f/n)(n − f)) agrees for f < n/2, n < 242."""
    for n in range(1, 242):
        for f in range(0, n):
            assert arc_clipped(n, f) == math.floor(2 * f * (n - f) / n)
            if 2 * f < n:
                assert arc_clipped(n, f) == int((2 * f / n) * (n - f))
                assert arc_clipped(n, f) >= f  # why τ ≤ the largest honest norm
    assert arc_clipped(242, 33) == 57 and int((2 * 33 / 242) * (242 - 33)) == 56


@pytest.mark.parametrize("wrapper", ["clip", "arc"])
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan])
def test_clipping_leaves_non_finite_rows_non_finite(wrapper, value):
    """A row without a finite norm is passed on as it is (never 0 · inf = NaN made up, never a
    finite point): the plain mean shows it, every robust base discards it as before."""
    x = sample(3, 7, 5) * 10
    x[0, :2] = value
    params = {"c": 1.0} if wrapper == "clip" else {}
    mean = build_aggregator("mean", 1, pre=[wrapper], params=params)(x).numpy()
    assert not np.isfinite(mean[:2]).any() and np.isfinite(mean[2:]).all()
    honest = x.numpy()[1:]
    tau = 1.0 if wrapper == "clip" else arc_radius(x.numpy(), 1)
    clipped = clip_rows(honest, tau)
    for rule in ("cm", "krum", "gm", "meamed", "cge"):
        out = build_aggregator(rule, 1, pre=[wrapper], params=params)(x).numpy()
        assert np.isfinite(out).all(), rule
        # within the clipped honest rows' hull's reach (their norms are all ≤ τ)
        assert np.linalg.norm(out) <= np.linalg.norm(clipped, axis=1).max() * 3, rule


@pytest.mark.parametrize("wrapper", ["clip", "arc"])
def test_clipping_state_and_nothing_clipped_passes_rows_through(wrapper):
    x = sample(4, 6, 3)
    params = {"c": 1e9} if wrapper == "clip" else {}
    agg = build_aggregator("cclip", 1, pre=[wrapper], params=params)
    if wrapper == "clip":
        close(agg(x), build_aggregator("cclip", 1)(x).numpy(), torch.float64)
    else:
        agg(x)
    assert agg.state_dict()["base"]["centre"].shape == (3,)


# ------------------------------------------------------------------------------ errors, registry


@pytest.mark.parametrize(
    ("rule", "pre", "n", "f", "message"),
    [
        ("meamed", (), 4, 2, "meamed needs 2f < n"),
        ("cge", (), 9, 3, "cge needs 3f < n"),
        ("cge", ("nnm",), 6, 2, "cge needs 3f < n"),
        ("cm", ("clip",), 6, 3, "cm needs 2f < n"),
        ("mean", ("arc",), 3, 3, "arc needs f < n"),
        ("cwtm", ("arc",), 8, 4, "cwtm needs 2f < n"),
    ],
)
def test_f_too_large_is_refused_at_build_and_call(rule, pre, n, f, message):
    with pytest.raises(ValueError, match=rf"{message}, got f={f}, n={n}"):
        build_aggregator(rule, f, pre=pre, n=n)
    with pytest.raises(ValueError, match=rf"{message}, got f={f}, n={n}"):
        build_aggregator(rule, f, pre=pre)(torch.ones(n, 3))


@pytest.mark.parametrize("c", [0.0, -1.0, math.inf, math.nan])
def test_clip_radius_must_be_positive_and_finite(c):
    with pytest.raises(ValueError, match="c must be positive and finite"):
        build_aggregator("cm", 1, pre=["clip"], params={"c": c})


def test_registry_and_parameter_routing():
    assert {"meamed", "cge"} <= set(AGGREGATORS.names())
    assert {"clip", "arc"} <= set(WRAPPERS.names())
    agg = build_aggregator("cm", 1, pre=["clip"], params={"c": 3.0})
    assert isinstance(agg, StaticClipping) and agg.c == 3.0
    assert isinstance(build_aggregator("cm", 1, pre=["arc"]), AdaptiveRobustClipping)
    with pytest.raises(ValueError, match="'c'"):
        build_aggregator("cm", 1, params={"c": 3.0})  # no wrapper takes it: the base refuses it


# ----------------------------------------------------------------- adversarial numbers (property)


def widened(g: Geometry, n: int, f: int) -> Geometry:
    """meamed's box: [lo − e, hi + e], e = f/(n − f) · (hi − lo)."""
    e = f / (n - f) * (g.hi - g.lo)
    return replace(g, lo=g.lo - e, hi=g.hi + e)


def check_cge(case: Case, out: np.ndarray, reach: float) -> None:
    size = float(np.linalg.norm(out))
    assert size <= reach + slack(case, reach), (size, reach)


def check_rule(case: Case, out: np.ndarray, n: int, f: int, g: Geometry, reach: float) -> None:
    """The base rule's bound (module docstring) for the honest base rows described by g and
    `reach` (their largest norm, or a bound on it)."""
    assert np.isfinite(out).all(), out
    if case.rule in ("cm", "cwtm"):
        check_box(case, out, g)
    elif case.rule == "meamed":
        check_box(case, out, widened(g, n, f))
    elif case.rule == "krum":
        check_krum(case, out, n, f, g)
    else:
        check_cge(case, out, reach)


def cge_config(config: Config, pre: tuple[str, ...]) -> Config:
    """cge tolerates 3f < n (bucketing: of ⌈n/4⌉ buckets at worst); the generic configs clamp
    f to 2f < n."""
    rows = math.ceil(config.n / 4) if pre == ("bucketing",) else config.n
    return replace(config, f=min(config.f, (rows - 1) // 3))


@pytest.mark.parametrize("rule", ["meamed", "cge"])
def test_output_is_finite_and_within_the_rules_bound(rule):
    """Every drawn configuration under every wrapper: plain, nnm and bucketing."""

    @PROFILE
    @given(config=configs(rule))
    def inner(config: Config) -> None:
        rng = np.random.default_rng(config.seed)
        for pre in ((), ("nnm",), ("bucketing",)):
            drawn = cge_config(config, pre) if rule == "cge" else config
            case = make_case(drawn, rule, pre, rng)
            try:
                with forced_backend(config.backend):
                    out = case.agg(case.x)
                assert out.dtype == config.dtype and out.shape == (config.d,)
                n, f, g = base_view(case)
                rows, _ = honest_base_rows(case)
                reach = float(np.linalg.norm(rows, axis=1).max(initial=0.0))
                check_rule(case, out.double().numpy(), n, f, g, reach)
            except Exception:
                note(f"{'∘'.join((*pre, rule))}: {case}")
                raise

    inner()


@pytest.mark.parametrize("wrapper", ["clip", "arc"])
def test_clipped_output_is_finite_and_within_the_base_rules_bound(wrapper):
    """wrapper∘base and wrapper∘nnm∘base, base drawn among cm, cwtm, meamed, krum and cge, on the
    property suite's adversarial cases: the base rule's bound on the clipped honest rows."""
    bases = ("cm", "cwtm", "meamed", "krum", "cge")
    drawn = st.sampled_from(bases).flatmap(lambda b: configs(b).map(lambda c: (b, c)))

    @PROFILE
    @given(pair=drawn, log_c=st.floats(-2, 1))
    def inner(pair: tuple[str, Config], log_c: float) -> None:
        base, config = pair
        rng = np.random.default_rng(config.seed)
        for pre in ((), ("nnm",)):
            drawn = cge_config(config, pre) if base == "cge" else config
            case = make_case(drawn, base, pre, rng)
            x = case.x.numpy().astype(np.float64)
            if wrapper == "clip":
                top = float(np.linalg.norm(case.honest, axis=1).max())
                c = 2.0 if top == 0.0 or rng.random() < 0.3 else top * 10.0**log_c
                if not math.isfinite(c) or c <= 0.0:
                    c = 2.0
                agg = StaticClipping(case.agg, f=case.f, c=c)
                tau = c
            else:
                agg = AdaptiveRobustClipping(case.agg, f=case.f)
                tau = arc_radius(x, case.f)
            honest = clip_rows(case.honest, tau)
            try:
                with forced_backend(config.backend):
                    out = agg(case.x).double().numpy()
                g = honest_geometry(honest)
                reach = float(np.linalg.norm(honest, axis=1).max(initial=0.0))
                if pre == ("nnm",):
                    g = nnm_geometry(g, case.n, case.f)
                    reach = float(np.linalg.norm(g.centre)) + g.radius
                check_rule(replace(case, honest=honest), out, case.n, case.f, g, reach)
            except Exception:
                note(f"{wrapper}∘{'∘'.join((*pre, base))}, τ={tau}: {case}")
                raise

    inner()


def test_clip_and_arc_are_wrappers_with_the_base_inside():
    agg = build_aggregator("cge", 1, pre=["arc", "nnm"], params={})
    assert isinstance(agg, AdaptiveRobustClipping) and isinstance(agg.base, NearestNeighborMixing)
