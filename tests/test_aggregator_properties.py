"""Every robust rule × wrapper against adversarial *numbers*: the output is finite and within the
bound the rule's theory gives, computed from the honest rows alone.

A case: n inputs, b ≤ f of them adversarial, drawn from strategies that break naive arithmetic —
huge norms, ±FLT_MAX and ±DBL_MAX, ±inf, NaN, per-coordinate mixtures of all of these, denormals,
zeros, copies of an honest row, points just outside the honest hull or box, points near the honest
mean, pairs p ± b whose huge parts cancel in a bucket — either each on its own or all colluding at
one point. The honest rows are finite, at
magnitudes from 0 to 1e±30, with spreads from 0 (all equal) to ~1e3 × the magnitude. Both dtypes,
both backends (numba; the torch fallback, i.e. the GPU path, for one case in eight), random bucket
sizes and rule parameters. Each hypothesis example draws one configuration and checks it under
every wrapper (plain, nnm, bucketing), so EXAMPLES examples per rule are that many cases per
rule × wrapper. Small inputs cost ~0.3 ms per aggregation, so the rules are built from their
classes and numba runs single-threaded: the whole file takes ~70 s on 2 idle cores.

Notation. H: the honest rows (float64 copies of the dtype-rounded values), μ_H their mean,
r_H = max_{i∈H} ‖x_i − μ_H‖, D_H = max_{i,j∈H} ‖x_i − x_j‖, [lo_t, hi_t] their range in coordinate
t. A rule sees n_b rows with declared f_b; "honest base rows" are the rows it sees that derive from
honest inputs only. Each bound below holds with (radius, diameter, box) = (r, D, [lo, hi]) of the
honest base rows around μ_H:

* cm, cwtm (f < n/2): the band of ranks [f, n − f) (cm: the middle) lies between honest values,
  so lo_t ≤ x̂_t ≤ hi_t.
* krum, multikrum (n ≥ 2f + 2, m ≤ n − f): n − f rows score ≤ (n − f − 2) D², so does every
  chosen row, and a chosen Byzantine row's n − f − 2 nearest include ≥ n − 2f − 1 ≥ 1 honest row
  within √score: ‖x̂ − μ_H‖ ≤ √(n − f − 2) · D + r.
* gm (f < n/2), stopped at ‖∇F_ν(z)‖ ≤ g = tol (n − 2f): projecting the gradient on the unit
  vector from μ_H to z, each honest term gives ≥ (R − r)/max(ν, R + r), each other term ≥ −1,
  so R = ‖x̂ − μ_H‖ ≤ max(r (n + g)/(n − 2f − g), r + ν (f + g)/(n − f))
  (≤ 2(n − f)/(n − 2f) · r + ν (f + g)/(n − f) for the default tol).
* cclip: v ↦ v + (1/n) Σ_{honest} clip_τ(x_i − v) is non-expansive (v + clip_τ(x − v) =
  x − shrink_τ(x − v), shrink 1-Lipschitz) and each of the k non-honest rows moves v by ≤ τ/n per
  step, so ‖x̂ − v_H^L‖ ≤ L k τ / n, v_H^L the same L steps from the same v⁰ over the honest rows
  only (computed here with numpy).

Wrappers.
* nnm∘X (X's condition on (n, f)): n − f honest inputs lie within D_H of an honest x_i, so all of
  its n − f nearest do, and at most e_k = min(f, n − f − 1) of them are not honest. Each honest
  mixed row is then within ρ = r_H + e_k/(n − f) · D_H of μ_H (honest members within r_H, the
  others within D_H + r_H), the honest mixed rows are within 2ρ of each other, and coordinate t
  lies in [lo_t − e, hi_t + e], e = e_k/(n − f) · D_H. X's bound with (ρ, 2ρ, box ± e); for cclip
  the honest mixed rows themselves, from the rule's own mixing matrix (whose neighbourhoods are
  checked against the D_H property, and never contain a non-finite row).
* bucketing∘X: n' = ⌈n/s⌉ buckets and the same f (f rows spoil at most f buckets); only bucket
  sizes for which X's condition holds on (n', f) are drawn (others are refused by the wrapper).
  Honest buckets are means of honest rows: within r_H of μ_H, D_H of each other, inside
  [lo, hi]. X's bound on (n', f).

Floating-point slack, added to every bound:
* 32 n ε · A, A = the largest |value| in play (honest rows, cclip's v⁰ and L τ): rounding of
  the output to the dtype (ε of the dtype) and of sums of n float64 products;
* 2⁻¹⁶ × the bound: the Gram resolves honest squared distances to ρ = 2⁻²⁰ relative
  (rows.imprecise), so distance-based choices (krum scores, nnm neighbours, clip and Weiszfeld
  weights) are off by a factor 1 + O(ρ);
* gm: g is increased by n · 2⁻¹⁸, the same resolution applied to the n unit terms of ∇F_ν;
* 2⁻⁵⁰⁰ absolute: squared distances under float64's smallest normal underflow to 0, so
  distances below 2⁻⁵¹¹ ≈ 1.5e-154 are not resolved at all.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import numba
import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, note, settings
from hypothesis import strategies as st

from byzps.common.aggregators import (
    AGGREGATORS,
    Bucketing,
    NearestNeighborMixing,
    RowsAggregator,
    Wrapper,
    forced_backend,
)
from byzps.common.aggregators.rows import Rows

RULES = ("cm", "cwtm", "krum", "multikrum", "gm", "cclip")
WRAPS = ((), ("nnm",), ("bucketing",))
#: Hypothesis examples per rule; each is checked under every wrapper, so this many cases per
#: rule × wrapper. BYZPS_PROPERTY_EXAMPLES raises it for a deeper run (or lowers it locally).
EXAMPLES = int(os.environ.get("BYZPS_PROPERTY_EXAMPLES", "2000"))
PROFILE = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

STRATEGIES = (
    "huge",
    "flt_max",
    "dtype_max",
    "inf",
    "nan",
    "mixture",
    "denormal",
    "zero",
    "copy",
    "outside_hull",
    "outside_box",
    "near",
    "cancel",
)
FLT_MAX = float(np.finfo(np.float32).max)
GM_TOL = 1e-4  # GeometricMedian's default
#: One case in eight runs on the torch fallback (the GPU path), ~10x slower on tiny inputs.
BACKENDS = ("numba",) * 7 + ("torch",)
REL_SLACK = 2.0**-16
#: Squared distances below float64's smallest normal (2⁻¹⁰²²) underflow: distances under 2⁻⁵¹¹
#: cannot be told from 0 (this much more, with room for the bounds' factors, is absolute slack).
TINY = 2.0**-500


# ------------------------------------------------------------------------------------ geometry


@dataclass(frozen=True)
class Geometry:
    """What the honest base rows satisfy: within `radius` of `centre` (μ_H), within `diameter` of
    each other, inside [lo, hi] per coordinate."""

    centre: np.ndarray
    radius: float
    diameter: float
    lo: np.ndarray
    hi: np.ndarray


def honest_geometry(honest: np.ndarray) -> Geometry:
    centre = honest.mean(axis=0)
    radius = float(np.linalg.norm(honest - centre, axis=1).max())
    diffs = honest[:, None, :] - honest[None, :, :]
    diameter = float(np.sqrt((diffs**2).sum(axis=2)).max())
    return Geometry(centre, radius, diameter, honest.min(axis=0), honest.max(axis=0))


def nnm_geometry(g: Geometry, n: int, f: int) -> Geometry:
    """nnm's honest mixed rows (module docstring): radius ρ, diameter 2ρ, box ± e."""
    e = min(f, n - f - 1) / (n - f) * g.diameter
    rho = g.radius + e
    return Geometry(g.centre, rho, 2 * rho, g.lo - e, g.hi + e)


