"""Robust aggregators against brute-force numpy/float64 references.

The implementations work through Gram matrices, comparator networks and lazy mixing; the
references do the textbook thing (sort, explicit pairwise distances, plain loops), so a disagreement
points at the fast path.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from byzps.common.aggregators import (
    AGGREGATORS,
    WRAPPERS,
    Bucketing,
    build_aggregator,
    forced_backend,
)
from byzps.common.aggregators._networks import band_network, ranked_network

SETTINGS = settings(max_examples=40, deadline=None)
#: The rules this file has references for; the catalogue's rules are checked against their own
#: references in test_aggregators_catalogue_a.py (meamed, cge) and _b.py (bulyan, mda, …).
BASES = ["cclip", "cm", "cwtm", "gm", "krum", "mean", "multikrum"]
CATALOGUE = ["bulyan", "caf", "cge", "dnc", "mda", "meamed", "monna", "smea"]


# ---------------------------------------------------------------- brute-force references (float64)


def ref_mean(x: np.ndarray, f: int) -> np.ndarray:
    return x.mean(axis=0)


def ref_cm(x: np.ndarray, f: int) -> np.ndarray:
    return np.median(x, axis=0)


def ref_cwtm(x: np.ndarray, f: int) -> np.ndarray:
    return np.sort(x, axis=0)[f : len(x) - f].mean(axis=0)


def krum_scores(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    dists = np.array([[np.sum((x[i] - x[j]) ** 2) for j in range(n)] for i in range(n)])
    return np.array([np.sort(np.delete(dists[j], j))[: n - f - 2].sum() for j in range(n)])


def ref_multikrum(x: np.ndarray, f: int, m: int | None = None) -> np.ndarray:
    chosen = np.argsort(krum_scores(x, f), kind="stable")[: len(x) - f if m is None else m]
    return x[chosen].mean(axis=0)


def krum_choice_is_clear(rule: str, x: np.ndarray, f: int) -> bool:
    """False when (multi)krum's selection hinges on a tie, where any tie-break is right.

    nnm makes ties common: two inputs with the same n − f neighbours get identical mixed rows.
    """
    if rule not in ("krum", "multikrum"):
        return True
    m = 1 if rule == "krum" else len(x) - f
    scores = np.sort(krum_scores(x, f))
    return m == len(x) or scores[m] - scores[m - 1] > 1e-6 * max(1.0, scores[-1])


def ref_krum(x: np.ndarray, f: int) -> np.ndarray:
    return ref_multikrum(x, f, m=1)


def ref_gm(
    x: np.ndarray, f: int, iterations: int = 1000, nu: float = 0.1, tol: float = 1e-4
) -> np.ndarray:
    """Smoothed Weiszfeld from the densest rows' mean (smallest distance to the ⌈n/2⌉−1-th nearest
    other row, ties averaged), stopped at ‖∇F_ν(z)‖ = W ‖z − z⁺‖ ≤ tol (n − 2f)."""
    sq = ((x[:, None] - x[None]) ** 2).sum(axis=2)
    np.fill_diagonal(sq, np.inf)
    k = min(max(1, (len(x) + 1) // 2 - 1), len(x) - 1)
    kth = np.sort(sq, axis=1)[:, k - 1] if len(x) > 1 else np.zeros(1)
    z = x[kth <= kth.min() * (1 + 2.0**-20)].mean(axis=0)
    for _ in range(iterations):
        w = 1.0 / np.maximum(nu, np.linalg.norm(x - z, axis=1))
        z_next = (w[:, None] * x).sum(axis=0) / w.sum()
        if w.sum() * np.linalg.norm(z - z_next) <= tol * (len(x) - 2 * f):
            break
        z = z_next
    return z


def ref_cclip(
    x: np.ndarray, f: int, centre: np.ndarray | None = None, tau: float = 10.0, iterations: int = 3
) -> np.ndarray:
    v = np.zeros(x.shape[1]) if centre is None else centre.copy()
    for _ in range(iterations):
        diff = x - v
        norms = np.linalg.norm(diff, axis=1)
        scale = np.minimum(1.0, tau / np.where(norms > 0, norms, np.inf))
        v = v + (diff * scale[:, None]).sum(axis=0) / len(x)
    return v


def ref_nnm_rows(x: np.ndarray, f: int) -> np.ndarray:
    n = len(x)
    rows = []
    for i in range(n):
        dists = np.array([np.sum((x[i] - x[j]) ** 2) for j in range(n)])
        dists[i] = -1.0  # itself first, whatever ties it has
        rows.append(x[np.argsort(dists, kind="stable")[: n - f]].mean(axis=0))
    return np.array(rows)


def ref_bucket_rows(x: np.ndarray, perm: np.ndarray, size: int) -> np.ndarray:
    return np.array([x[perm[s : s + size]].mean(axis=0) for s in range(0, len(x), size)])


REFERENCES = {
    "mean": ref_mean,
    "cm": ref_cm,
    "cwtm": ref_cwtm,
    "krum": ref_krum,
    "multikrum": ref_multikrum,
    "gm": ref_gm,
    "cclip": ref_cclip,
}


def minimiser_is_unique(rule: str, rows: np.ndarray) -> bool:
    """False for gm on collinear rows, whose geometric median can be a whole segment (NNM often
    mixes n rows into two distinct points): any point of it is right, so no single reference."""
    if rule != "gm":
        return True
    return bool(np.linalg.matrix_rank(rows - rows.mean(axis=0), tol=1e-9 * np.abs(rows).max()) > 1)


def max_f(rule: str, n: int) -> int:
    """The largest f that `rule` accepts for n inputs (-1 if none)."""
    if rule in ("krum", "multikrum"):
        return min((n - 2) // 2, n - 3)  # n ≥ 2f + 2 and n − f − 2 ≥ 1
    if rule == "mean":
        return n - 1
    return (n - 1) // 2


def sample(seed: int, n: int, d: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.standard_normal((n, d)) * rng.uniform(0.1, 20)).to(dtype)


def close(actual: torch.Tensor, expected: np.ndarray, dtype: torch.dtype) -> None:
    tol = 1e-9 if dtype == torch.float64 else 2e-4
    scale = max(1.0, float(np.abs(expected).max(initial=0.0)))
    np.testing.assert_allclose(actual.double().numpy(), expected, rtol=tol, atol=tol * scale)


# ------------------------------------------------------------------------------------- the rules


@SETTINGS
@given(
    rule=st.sampled_from(BASES),
    n=st.integers(1, 25),
    d=st.integers(1, 40),
    f_frac=st.floats(0, 1),
    seed=st.integers(0, 2**31),
    dtype=st.sampled_from([torch.float64, torch.float32]),
)
def test_rule_matches_reference(rule, n, d, f_frac, seed, dtype):
    top = max_f(rule, n)
    if top < 0:
        with pytest.raises(ValueError, match=r"f=0, n="):
            build_aggregator(rule, 0)(sample(seed, n, d, dtype))
        return
    f = round(f_frac * top)
    x = sample(seed, n, d, dtype)
    out = build_aggregator(rule, f)(x)
    assert out.shape == (d,) and out.dtype == dtype
    close(out, REFERENCES[rule](x.double().numpy(), f), dtype)


def test_median_of_even_n_is_mean_of_middle_pair():
    x = torch.tensor([[1.0], [10.0], [3.0], [4.0]])
    assert build_aggregator("cm", 1)(x).item() == 3.5


def test_multikrum_m_parameter():
    x = sample(3, 11, 5)
    out = build_aggregator("multikrum", 2, params={"m": 4})(x)
    close(out, ref_multikrum(x.numpy(), 2, m=4), torch.float64)


@pytest.mark.parametrize("name", ["krum", "multikrum"])
@pytest.mark.parametrize("f", [2, 3, 4])  # at f = 1, n = 3 has no neighbours to score by at all
def test_krum_refuses_n_2f_plus_1_where_f_copies_always_win(name: str, f: int) -> None:
    """At n = 2f + 1 a row's n − f − 2 = f − 1 nearest others can all be Byzantine: f copies of
    one state score 0 and are chosen wherever they lie. The check (also the config's, through
    `build_aggregator(..., n=)`) refuses that n; at n = 2f + 2 the same copies stay within the
    guarantee's √(n − f − 2)·D_H + r_H of the honest mean."""
    with pytest.raises(ValueError, match=rf"{name} needs n ≥ 2f \+ 2, got f={f}, n={2 * f + 1}"):
        build_aggregator(name, f, n=2 * f + 1)
    with pytest.raises(ValueError, match=rf"{name} needs n ≥ 2f \+ 2, got f={f}, n={2 * f + 1}"):
        build_aggregator(name, f, pre=["nnm"], n=2 * f + 1)
    n = 2 * f + 2
    honest = sample(f, n - f, 4)
    x = torch.cat([honest, torch.full((f, 4), 1e30, dtype=honest.dtype)])
    out = build_aggregator(name, f, n=n)(x).numpy()
    h = honest.numpy()
    centre = h.mean(0)
    diameter = max(np.linalg.norm(a - b) for a in h for b in h)
    radius = max(np.linalg.norm(a - centre) for a in h)
    assert np.linalg.norm(out - centre) <= np.sqrt(n - f - 2) * diameter + radius


def test_multikrum_refuses_m_above_n_minus_f() -> None:
    """Beyond the n − f best scores a Byzantine row may be chosen: m > n − f is refused."""
    with pytest.raises(ValueError, match=r"at most n − f = 8 inputs \(m=9, f=3, n=11\)"):
        build_aggregator("multikrum", 3, params={"m": 9}, n=11)
    build_aggregator("multikrum", 3, params={"m": 8}, n=11)


def test_gm_and_cclip_parameters_reach_the_rule():
    x = sample(4, 9, 6)
    gm = build_aggregator("gm", 2, params={"iterations": 30, "nu": 0.5})(x)
    close(gm, ref_gm(x.numpy(), 2, iterations=30, nu=0.5), torch.float64)
    cclip = build_aggregator("cclip", 2, params={"tau": 0.3, "iterations": 5})(x)
    close(cclip, ref_cclip(x.numpy(), 2, tau=0.3, iterations=5), torch.float64)


def test_cclip_centre_is_previous_output_and_round_trips():
    xs = [sample(s, 8, 7) * 30 for s in range(3)]
    agg = build_aggregator("cclip", 2)
    centre = None
    for x in xs[:2]:
        centre = ref_cclip(x.numpy(), 2, centre)
        close(agg(x), centre, torch.float64)
    restored = build_aggregator("cclip", 2)
    restored.load_state_dict(agg.state_dict())
    assert torch.equal(restored(xs[2]), agg(xs[2]))
    fresh = build_aggregator("cclip", 2)
    fresh.load_state_dict(fresh.state_dict())  # the empty state (no centre yet) round-trips too
    close(fresh(xs[0]), ref_cclip(xs[0].numpy(), 2), torch.float64)


# -------------------------------------------------------------------------------------- wrappers


@SETTINGS
@given(
    base=st.sampled_from(BASES),
    n=st.integers(3, 25),
    f_frac=st.floats(0, 1),
    seed=st.integers(0, 2**31),
)
def test_nnm_composes_with_every_base(base, n, f_frac, seed):
    f = round(f_frac * max(0, max_f(base, n)))
    x = sample(seed, n, 9)
    rows = ref_nnm_rows(x.numpy(), f)
    assume(krum_choice_is_clear(base, rows, f))
    assume(minimiser_is_unique(base, rows))
    out = build_aggregator(base, f, pre=["nnm"])(x)
    close(out, REFERENCES[base](rows, f), torch.float64)