# --------------------------------------------------------------------------------------- cases


@dataclass
class Case:
    rule: str
    pre: tuple[str, ...]
    agg: RowsAggregator  # in its state before the call
    x: torch.Tensor  # the inputs, in the case's dtype
    honest: np.ndarray  # (h, d) float64 copies of the honest inputs
    bad: np.ndarray  # indices of the adversarial inputs
    f: int
    params: dict
    centre: torch.Tensor | None  # cclip's v⁰ (None: zeros)
    perm: np.ndarray | None  # bucketing's permutation for this call
    mix: np.ndarray | None = None  # nnm's mixing matrix, recorded during the call (`record_mixing`)

    @property
    def n(self) -> int:
        return self.x.shape[0]

    @property
    def eps(self) -> float:
        return float(torch.finfo(self.x.dtype).eps)


def max_f(rule: str, n: int) -> int:
    """The largest f for which `rule`'s guarantee holds on n rows (-1 if none): f < n/2, and
    n ≥ 2f + 2 with n − f − 2 ≥ 1 for krum (what its check accepts: the boundary is tested)."""
    return min((n - 2) // 2, n - 3) if rule in ("krum", "multikrum") else (n - 1) // 2


def signs(rng: np.random.Generator, shape) -> np.ndarray:
    """Random ±1.0 (rng.choice costs ~10x more on these tiny shapes)."""
    return rng.integers(0, 2, shape) * 2.0 - 1.0


def honest_rows(rng: np.random.Generator, h: int, d: int, magnitude: int, spread: int, shape: str):
    """h finite rows around a centre of size 10^magnitude (0 when magnitude < -30), spread
    10^spread (0 when spread < -40)."""
    centre = 0.0 if magnitude < -30 else 10.0**magnitude
    centre = centre * signs(rng, d) * rng.uniform(0.5, 1.0, d)
    sigma = 0.0 if spread < -40 else 10.0**spread
    if shape == "gauss":
        noise = rng.standard_normal((h, d))
    elif shape == "box":
        noise = rng.uniform(-1, 1, (h, d))
    elif shape == "clusters":
        noise = signs(rng, (h, 1)) + 1e-3 * rng.standard_normal((h, d))
    else:  # "duplicates": a few distinct rows, repeated
        distinct = rng.standard_normal((max(1, h // 3), d))
        noise = distinct[rng.integers(0, len(distinct), h)]
    return centre + sigma * noise


def adversarial_row(
    rng: np.random.Generator, strategy: str, honest: np.ndarray, dtype: torch.dtype
) -> np.ndarray:
    """One adversarial row (float64; the cast to `dtype` may turn huge values into ±inf)."""
    h, d = honest.shape
    top = FLT_MAX if dtype == torch.float32 else float(np.finfo(np.float64).max)
    tiny = float(torch.finfo(dtype).smallest_normal) * 2.0**-10
    sign = signs(rng, d)
    mu = honest.mean(axis=0)
    scale = max(float(np.abs(honest - mu).max()), 1e-300)
    if strategy == "huge":
        direction = rng.standard_normal(d)
        direction /= max(np.linalg.norm(direction), 1e-300)
        return mu + 10.0 ** rng.uniform(3, math.log10(top) - 0.5) * direction
    if strategy == "flt_max":
        return sign * FLT_MAX
    if strategy == "dtype_max":
        return sign * top
    if strategy == "inf":
        return sign * np.inf
    if strategy == "nan":
        return np.full(d, np.nan)
    if strategy == "mixture":
        pool = np.array([np.inf, -np.inf, np.nan, top, -top, tiny, 0.0])
        row = honest[rng.integers(0, h)].copy()
        pick = rng.random(d) < 0.7
        row[pick] = pool[rng.integers(0, len(pool), int(pick.sum()))]
        return row
    if strategy == "denormal":
        return sign * tiny * rng.integers(1, 1000, d)
    if strategy == "zero":
        return np.zeros(d)
    if strategy == "copy":
        return honest[rng.integers(0, h)].copy()
    if strategy == "outside_hull":
        i = rng.integers(0, h)
        return mu + (1.0 + 10.0 ** rng.uniform(-8, 0)) * (honest[i] - mu)
    if strategy == "outside_box":
        lo, hi = honest.min(axis=0), honest.max(axis=0)
        step = 10.0 ** rng.uniform(-8, 0) * scale
        return np.where(sign > 0, hi + step, lo - step)
    if strategy == "cancel":  # p + b; make_case pairs it with p − b
        return cancelling_pair(rng, mu, scale, dtype)[0]
    # "near": ALIE-like, inside the honest cloud's scale
    return mu + 10.0 ** rng.uniform(-3, 1) * scale * rng.standard_normal(d)


def cancelling_pair(
    rng: np.random.Generator, mu: np.ndarray, scale: float, dtype: torch.dtype
) -> tuple[np.ndarray, np.ndarray]:
    """p ± b, averaging to a point p 10..1e4 spreads from the honest mean, with ‖b‖ such that the
    rounding of b in a lazily mixed Gram (~1e-7 ‖b‖ in float64) is of the order of ‖p − μ_H‖: a
    bucket holding both looks, by its Gram, like a point somewhere else (rows.Rows)."""
    size = max(scale, 1e-30) * 10 ** rng.uniform(1, 4)
    p = mu + size * rng.standard_normal(mu.shape[0])
    reach = 10 ** rng.uniform(6, 9) if dtype == torch.float64 else 10 ** rng.uniform(2, 5)
    b = size * reach * rng.standard_normal(mu.shape[0])
    return p + b, p - b


def rule_params(rng: np.random.Generator, rule: str, spread: float) -> dict:
    """Random parameters for `rule`: defaults or sizes relative to the honest spread."""
    if rule == "gm":
        return {"nu": 0.1 if rng.random() < 0.5 else spread * 10.0 ** rng.uniform(-4, 1)}
    if rule == "cclip":
        tau = 10.0 if rng.random() < 0.5 else spread * 10.0 ** rng.uniform(-3, 3)
        return {"tau": tau, "iterations": (1, 3, 5)[rng.integers(3)]}
    if rule == "multikrum" and rng.random() < 0.5:
        return {"m": int(rng.integers(1, 5))}  # capped at n_b − f_b below
    return {}


def build(rule: str, pre: tuple[str, ...], f: int, params: dict, seed: int) -> RowsAggregator:
    """The aggregator, from the classes directly (build_aggregator's parameter routing is tested
    in test_aggregators; here its ~0.4 ms of signature inspection would double the run time)."""
    own = {k: v for k, v in params.items() if k != "bucket_size"}
    base = AGGREGATORS.get(rule)(f=f, **own)
    if pre == ("nnm",):
        return NearestNeighborMixing(base, f=f)
    if pre == ("bucketing",):
        return Bucketing(base, f=f, bucket_size=params["bucket_size"], seed=seed)
    return base


@dataclass(frozen=True)
class Config:
    """What hypothesis draws for one example; each wrapper then builds its own case from it."""

    dtype: torch.dtype
    d: int
    n: int
    f: int
    strategy: str  # one of STRATEGIES, or "independent": a random one per adversarial row
    magnitude: int  # honest centre 10^magnitude (0 below -30)
    spread_offset: int  # honest spread 10^(magnitude + offset) (0 below -40)
    shape: str
    seed: int
    backend: str


def configs(rule: str) -> st.SearchStrategy[Config]:
    """Independent draws (a composite strategy costs ~1 ms more per example); f is clamped to
    what the rule's guarantee allows for n, which makes the hardest case, f = max, common."""
    lowest = 3 if rule in ("krum", "multikrum") else 1

    def make(draws: tuple) -> Config:
        dtype, d, n, f, *rest = draws
        return Config(dtype, d, n, min(f, max(0, max_f(rule, n))), *rest)

    return st.tuples(
        st.sampled_from([torch.float32, torch.float64]),
        st.integers(1, 8),
        st.integers(lowest, 24),
        st.integers(0, 11),
        st.sampled_from((*STRATEGIES, "independent")),
        st.sampled_from([-99, -30, -8, 0, 0, 3, 10, 30]),
        st.sampled_from([-99, -15, -6, -2, 0, 0, 2, 3]),
        st.sampled_from(["gauss", "box", "clusters", "duplicates"]),
        st.integers(0, 2**32 - 1),
        st.sampled_from(BACKENDS),
    ).map(make)


def bucket_size(rng: np.random.Generator, rule: str, n: int, f: int) -> int:
    """A bucket size s ≤ 4 for which the base rule's guarantee holds on (n', f) (s = 1 always
    does when it holds on (n, f))."""
    valid = [s for s in range(1, 5) if f <= max_f(rule, math.ceil(n / s))]
    return valid[rng.integers(len(valid))]


def choose_bad(
    rng: np.random.Generator, n: int, f: int, agg: RowsAggregator, keep_order: bool = False
) -> tuple[np.ndarray, np.ndarray | None]:
    """Adversarial row indices: f of them (sometimes fewer); under bucketing, members of at most
    f buckets of this call's permutation (which is returned too), bucket by bucket if
    `keep_order`."""
    if not isinstance(agg, Bucketing):
        return rng.permutation(n)[: max(0, f - (0, 0, 0, 1, 3)[rng.integers(5)])], None
    perm = agg.permutation(n)
    groups = np.array_split(perm, range(agg.bucket_size, n, agg.bucket_size))
    spoiled = rng.permutation(len(groups))[: int(rng.integers(0, f + 1))]
    pool = np.concatenate([groups[k] for k in spoiled]) if len(spoiled) else np.zeros(0, int)
    return (pool if keep_order else rng.permutation(pool))[: min(f, len(pool))], perm


def make_case(c: Config, rule: str, pre: tuple[str, ...], rng: np.random.Generator) -> Case:
    """The case of `c` for rule∘pre: parameters drawn, adversarial rows placed, rows made."""
    base = 0 if c.magnitude < -30 else c.magnitude
    spread = -99 if c.spread_offset < -40 else max(-30, base + c.spread_offset)
    params = rule_params(rng, rule, 1e-30 if spread < -40 else 10.0**spread)
    if pre == ("bucketing",):
        params["bucket_size"] = bucket_size(rng, rule, c.n, c.f)
    if rule == "multikrum" and "m" in params:
        n_base, f_base = base_sizes(pre, c.n, c.f, params.get("bucket_size", 1))
        params["m"] = min(params["m"], n_base - f_base)
    agg = build(rule, pre, c.f, params, c.seed)
    bad, perm = choose_bad(rng, c.n, c.f, agg, keep_order=c.strategy == "cancel")
    good = np.ones(c.n, dtype=bool)
    good[bad] = False
    x = np.empty((c.n, c.d))
    x[good] = honest_rows(rng, c.n - len(bad), c.d, c.magnitude, spread, c.shape)
    with np.errstate(all="ignore"):
        if c.strategy == "cancel":
            place_cancelling_pairs(rng, x, bad, good, c.dtype)
        for k, row in enumerate(bad if c.strategy != "cancel" else ()):
            pick = (
                STRATEGIES[rng.integers(len(STRATEGIES))]
                if c.strategy == "independent"
                else c.strategy
            )
            if k == 0 or c.strategy == "independent" or rng.random() < 0.5:
                x[row] = adversarial_row(rng, pick, x[good], c.dtype)
            else:  # colluding: the same point as the first adversarial row
                x[row] = x[bad[0]]
        tensor = torch.from_numpy(x).to(c.dtype)
    honest = tensor.numpy()[good].astype(np.float64)
    centre = None
    if rule == "cclip" and rng.random() < 0.7:
        centre = cclip_centre(rng, honest, params["tau"], c.dtype)
        (agg.base if isinstance(agg, Wrapper) else agg).load_state_dict({"centre": centre})
    case = Case(rule, pre, agg, tensor, honest, np.sort(bad), c.f, params, centre, perm)
    if isinstance(agg, NearestNeighborMixing):
        record_mixing(case)
    return case


def place_cancelling_pairs(
    rng: np.random.Generator, x: np.ndarray, bad: np.ndarray, good: np.ndarray, dtype: torch.dtype
) -> None:
    """Consecutive adversarial rows as cancelling pairs p ± b (an odd one out gets p + b);
    `choose_bad` keeps a bucket's members consecutive, so under bucketing a pair shares one."""
    honest = x[good]
    mu = honest.mean(axis=0)
    scale = max(float(np.abs(honest - mu).max()), 1e-300)
    for k in range(0, len(bad), 2):
        plus, minus = cancelling_pair(rng, mu, scale, dtype)
        x[bad[k]] = plus
        if k + 1 < len(bad):
            x[bad[k + 1]] = minus


def record_mixing(case: Case) -> None:
    """Make the nnm wrapper of `case` store the mixing matrix it uses into `case.mix`: the cclip
    check needs the honest mixed rows, and recomputing them would cost another Gram."""
    agg = case.agg
    assert isinstance(agg, NearestNeighborMixing)
    compute = agg.mixing

    def mixing(rows: Rows, f: int) -> np.ndarray:
        case.mix = compute(rows, f)
        return case.mix

    agg.mixing = mixing  # type: ignore[method-assign]


def cclip_centre(
    rng: np.random.Generator, honest: np.ndarray, tau: float, dtype: torch.dtype
) -> torch.Tensor | None:
    """A previous output v⁰ within a few τ of the honest mean, or 1e6 spreads away; None (zeros)
    where that would not be finite in `dtype` (an output is finite)."""
    spread = max(float(np.abs(honest - honest.mean(axis=0)).max()), 1e-30)
    reach = tau * 10.0 ** rng.uniform(-1, 1) if rng.random() < 0.5 else 1e6 * spread
    with np.errstate(over="ignore"):
        centre = honest.mean(axis=0) + reach * rng.standard_normal(honest.shape[1])
        tensor = torch.from_numpy(centre).to(dtype)
    return tensor if bool(torch.isfinite(tensor).all()) else None


# -------------------------------------------------------------------------------------- bounds


def base_sizes(pre: tuple[str, ...], n: int, f: int, size: int) -> tuple[int, int]:
    """(n_b, f_b): how many rows the base rule sees, and the f it is given."""
    if pre == ("bucketing",):
        return math.ceil(n / size), f
    return n, f


def slack(case: Case, bound: float, size: float = 0.0) -> float:
    """Module docstring: rounding of values up to A, plus the Gram's relative resolution."""
    amplitude = float(np.abs(case.honest).max(initial=0.0)) + size
    return 32 * case.n * case.eps * amplitude + REL_SLACK * bound + TINY


def base_view(case: Case) -> tuple[int, int, Geometry]:
    """(n_b, f_b, geometry of the honest base rows) for the base rule of `case`."""
    g = honest_geometry(case.honest)
    n, f = base_sizes(case.pre, case.n, case.f, case.params.get("bucket_size", 1))
    return n, f, nnm_geometry(g, n, f) if case.pre == ("nnm",) else g


def check_box(case: Case, out: np.ndarray, g: Geometry) -> None:
    resolution = REL_SLACK * g.diameter if case.pre == ("nnm",) else 0.0  # only nnm uses distances
    tol = 32 * case.n * case.eps * np.maximum(np.abs(g.lo), np.abs(g.hi)) + resolution + TINY
    assert np.all(out >= g.lo - tol) and np.all(out <= g.hi + tol), (out, g.lo, g.hi)


def check_krum(case: Case, out: np.ndarray, n: int, f: int, g: Geometry) -> None:
    bound = math.sqrt(n - f - 2) * g.diameter + g.radius
    distance = float(np.linalg.norm(out - g.centre))
    assert distance <= bound + slack(case, bound), (distance, bound)


def check_gm(case: Case, out: np.ndarray, n: int, f: int, g: Geometry) -> None:
    nu = case.params["nu"]
    grad = GM_TOL * (n - 2 * f) + n * 2.0**-18
    r = g.radius
    bound = max(r * (n + grad) / (n - 2 * f - grad), r + nu * (f + grad) / (n - f))
    distance = float(np.linalg.norm(out - g.centre))
    assert distance <= bound + slack(case, bound), (distance, bound)


def honest_base_rows(case: Case) -> tuple[np.ndarray, int]:
    """The honest base rows as the rule saw them (float64) and how many rows it saw."""
    raw = case.x.numpy().astype(np.float64)
    good = np.setdiff1d(np.arange(case.n), case.bad)
    if case.pre == ("bucketing",):
        size = case.params["bucket_size"]
        groups = np.array_split(case.perm, range(size, case.n, size))
        clean = [grp for grp in groups if not np.isin(grp, case.bad).any()]
        return np.array([raw[grp].mean(axis=0) for grp in clean]), len(groups)
    if case.pre == ("nnm",):
        assert isinstance(case.agg, NearestNeighborMixing)
        assert case.mix is not None
        mix = case.mix
        check_neighbourhoods(case, mix, raw, good)
        return np.array([mix[i, mix[i] > 0] @ raw[mix[i] > 0] for i in good]), case.n
    return case.honest, case.n


def check_neighbourhoods(case: Case, mix: np.ndarray, raw: np.ndarray, good: np.ndarray) -> None:
    """nnm's guarantee: an honest row's neighbours are finite and within D_H of it."""
    members = mix[good] > 0
    assert np.isfinite(raw[members.any(axis=0)]).all()
    with np.errstate(invalid="ignore", over="ignore"):
        reach = np.sqrt(((raw[good][:, None, :] - raw[None, :, :]) ** 2).sum(axis=2))
    diameter = honest_geometry(case.honest).diameter
    assert np.all(reach[members] <= diameter * (1 + REL_SLACK) + slack(case, diameter))


def check_cclip(case: Case, out: np.ndarray) -> None:
    rows, n = honest_base_rows(case)
    tau, steps = case.params["tau"], case.params["iterations"]
    v = np.zeros(case.x.shape[1]) if case.centre is None else case.centre.double().numpy()
    start_size = float(np.abs(v).max(initial=0.0))
    for _ in range(steps):
        diff = rows - v
        norms = np.linalg.norm(diff, axis=1)
        scale = np.minimum(1.0, tau / np.where(norms > 0, norms, np.inf))
        v = v + (diff * scale[:, None]).sum(axis=0) / n
    bound = steps * (n - len(rows)) * tau / n
    distance = float(np.linalg.norm(out - v))
    size = start_size + steps * tau + float(np.abs(rows).max(initial=0.0))
    assert distance <= bound + slack(case, bound, size), (distance, bound)


def check(case: Case, out: np.ndarray) -> None:
    assert np.isfinite(out).all(), out
    n, f, g = base_view(case)
    if case.rule in ("cm", "cwtm"):
        check_box(case, out, g)
    elif case.rule in ("krum", "multikrum"):
        check_krum(case, out, n, f, g)
    elif case.rule == "gm":
        check_gm(case, out, n, f, g)
    else:
        check_cclip(case, out)


# --------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module", autouse=True)
def one_numba_thread() -> Iterator[None]:
    """Tiny inputs run single-threaded anyway (ops.threads_for); starting there saves the
    switch back and forth on every kernel call, a third of a small aggregation's time."""
    previous = numba.get_num_threads()
    numba.set_num_threads(1)
    yield
    numba.set_num_threads(previous)


@pytest.mark.parametrize("rule", RULES)
def test_output_is_finite_and_within_the_rules_bound(rule: str) -> None:
    """Each drawn configuration is checked under every wrapper: plain, nnm and bucketing."""

    @PROFILE
    @given(config=configs(rule))
    def inner(config: Config) -> None:
        rng = np.random.default_rng(config.seed)
        for pre in WRAPS:
            case = make_case(config, rule, pre, rng)
            try:
                with forced_backend(config.backend):
                    out = case.agg(case.x)
                    assert out.dtype == config.dtype and out.shape == (config.d,)
                    check(case, out.double().numpy())
            except Exception:
                note(f"{'∘'.join((*pre, rule))}: {case}")  # formatted only when it fails
                raise

    inner()