@SETTINGS
@given(
    base=st.sampled_from(BASES),
    n=st.integers(1, 25),
    size=st.integers(1, 4),
    f=st.integers(0, 6),
    seed=st.integers(0, 2**31),
)
def test_bucketing_composes_with_every_base(base, n, size, f, seed):
    """The base rule sees n' = ⌈n/s⌉ buckets and the same f (f inputs spoil at most f buckets);
    a pairing the base rule cannot tolerate is refused, at build time when n is given."""
    buckets = math.ceil(n / size)
    agg = build_aggregator(base, f, pre=["bucketing"], params={"bucket_size": size}, seed=seed)
    x = sample(seed, n, 6)
    if base != "mean" and f > max_f(base, buckets):  # the plain mean refuses no f
        with pytest.raises(ValueError, match=rf"f={f}, n={buckets}"):
            agg(x)
        with pytest.raises(ValueError, match=rf"f={f}, n={buckets}"):
            build_aggregator(base, f, pre=["bucketing"], params={"bucket_size": size}, n=n)
        return
    perm = agg.permutation(n)
    assert sorted(perm.tolist()) == list(range(n))
    rows = ref_bucket_rows(x.numpy(), perm, size)
    assume(krum_choice_is_clear(base, rows, f))
    close(agg(x), REFERENCES[base](rows, f), torch.float64)


def test_bucketing_then_nnm_nests_in_the_stated_order():
    x = sample(5, 12, 4)
    agg = build_aggregator("cwtm", 2, pre=["bucketing", "nnm"], params={"bucket_size": 2}, seed=9)
    rows = ref_bucket_rows(x.numpy(), agg.permutation(12), 2)  # 6 buckets, f = 2 of them
    close(agg(x), ref_cwtm(ref_nnm_rows(rows, 2), 2), torch.float64)
    with pytest.raises(ValueError, match="cwtm needs 2f < n, got f=3, n=6"):
        build_aggregator("cwtm", 3, pre=["bucketing", "nnm"], params={"bucket_size": 2}, n=12)


def test_bucketing_is_deterministic_by_seed_and_state_round_trips():
    x = sample(6, 10, 5)
    a, b = (build_aggregator("cm", 2, pre=["bucketing"], seed=42) for _ in range(2))
    outs_a = [a(x) for _ in range(3)]
    outs_b = [b(x) for _ in range(3)]
    assert all(torch.equal(p, q) for p, q in zip(outs_a, outs_b, strict=True))
    assert not all(torch.equal(outs_a[0], o) for o in outs_a[1:])  # a fresh permutation per call
    seeds = [build_aggregator("cm", 2, pre=["bucketing"], seed=s) for s in (42, 43)]
    assert seeds[0].permutation(10).tolist() != seeds[1].permutation(10).tolist()
    restored = build_aggregator("cm", 2, pre=["bucketing"], seed=42)
    restored.load_state_dict(a.state_dict())
    assert torch.equal(restored(x), a(x))


def test_wrapper_state_nests_the_base_state():
    agg = build_aggregator("cclip", 1, pre=["bucketing", "nnm"], seed=1)
    agg(sample(7, 9, 3))
    state = agg.state_dict()
    assert state["calls"] == 1 and state["base"]["base"]["centre"].shape == (3,)


# -------------------------------------------------------------------------------- properties


@SETTINGS
@given(
    rule=st.sampled_from(BASES),
    pre=st.sampled_from([(), ("nnm",)]),
    n=st.integers(4, 20),
    seed=st.integers(0, 2**31),
)
def test_permutation_invariance(rule, pre, n, seed):
    f = max(0, max_f(rule, n) // 2)
    x = sample(seed, n, 8)
    assume(krum_choice_is_clear(rule, ref_nnm_rows(x.numpy(), f) if pre else x.numpy(), f))
    perm = torch.from_numpy(np.random.default_rng(seed).permutation(n))
    a = build_aggregator(rule, f, pre=pre)(x)
    b = build_aggregator(rule, f, pre=pre)(x[perm])
    close(a, b.numpy(), torch.float64)


ROBUST = [
    ("cm", (), {}),
    ("cwtm", (), {}),
    ("krum", (), {}),
    ("multikrum", (), {}),
    ("cm", ("nnm",), {}),
    ("cwtm", ("nnm",), {}),
    ("krum", ("nnm",), {}),
    ("gm", ("nnm",), {"iterations": 100}),
]


@pytest.mark.parametrize(("rule", "pre", "params"), ROBUST)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize(("n", "f"), [(5, 1), (11, 4), (20, 8)])
def test_huge_outliers_stay_out(rule, pre, params, dtype, n, f):
    """With f arbitrary outliers, the output lies in the honest rows' coordinate-wise range."""
    rng = np.random.default_rng(n)
    honest = rng.uniform(-1, 1, (n - f, 16))
    outliers = rng.choice([-1.0, 1.0], (f, 16)) * rng.uniform(1e5, 1e6, (f, 16))
    x = torch.from_numpy(np.concatenate([outliers, honest])).to(dtype)
    out = build_aggregator(rule, f, pre=pre, params=params)(x).double().numpy()
    slack = 1e-6 if dtype == torch.float32 else 1e-12
    assert np.all(out >= honest.min(axis=0) - slack) and np.all(out <= honest.max(axis=0) + slack)


@pytest.mark.parametrize(("rule", "pre"), [("krum", ()), ("multikrum", ()), ("cwtm", ("nnm",))])
def test_float32_distances_survive_a_huge_row(rule, pre):
    """One row 10⁵× larger moves the centre; the honest rows' distances must still be exact."""
    x = sample(11, 11, 300, torch.float32)
    x[0] *= 1e5
    out = build_aggregator(rule, 3, pre=pre)(x)
    rows = x.double().numpy()
    expected = REFERENCES[rule](ref_nnm_rows(rows, 3) if pre else rows, 3)
    close(out, expected, torch.float32)


@pytest.mark.parametrize(("n", "f"), [(5, 2), (11, 4), (20, 9)])
def test_gm_stays_in_the_breakdown_ball(n, f):
    """‖GM − c‖ ≤ 2(n−f)/(n−2f) · max_{i honest} ‖x_i − c‖ for any c; the default stopping rule
    (gradient tolerance from the medoid) gets there, where 8 steps from the mean did not."""
    rng = np.random.default_rng(f)
    honest = rng.standard_normal((n - f, 12))
    outliers = rng.standard_normal((f, 12)) * 1e6
    x = torch.from_numpy(np.concatenate([honest, outliers]))
    nu = 1e-3
    out = build_aggregator("gm", f, params={"nu": nu})(x).numpy()
    centre = honest.mean(axis=0)
    radius = np.linalg.norm(honest - centre, axis=1).max()
    # + ν: smoothing adds at most ν (f + g)/(n − f) < ν (GeometricMedian's docstring).
    assert np.linalg.norm(out - centre) <= 2 * (n - f) / (n - 2 * f) * radius + nu


# ------------------------------------------------------------------- adversarial numbers (fixed)
# tests/test_aggregator_properties.py checks every rule × wrapper on generated cases; these pin
# the scenarios that once broke, with their numbers.

ALL_ROBUST = [
    (rule, pre)
    for rule in ("cm", "cwtm", "krum", "multikrum", "gm", "cclip")
    for pre in ((), ("nnm",))
]


@pytest.mark.parametrize(("rule", "pre"), ALL_ROBUST)
@pytest.mark.parametrize("value", [np.inf, -np.inf, np.nan, 3.4028235e38])
@pytest.mark.parametrize("backend", ["numba", "torch"])
def test_one_bad_row_in_three_coordinates_leaves_the_output_finite(rule, pre, value, backend):
    """Gm, cclip and nnm∘cclip returned NaN everywhere for +inf in 3 coordinates of 1 row of 5
    (inf − inf in the Gram's distances, and a Gram centred on an infinite mean)."""
    x = sample(12, 7, 6)
    x[0, :3] = value
    with forced_backend(backend):
        out = build_aggregator(rule, 1, pre=pre)(x)
    honest = x[1:].numpy()
    assert torch.isfinite(out).all()
    spread = np.linalg.norm(honest - honest.mean(axis=0), axis=1).max()
    assert np.linalg.norm(out.numpy() - honest.mean(axis=0)) <= 3 * spread


@pytest.mark.parametrize("pre", [(), ("nnm",)])
@pytest.mark.parametrize("big", [1e3, 1e6, 3e38])
def test_gm_error_does_not_grow_with_colluders_magnitude(pre, big):
    """8 rows colluding at M among 12 honest: 8 steps from the mean left gm 253 (M = 1e3) and
    2.5e5 (M = 1e6) away, linear in M; now it is within the breakdown ball at any M."""
    rng = np.random.default_rng(0)
    honest = rng.standard_normal((12, 10)) * 3
    x = torch.from_numpy(np.concatenate([np.full((8, 10), big), honest])).float()
    out = build_aggregator("gm", 8, pre=pre)(x).double().numpy()
    honest = x[8:].double().numpy()
    centre = honest.mean(axis=0)
    radius = np.linalg.norm(honest - centre, axis=1).max()
    # GeometricMedian's bound: 2(n−f)/(n−2f) r_H + ν (f + g)/(n − f), here 6 r_H + 0.07.
    assert np.linalg.norm(out - centre) <= 6 * radius + 0.1


def test_a_row_at_float_max_does_not_move_gm():
    """One row at 3e38 among 5 moved gm to 1e33: the mean-centred Gram lost the honest rows."""
    x = sample(13, 5, 4, torch.float32)
    x[0] = 3e38
    out = build_aggregator("gm", 1)(x).double().numpy()
    honest = x[1:].double().numpy()
    assert np.linalg.norm(out - honest.mean(axis=0)) <= 4 * np.abs(honest).max()


@pytest.mark.parametrize(("rule", "seed"), [("krum", 279), ("multikrum", 235), ("gm", 173)])
def test_bucketing_sees_the_value_of_a_cancelling_bucket(rule, seed):
    """Two rows p ± b share a bucket: its mean is p, but lazily mixed, its Gram position carries
    the rounding of b (~1e-7 ‖b‖ in distance). With ‖b‖ tuned so that this is ~‖p‖, some
    choices of b (these seeds, found by search) made the bucket look next to the honest ones:
    krum picked it and output p, 4900 away from honest rows of radius 2.6. The mixed rows are
    now computed when that rounding exceeds the honest scale."""
    rng = np.random.default_rng(seed)
    d = int(rng.integers(1, 5))
    x = rng.standard_normal((12, d))
    agg = build_aggregator(rule, 2, pre=["bucketing"], params={"bucket_size": 2}, seed=seed)
    pair = agg.permutation(12)[:2]
    size = 10 ** rng.uniform(1, 4)
    magnitude = size * 10 ** rng.uniform(6, 9)
    spread = rng.standard_normal(d) * magnitude
    p = rng.standard_normal(d) * size
    x[pair] = [p + spread, p - spread]
    out = agg(torch.from_numpy(x)).numpy()
    honest = np.delete(x, pair, axis=0)
    radius = np.linalg.norm(honest - honest.mean(axis=0), axis=1).max()
    assert np.linalg.norm(out - honest.mean(axis=0)) <= 10 * radius


@pytest.mark.parametrize("pre", [("nnm",), ("bucketing",)])
def test_cclip_resolves_mixed_rows_down_to_tau(pre):
    """Rows 1e10 apart whose mixes land 36 from cclip's old centre, with τ = 10: lazily mixed, the
    mixes' distances to the centre carry the rounding of their 1e10-sized parts (~1e3) and cclip
    moved 36 instead of 10. Centred on the old centre and computed where that rounding exceeds
    τ², they are exact."""
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.standard_normal((8, 2)) * 1e10)
    params = {"tau": 10.0, "iterations": 1, **({"bucket_size": 8} if "bucketing" in pre else {})}
    agg = build_aggregator("cclip", 0, pre=pre, params=params)
    mean = x.numpy().mean(axis=0)  # nnm with f = 0 and one bucket of 8 both mix to the mean
    centre = torch.from_numpy(mean + np.array([36.0, 0.0]))
    agg.load_state_dict({**agg.state_dict(), "base": {"centre": centre}})
    expected = ref_cclip(mean[None], 0, centre.numpy(), tau=10.0, iterations=1)
    np.testing.assert_allclose(agg(x).numpy(), expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("backend", ["numba", "torch"])
@pytest.mark.parametrize("rule", ["cm", "cwtm"])
def test_nan_ranks_as_plus_infinity(rule, backend):
    """NaN in place (the old comparator never moved it) reordered the finite values around it."""
    rng = np.random.default_rng(4)
    x = rng.standard_normal((9, 500))
    bad = rng.random((9, 500)) < 0.2
    x[bad] = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0], int(bad.sum()))
    with forced_backend(backend):
        out = build_aggregator(rule, 3)(torch.from_numpy(x)).numpy()
    ranked = np.sort(np.where(np.isnan(x), np.inf, x), axis=0)  # numpy sorts NaN last, too
    band = ranked[4:5] if rule == "cm" else ranked[3:6]
    with np.errstate(invalid="ignore"):  # the band's sum order is the network's: rtol, not ==
        np.testing.assert_allclose(out, band.mean(axis=0), rtol=1e-14, atol=0)


@pytest.mark.parametrize("pre", [(), ("nnm",), ("bucketing",)])
@pytest.mark.parametrize("rule", ["cm", "cwtm"])
def test_backends_agree_bitwise_on_nan_and_signed_zeros(rule, pre):
    """The torch fallback swaps on the kernel's predicate (hi < lo), not min/max: those propagate
    NaN and put −0.0 below +0.0, where the kernel leaves equal values in place."""
    rng = np.random.default_rng(5)
    x = rng.choice([np.nan, np.inf, -np.inf, 0.0, -0.0, 1.0, -1.0], (11, 700))
    x[:, :350] = rng.choice([0.0, -0.0], (11, 350))
    outs = []
    f = 2 if pre == ("bucketing",) else 3  # 6 buckets of 11 rows: the median tolerates 2
    for backend in ("numba", "torch"):
        with forced_backend(backend):
            agg = build_aggregator(rule, f, pre=pre, seed=2)
            outs.append(agg(torch.from_numpy(x)).numpy().view(np.int64))
    np.testing.assert_array_equal(outs[0], outs[1])


def test_cclip_centre_stays_finite_and_a_bad_one_is_refused():
    agg = build_aggregator("cclip", 2)
    x = sample(14, 7, 5)
    x[:2] = torch.nan
    for _ in range(3):
        assert torch.isfinite(agg(x)).all()
    assert torch.isfinite(agg.state_dict()["centre"]).all()
    with pytest.raises(ValueError, match="not finite"):
        agg.load_state_dict({"centre": torch.full((5,), torch.inf)})


def test_gm_parameters():
    x = sample(15, 9, 4)
    start = build_aggregator("gm", 2, params={"iterations": 0})(x)
    assert any(torch.equal(start, row) for row in x)  # no step: the densest input itself
    with pytest.raises(ValueError, match="tol"):
        build_aggregator("gm", 1, params={"tol": -1.0})
    with pytest.raises(ValueError, match="nu"):
        build_aggregator("gm", 1, params={"nu": float("inf")})
    with pytest.raises(ValueError, match="tau"):
        build_aggregator("cclip", 1, params={"tau": float("nan")})


# ----------------------------------------------------------------------------- kernels, backends


@pytest.mark.parametrize("n", range(1, 26))
def test_band_networks_select_every_band(n):
    """Every (a, b) band comes out right on inputs full of ties (where pruning bugs show)."""
    rng = np.random.default_rng(n)
    x = rng.integers(0, 4, (n, 4000)).astype(float)
    expected = np.sort(x, axis=0)
    for a, b in {(lo, hi) for lo in range(n) for hi in (lo + 1, n - lo, n) if hi > lo}:
        wires = x.copy()
        for i, j in band_network(n, a, b):
            wires[i], wires[j] = np.minimum(wires[i], wires[j]), np.maximum(wires[i], wires[j])
        np.testing.assert_array_equal(wires[a:b].sum(axis=0), expected[a:b].sum(axis=0))


@pytest.mark.parametrize("n", range(1, 22))
def test_ranked_networks_put_each_read_rank_and_its_row_on_its_wire(n):
    """`ranked_network` over (value, row) pairs — a swap when the second value is smaller or
    equal with a smaller row — leaves on wire r the row a stable sort puts at rank r, for every
    rank the discount reads: each rank of the window a..b+slide−1 and, with a slide, the two
    middle ones. Inputs full of ties, where a set-only band or a pruning bug would show."""
    rng = np.random.default_rng(100 + n)
    x = rng.integers(0, 3, (n, 500)).astype(float)
    stable = np.argsort(x, axis=0, kind="stable")
    cases = {(a, b, s) for a in range(n) for b in range(a + 1, n + 1) for s in (0, 1, 2)}
    for a, b, slide in sorted(c for c in cases if c[1] + c[2] <= n):
        values, rows = x.copy(), np.repeat(np.arange(n, dtype=float)[:, None], 500, axis=1)
        for i, j in ranked_network(n, a, b, slide):
            swap = (values[j] < values[i]) | ((values[j] == values[i]) & (rows[j] < rows[i]))
            for arr in (values, rows):
                arr[i], arr[j] = np.where(swap, arr[j], arr[i]), np.where(swap, arr[i], arr[j])
        read = set(range(a, b + slide)) | ({(n - 1) // 2, n // 2} if slide else set())
        for r in read:
            np.testing.assert_array_equal(rows[r], stable[r], err_msg=f"{(a, b, slide)} rank {r}")


@pytest.mark.parametrize("rule", BASES)
@pytest.mark.parametrize("pre", [(), ("nnm",), ("bucketing", "nnm")])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_fallback_equals_numba(rule, pre, dtype):
    """Both backends agree bitwise, except where a Gram feeds an iteration (gm, cclip)."""
    x = sample(8, 13, 3000, dtype)
    x[2, 10:] *= 1e4
    if rule in ("cm", "cwtm") and not pre:
        x[2, :10] = torch.inf  # the comparator networks must move infinities like any value
    # krum on 7 buckets of 13 rows tolerates f = 2 (n ≥ 2f + 2), every other pairing f = 3
    f = 2 if "bucketing" in pre and rule in ("krum", "multikrum") else 3
    outs = []
    for backend in ("numba", "torch"):
        with forced_backend(backend):
            outs.append(build_aggregator(rule, f, pre=pre, seed=1)(x))
    if rule in ("gm", "cclip"):
        # The two Grams round differently and the iterations pass it on: ~eps · max|x| absolute.
        tol = 1e-12 if dtype == torch.float64 else 1e-6
        scale = float(x[x.isfinite()].abs().max())
        torch.testing.assert_close(outs[0], outs[1], rtol=tol, atol=tol * scale)
    else:
        assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("rule", ["cm", "cwtm", "meamed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_arcs_one_member_rows_in_the_band_kernel_keep_the_torch_bits(rule, dtype):
    """arc's clipped rows reach the band as a one-member mix, which the band kernel scales in
    one pass: the torch path's bits exactly (compared as bit patterns, so −0.0 counts), with
    rows clipped, far (±inf, NaN) and zero, and −0.0 in the columns.

    The values are integers, so that every squared norm is exact in float64 whatever order its
    backend sums it in, and both backends clip with the same scales: what is compared is the
    band's mixing, not the norms' reductions (numba's reassociated sum and torch's follow the
    CPU's vector width, and in float64 they differ in the last bits on some machines)."""
    x = sample(4, 13, 40_000, dtype).round()
    x[0] *= 1e3  # clipped
    x[1, :7] = torch.inf
    x[2, 5:9] = -torch.inf
    x[3, 11] = torch.nan
    x[4] = 0.0
    x[5:, :20] = -0.0
    outs = []
    for backend in ("numba", "torch"):
        with forced_backend(backend):
            outs.append(build_aggregator(rule, 3, pre=("arc",), seed=1)(x))
    bits = torch.int64 if dtype == torch.float64 else torch.int32
    assert torch.equal(outs[0].view(bits), outs[1].view(bits))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("n", "d"), [(1, 5), (3, 1), (8, 123), (20, 123), (13, 16000), (7, 40000)])
def test_serial_twins_equal_the_parallel_kernels_bitwise(dtype, n, d):
    """ops runs one-chunk inputs through the serial twins of band_mean and combine: bit for bit
    the parallel kernels' output, NaN, ±inf, −0.0, mixed rows and meamed's slide included."""
    from byzps.common.aggregators import _kernels
    from byzps.common.aggregators.ops import window_network

    rng = np.random.default_rng(n * d)
    x = rng.standard_normal((n, d)).astype(dtype)
    special = rng.random((n, d))
    x[special < 0.02] = np.nan
    x[(special >= 0.02) & (special < 0.04)] = np.inf
    x[(special >= 0.04) & (special < 0.06)] = -0.0
    width = max(1, n - 2)
    mixes = [
        (np.empty((0, 0), np.int64), np.empty((0, 0))),
        (np.array([rng.permutation(n)[:width] for _ in range(n)]), np.full((n, width), 1 / width)),
    ]
    low = max(1, n - 2)
    bands = {((n - 1) // 2, n // 2 + 1, 0), (0, n, 0), (0, low, min(2, n - low))}
    block = _kernels.block_size(n, x.itemsize)
    for idx, wts in mixes:
        for a, b, slide in bands:
            network = window_network(n, a, b, slide)
            outs = [np.empty(d, dtype) for _ in range(2)]
            kernels = (_kernels.band_mean, _kernels.band_mean_serial)
            for kernel, out in zip(kernels, outs, strict=True):
                kernel(x, idx, wts, network, a, b, slide, block, out)
            assert outs[0].tobytes() == outs[1].tobytes(), (a, b, slide, idx.shape)
    weights = rng.random(n)
    weights[0] = 0.0
    extra, extra_weights = x[: min(2, n)] * 3, np.array([0.25, -1.0])[: min(2, n)]
    outs = [np.empty(d, dtype) for _ in range(2)]
    for kernel, out in zip((_kernels.combine, _kernels.combine_serial), outs, strict=True):
        kernel(x, weights, extra, extra_weights, out)
    assert outs[0].tobytes() == outs[1].tobytes()


def test_numba_backend_refuses_what_it_cannot_run():
    with forced_backend("numba"), pytest.raises(ValueError, match="numba backend"):
        build_aggregator("cm", 0)(torch.ones(3, 4, dtype=torch.float16))


def test_float16_runs_on_the_torch_path():
    x = sample(9, 7, 20, torch.float16)
    out = build_aggregator("cm", 2)(x)
    assert out.dtype == torch.float16
    close(out, np.median(x.double().numpy(), axis=0), torch.float32)


def test_input_layouts():
    x = sample(10, 30, 5).T  # non-contiguous (5, 30)
    close(build_aggregator("cwtm", 1)(x), ref_cwtm(x.numpy(), 1), torch.float64)
    x.requires_grad_(True)
    assert not build_aggregator("gm", 1)(x).requires_grad
    with pytest.raises(ValueError, match="shape"):
        build_aggregator("cm", 0)(torch.ones(4))


@pytest.mark.parametrize("d", [1, 16383, 16385, 40000])
def test_chunk_and_block_edges(d):
    x = sample(d, 6, d, torch.float32)
    close(build_aggregator("cm", 2)(x), np.median(x.double().numpy(), axis=0), torch.float32)
    close(build_aggregator("gm", 2)(x), ref_gm(x.double().numpy(), 2), torch.float32)


# ----------------------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    ("rule", "n", "f"),
    [
        ("cm", 4, 2),
        ("cwtm", 6, 3),
        ("krum", 5, 3),
        ("multikrum", 3, 1),
        ("gm", 2, 1),
        ("cclip", 4, 2),
    ],
)
def test_f_too_large_is_an_error_naming_f_and_n(rule, n, f):
    with pytest.raises(ValueError, match=rf"{rule} needs .*f={f}, n={n}"):
        build_aggregator(rule, f)(torch.ones(n, 3))


def test_build_errors_name_the_culprit():
    with pytest.raises(ValueError, match="'median'"):
        build_aggregator("median", 1)
    with pytest.raises(ValueError, match="'nn'"):
        build_aggregator("cm", 1, pre=["nn"])
    with pytest.raises(ValueError, match="'bucket_size'"):
        build_aggregator("cm", 1, params={"bucket_size": 2})
    with pytest.raises(ValueError, match="'tau'"):
        build_aggregator("gm", 1, params={"tau": 2})
    with pytest.raises(ValueError, match="'m'"):
        build_aggregator("krum", 1, params={"m": 2})
    with pytest.raises(ValueError, match="non-negative"):
        build_aggregator("cm", -1)
    with pytest.raises(ValueError, match="bucket_size"):
        build_aggregator("cm", 1, pre=["bucketing"], params={"bucket_size": 0})
    with pytest.raises(ValueError, match="nnm needs f < n, got f=3, n=3"):
        build_aggregator("mean", 3, pre=["nnm"])(torch.ones(3, 2))


def test_registry_names():
    """Every registered rule is one whose reference tests exist (here or in the catalogue's)."""
    assert AGGREGATORS.names() == sorted(BASES + CATALOGUE)
    assert WRAPPERS.names() == ["arc", "bucketing", "clip", "nnm"]
    assert isinstance(build_aggregator("gm", 1, pre=["bucketing"]), Bucketing)


def test_cclip_auto_radius_ties_the_bias_to_the_honest_spread() -> None:
    """τ = "auto": the radius is the (n − f)-th smallest distance to the centre, at most the
    largest honest one, so 8 rows colluding at 1e6 move the output by at most L·f·r_H/n from
    where the honest rows alone take it — while the default τ = 10 lets them move it by up to
    L·f·τ/n = 12."""
    gen = torch.Generator().manual_seed(0)
    honest = torch.randn(12, 6, generator=gen, dtype=torch.float64) * 0.1
    attackers = torch.full((8, 6), 1e6, dtype=torch.float64)
    rows = torch.cat([honest, attackers])
    auto = build_aggregator("cclip", f=8, params={"tau": "auto"})
    fixed = build_aggregator("cclip", f=8)
    r_h = float((honest - honest.mean(0)).norm(dim=1).max())
    # From v⁰ = 0, within r_H of μ_H: every radius is at most 2 r_H, so L = 3 steps let the 8
    # attackers move v by ≤ 3·8·2r_H/20, and the honest pull keeps it within 2 r_H of μ_H.
    assert float((auto(rows) - honest.mean(0)).norm()) <= 3 * 8 * 2 * r_h / 20 + 2 * r_h
    assert float((fixed(rows) - honest.mean(0)).norm()) > 1.0  # τ = 10 lets them pull far
    with pytest.raises(ValueError, match="positive number or 'auto'"):
        build_aggregator("cclip", f=1, params={"tau": "fast"})


def test_the_compiled_precision_check_is_the_numpy_one() -> None:
    """`rows.imprecise` (one compiled call) against the numpy formulation it replaced, on
    Grams that pass, that fail on a far row, and that fail on rounding (one row 1e9x the rest,
    so the mean-centred Gram cannot resolve the others)."""
    from byzps.common.aggregators import ops, rows
    from byzps.common.aggregators.gram import honest_scale

    def numpy_imprecise(gram: np.ndarray, d: int) -> bool:
        diag = np.diag(gram)
        if not np.all(diag < rows.FAR_SQ_NORM):
            return True
        scale = honest_scale(gram)
        return bool(np.any(rows.gram_rounding(d) * diag > rows.RESOLUTION * scale))

    gen = torch.Generator().manual_seed(3)
    seen = set()
    for n, d in ((2, 5), (7, 40), (20, 123)):
        for spoil in (None, float("inf"), 1e9, 1e300):
            x = torch.randn(n, d, generator=gen)
            if spoil is not None:
                x[0] *= spoil
            gram = ops.centred_gram(x)
            got = rows.imprecise(gram, d)
            assert got == numpy_imprecise(gram, d), (n, d, spoil)
            seen.add(got)
    assert seen == {True, False}


def test_the_precision_check_counts_past_the_kth_distance_as_selecting_it_would() -> None:
    """`_kernels.imprecise_gram` counts how many of a row's distances lie below its rounding
    instead of selecting the k-th: the same decision as `gamma · G_ii > resolution · kth_i` with
    kth_i taken from numpy's sort (NaN last), over Grams with tied rows, ±0, inf and NaN entries,
    every k from 1 to past n − 1, and gammas on both sides of the boundary."""
    from byzps.common.aggregators import _kernels

    def selected(gram: np.ndarray, gamma: float, resolution: float, k: int) -> bool:
        n = gram.shape[0]
        diag = np.diag(gram)
        if not np.all(diag < 1e300):
            return True
        for i in range(n):
            others = [max(gram[i, i] + gram[j, j] - 2.0 * gram[i, j], 0.0)
                      for j in range(n) if j != i]  # fmt: skip
            kth = np.sort(np.array(others))[min(k, n - 1) - 1] if others else np.inf
            if gamma * gram[i, i] > resolution * kth:
                return True
        return False

    rng = np.random.default_rng(17)
    seen = set()
    for trial in range(600):
        n = int(rng.integers(1, 24))
        rows = rng.standard_normal((n, 6))
        if trial % 5 == 1:
            rows[: n // 2] = rows[0]  # tied rows: zero distances
        gram = rows @ rows.T
        if trial % 5 == 2:
            gram[rng.integers(0, n), rng.integers(0, n)] = np.nan
        if trial % 5 == 3:
            gram = rng.choice([0.0, -0.0, 1.0, 1e-30, 1e30, np.inf], (n, n))
        gram = np.ascontiguousarray(gram)
        for gamma in (0.0, 1e-9, 1e-3, 1.0):
            for k in range(1, n + 2):
                got = bool(_kernels.imprecise_gram(gram, gamma, 2.0**-20, 1e300, k))
                assert got == selected(gram, gamma, 2.0**-20, k), (trial, gamma, k)
                seen.add(got)
    assert seen == {True, False}


def test_squared_norms_keep_their_bits_and_values() -> None:
    """`_kernels.sq_norms` reads each chunk's rows through slices now; its sums must be bitwise
    those of the indexed loop it replaced (compiled here as it was), and match float64 numpy to
    rounding, at shapes around the vector and chunk sizes and with ±inf, NaN and 1e38."""
    from numba import njit, prange

    from byzps.common.aggregators import _kernels

    chunk = _kernels.CHUNK

    @njit(parallel=True, cache=False, fastmath={"reassoc", "contract"})
    def indexed(x):  # pragma: no cover - compiled
        n, d = x.shape
        nchunks = (d + chunk - 1) // chunk
        parts = np.empty((nchunks, n))
        for c in prange(nchunks):
            stop = min(d, (c + 1) * chunk)
            for i in range(n):
                acc = 0.0
                for t in range(c * chunk, stop):
                    v = np.float64(x[i, t])
                    acc += v * v
                parts[c, i] = acc
        return _kernels._sum_chunks(parts)

    gen = np.random.default_rng(5)
    for n, d in ((1, 1), (3, 15), (3, 17), (20, 16384), (20, 16385), (7, 50_001)):
        x = gen.standard_normal((n, d)).astype(np.float32)
        if n > 2:
            x[1, d // 2] = np.inf
            x[2, 0] = np.nan
            x[0, -1] = 1e38
        got = _kernels.sq_norms(x)
        assert np.array_equal(got, indexed(x), equal_nan=True), (n, d)
        want = np.square(x.astype(np.float64)).sum(axis=1)
        assert np.allclose(got, want, rtol=1e-12, equal_nan=True), (n, d)


def test_kth_sq_dists_is_the_sorted_formulation() -> None:
    """The k-th nearest squared distance by quickselect (`_kernels._select`) is the value a full
    sort gives, ties, +inf (far rows) and NaN (sorted last, as numpy does) included."""
    from byzps.common.aggregators._kernels import kth_sq_dists

    rng = np.random.default_rng(0)
    for trial in range(2000):
        n = int(rng.integers(1, 30))
        y = rng.standard_normal((n, 4)) * 10.0 ** int(rng.integers(-4, 5))
        y = np.round(y) if trial % 3 == 0 else y  # ties
        gram = y @ y.T
        if trial % 7 == 0 and n > 2:
            gram[1, 2] = gram[2, 1] = np.nan
        far = rng.random(n) < (0.25 if trial % 4 == 0 else 0.0)
        k = int(rng.integers(1, max(2, n)))
        expected = np.full(n, np.inf)
        for i in np.flatnonzero(~far):
            others = [np.inf if far[j] else max(gram[i, i] + gram[j, j] - 2 * gram[i, j], 0.0)
                      for j in range(n) if j != i]  # fmt: skip
            if others:
                expected[i] = np.sort(others)[min(k, n - 1) - 1]
        got = kth_sq_dists(gram, far, k)
        assert got.tobytes() == expected.tobytes(), (trial, got, expected)


def test_nnm_neighbourhoods_are_a_stable_sorts_first_rows() -> None:
    """nnm's mix (`wrappers.nearest_mix`, a comparator network over all rows at once) puts
    1/(n − f) on the n − f entries that numpy's stable argsort puts first, each row's own entry
    counted as −inf: ties to the lower index, +inf (far rows) and NaN (numpy's last) included,
    alone or stacked."""
    from byzps.common.aggregators.wrappers import nearest_mix

    rng = np.random.default_rng(2)
    for trial in range(1500):
        n, runs = int(rng.integers(1, 25)), int(rng.integers(1, 4))
        f = int(rng.integers(0, n))
        dists = rng.standard_normal((runs, n, n)) ** 2
        if trial % 3 == 1:
            dists = rng.integers(0, 3, (runs, n, n)).astype(float)  # ties
        if trial % 3 == 2:
            dists[rng.random(dists.shape) < 0.2] = np.inf
            dists[rng.random(dists.shape) < 0.1] = np.nan
        keys = dists.copy()
        keys[:, np.arange(n), np.arange(n)] = -np.inf
        nearest = np.argsort(keys, axis=-1, kind="stable")[..., : n - f]
        expected = np.zeros(dists.shape)
        np.put_along_axis(expected, nearest, 1.0 / (n - f), axis=-1)
        assert nearest_mix(dists, f).tobytes() == expected.tobytes(), trial
        if runs == 1:
            assert nearest_mix(dists[0], f).tobytes() == expected[0].tobytes(), trial
