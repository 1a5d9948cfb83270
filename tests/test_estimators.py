"""Estimators against independent float64 reference recursions (plain numpy loops), the
reductions of docs/algorithms.md#byz-dm21, commit-after-acknowledgement, the mirror of the server
rules, and state round-trips."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
import torch
from oracles import ReplayOracle, model_sequence

from byzps.common.compressors import Identity, RandK, TopK
from byzps.common.estimators import ESTIMATORS, Estimator, build_estimator
from byzps.common.seeding import derive_seed, uniform
from byzps.common.server_rules import build_server_rule

W, D, T, K = 3, 20, 8, 4
IDS = (4, 7, 9)
SEED = 5
ETA = 0.3
P = 0.4
TOL = 1e-6
F64 = torch.float64

Compress = Callable[[np.ndarray, int], np.ndarray]
Reference = Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]


# --- reference compressors (dense output) ------------------------------------------------------


def ref_topk(z: np.ndarray, t: int) -> np.ndarray:
    del t
    out = np.zeros_like(z)
    for r in range(z.shape[0]):
        keep = np.argsort(-np.abs(z[r]), kind="stable")[:K]
        out[r, keep] = z[r, keep]
    return out


def ref_randk(z: np.ndarray, t: int) -> np.ndarray:
    out = np.zeros_like(z)
    for r, wid in enumerate(IDS):
        gen = torch.Generator().manual_seed(derive_seed(SEED, "randk", wid, t))
        keep = torch.randperm(D, generator=gen)[:K].numpy()
        out[r, keep] = z[r, keep] * D / K
    return out


def ref_identity(z: np.ndarray, t: int) -> np.ndarray:
    del t
    return z.copy()


def coin(key: str, t: int) -> bool:
    return t == 0 or uniform(SEED, key, t) < P


# --- reference recursions: yield (message, states after commit) per round ---------------------


def ref_dm21(
    o: ReplayOracle, xs: list[np.ndarray], C: Compress, authors: bool = False
) -> Reference:
    g = np.zeros((W, D))
    for t, x in enumerate(xs):
        s = o.np_grad(x, t)
        if t == 0:
            v = ETA * s if authors else s
            u = ETA * v if authors else v
        else:
            v = (1 - ETA) * v + ETA * s
            u = (1 - ETA) * u + ETA * v
        c = C(u - g, t)
        g = g + c
        yield c, {"v": v, "u": u, "g": g}


def ref_vr_dm21(o: ReplayOracle, xs: list[np.ndarray], C: Compress) -> Reference:
    g = np.zeros((W, D))
    for t, x in enumerate(xs):
        s = o.np_grad(x, t)
        if t == 0:
            v = s
            u = v
        else:
            v = s + (1 - ETA) * (v - o.np_grad(xs[t - 1], t))
            u = (1 - ETA) * u + ETA * v
        c = C(u - g, t)
        g = g + c
        yield c, {"v": v, "u": u, "g": g}


def ref_ef21(o: ReplayOracle, xs: list[np.ndarray], C: Compress, stochastic: bool) -> Reference:
    g = np.zeros((W, D))
    for t, x in enumerate(xs):
        s = o.np_grad(x, t) if stochastic else o.np_full_grad(x)
        c = C(s - g, t)
        g = g + c
        yield c, {"g": g}


def ref_ef21_sgdm(o: ReplayOracle, xs: list[np.ndarray], C: Compress) -> Reference:
    g = v = np.zeros((W, D))
    for t, x in enumerate(xs):
        s = o.np_grad(x, t)
        v = s if t == 0 else (1 - ETA) * v + ETA * s
        c = C(v - g, t)
        g = g + c
        yield c, {"v": v, "g": g}


def ref_br_sgdm(o: ReplayOracle, xs: list[np.ndarray], C: Compress) -> Reference:
    m = np.zeros((W, D))
    for t, x in enumerate(xs):
        s = o.np_grad(x, t)
        m = s if t == 0 else (1 - ETA) * m + ETA * s
        yield C(m, t), {"m": m}


def ref_br_csgd(o: ReplayOracle, xs: list[np.ndarray], C: Compress) -> Reference:
    for t, x in enumerate(xs):
        yield C(o.np_grad(x, t), t), {}


def ref_br_diana(o: ReplayOracle, xs: list[np.ndarray], C: Compress) -> Reference:
    a = K / D  # 1 / (ω + 1) with ω = d/k − 1
    h = np.zeros((W, D))
    for t, x in enumerate(xs):
        c = C(o.np_grad(x, t) - h, t)
        h = h + a * c
        yield c, {"h": h}


def ref_marina(o: ReplayOracle, xs: list[np.ndarray], C: Compress) -> Reference:
    for t, x in enumerate(xs):
        if coin("marina", t):
            yield o.np_full_grad(x), {}
        else:
            yield C(o.np_grad(x, t) - o.np_grad(xs[t - 1], t), t), {}


def ref_dasha(o: ReplayOracle, xs: list[np.ndarray], C: Compress) -> Reference:
    a = 1 / (2 * (D / K - 1) + 1)
    h = np.zeros((W, D))
    g = np.zeros((W, D))
    for t, x in enumerate(xs):
        if coin("page", t):
            h_new = o.np_full_grad(x)
        else:
            h_new = h + o.np_grad(x, t) - o.np_grad(xs[t - 1], t)
        m = C(h_new - h - a * (g - h), t)
        h = h_new
        g = g + m
        yield m, {"h": h, "g": g}


# --- cases: (estimator name, compressor, params, reference) ------------------------------------

CASES: dict[str, tuple[str, Callable[[], Any], dict[str, Any], Callable[..., Reference]]] = {
    "dm21": ("byz-dm21", lambda: TopK(D, k=K), {"eta": ETA}, ref_dm21),
    "dm21-authors": (
        "byz-dm21",
        lambda: TopK(D, k=K),
        {"eta": ETA, "authors_init": True},
        lambda o, xs, C: ref_dm21(o, xs, C, authors=True),
    ),
    "vr-dm21": ("byz-vr-dm21", lambda: TopK(D, k=K), {"eta": ETA}, ref_vr_dm21),
    "ef21": (
        "byz-ef21",
        lambda: TopK(D, k=K),
        {},
        lambda o, xs, C: ref_ef21(o, xs, C, stochastic=False),
    ),
    "ef21-stochastic": (
        "byz-ef21",
        lambda: TopK(D, k=K),
        {"stochastic": True},
        lambda o, xs, C: ref_ef21(o, xs, C, stochastic=True),
    ),
    "ef21-sgdm": ("byz-ef21-sgdm", lambda: TopK(D, k=K), {"eta": ETA}, ref_ef21_sgdm),
    "br-sgdm": ("br-sgdm", lambda: Identity(D), {"eta": ETA}, ref_br_sgdm),
    "br-csgd": ("br-csgd", lambda: RandK(D, k=K), {}, ref_br_csgd),
    "br-diana": ("br-diana", lambda: RandK(D, k=K), {}, ref_br_diana),
    "marina": ("byz-vr-marina", lambda: RandK(D, k=K), {"p": P}, ref_marina),
    "dasha": ("byz-dasha-page", lambda: RandK(D, k=K), {"p": P}, ref_dasha),
}

REF_COMPRESS: dict[type, Compress] = {TopK: ref_topk, RandK: ref_randk, Identity: ref_identity}


def make(case: str, **extra: Any) -> Estimator:
    name, comp, params, _ = CASES[case]
    return build_estimator(name, D, comp(), worker_ids=IDS, seed=SEED, dtype=F64, **params, **extra)


def setup() -> tuple[ReplayOracle, list[torch.Tensor]]:
    return ReplayOracle(W, D, T, seed=2), model_sequence(D, T)


def assert_close(got: torch.Tensor, expected: np.ndarray, what: str) -> None:
    np.testing.assert_allclose(got.numpy(), expected, rtol=0, atol=TOL, err_msg=what)


def test_coins_exercise_both_branches() -> None:
    for key in ("marina", "page"):
        assert {coin(key, t) for t in range(1, T)} == {True, False}, key


def test_all_estimators_are_covered() -> None:
    assert {c[0] for c in CASES.values()} == set(ESTIMATORS.names())


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_reference_recursion(case: str) -> None:
    _, comp, _, reference = CASES[case]
    oracle, xs = setup()
    est = make(case)
    ref = reference(
        ReplayOracle(W, D, T, seed=2), [x.numpy() for x in xs], REF_COMPRESS[type(comp())]
    )
    for t, (x, (ref_msg, ref_states)) in enumerate(zip(xs, ref, strict=True)):
        msg = est.message(x, oracle, t)
        msg.validate()
        assert msg.num_rows == W and msg.nnz <= est.max_nnz(t)
        assert_close(msg.to_dense(), ref_msg, f"{case} message, round {t}")
        est.commit(msg)
        state = est.state_dict()
        for key, value in ref_states.items():
            assert_close(state[key], value, f"{case} state {key}, round {t}")
        assert state["steps"] == t + 1


def test_vr_samples_one_batch_per_round() -> None:
    oracle, xs = setup()
    est = make("vr-dm21")
    for t, x in enumerate(xs):
        est.commit(est.message(x, oracle, t))
    assert oracle.sampled == list(range(T))


def test_marina_full_rounds_are_dense() -> None:
    oracle, xs = setup()
    est = make("marina")
    for t, x in enumerate(xs):
        msg = est.message(x, oracle, t)
        assert msg.nnz == (D if coin("marina", t) else K) == est.max_nnz(t)
    assert est.server_rule_params() == {"p": P, "seed": SEED}


# --- reductions ----------------------------------------------------------------------------------


def run(est: Estimator, oracle: ReplayOracle, xs: list[torch.Tensor]) -> list[torch.Tensor]:
    out = []
    for t, x in enumerate(xs):
        msg = est.message(x, oracle, t)
        est.commit(msg)
        out.append(msg.to_dense())
    return out


def test_dm21_with_eta_one_is_stochastic_ef21() -> None:
    oracle, xs = setup()
    dm21 = build_estimator("byz-dm21", D, TopK(D, k=K), num_workers=W, dtype=F64, eta=1.0)
    ef21 = build_estimator("byz-ef21", D, TopK(D, k=K), num_workers=W, dtype=F64, stochastic=True)
    dm, ef = run(dm21, oracle, xs), run(ef21, oracle, xs)
    for t, (a, b) in enumerate(zip(dm, ef, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=f"round {t}")


def test_dm21_with_identity_is_double_momentum_sgd() -> None:
    oracle, xs = setup()
    est = build_estimator("byz-dm21", D, Identity(D), num_workers=W, dtype=F64, eta=ETA)
    v = u = None
    for t, x in enumerate(xs):
        s = oracle.np_grad(x.numpy(), t)
        v = s if t == 0 else (1 - ETA) * v + ETA * s
        u = v if t == 0 else (1 - ETA) * u + ETA * v
        g_before = est.state_dict()["g"].numpy()
        msg = est.message(x, oracle, t)
        assert_close(msg.to_dense(), u - g_before, f"message = u − g, round {t}")
        est.commit(msg)
        assert_close(est.state_dict()["g"], u, f"g = u after commit, round {t}")


def test_vr_dm21_with_x_independent_gradients_is_dm21() -> None:
    oracle = ReplayOracle(W, D, T, seed=2, x_dependent=False)
    xs = model_sequence(D, T)
    vr = run(make("vr-dm21"), oracle, xs)
    dm = run(make("dm21"), oracle, xs)
    for t, (a, b) in enumerate(zip(vr, dm, strict=True)):
        torch.testing.assert_close(a, b, rtol=0, atol=TOL, msg=f"round {t}")


# --- commit only after acknowledgement ----------------------------------------------------------


@pytest.mark.parametrize("case", ["dm21", "vr-dm21", "ef21-sgdm", "br-diana", "dasha"])
def test_message_does_not_touch_the_mirror(case: str) -> None:
    oracle, xs = setup()
    est = make(case)
    mirror = "h" if case == "br-diana" else "g"
    est.commit(est.message(xs[0], oracle, 0))
    before = est.state_dict()[mirror].clone()
    est.message(xs[1], oracle, 1)
    msg = est.message(xs[2], oracle, 2)  # the previous one was lost: never acknowledged
    assert torch.equal(est.state_dict()[mirror], before)
    est.commit(msg)
    scale = est.commit_scale  # type: ignore[attr-defined]
    torch.testing.assert_close(est.state_dict()[mirror], before + scale * msg.to_dense())


def test_lost_message_is_carried_by_the_next_one() -> None:
    """With C = identity the next message is u − g with the unchanged g: nothing is lost."""
    oracle, xs = setup()
    est = build_estimator("byz-dm21", D, Identity(D), num_workers=W, dtype=F64, eta=ETA)
    est.commit(est.message(xs[0], oracle, 0))
    est.message(xs[1], oracle, 1)  # lost
    est.commit(est.message(xs[2], oracle, 2))
    state = est.state_dict()
    torch.testing.assert_close(state["g"], state["u"])


def test_commit_selected_rows() -> None:
    oracle, xs = setup()
    est = make("dm21")
    msg = est.message(xs[0], oracle, 0)
    only = type(msg)(msg.indices[1:2], msg.values[1:2], D)
    est.commit(only, rows=[1])
    g = est.state_dict()["g"]
    assert torch.equal(g[[0, 2]], torch.zeros(2, D, dtype=F64))
    torch.testing.assert_close(g[1], msg.to_dense()[1])
    with pytest.raises(ValueError, match="rows"):
        est.commit(msg, rows=[0])


# --- the server mirror ----------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_server_rule_mirrors_the_worker(case: str) -> None:
    oracle, xs = setup()
    est = make(case)
    rule = build_server_rule(est.server_rule, W, D, dtype=F64, **est.server_rule_params())
    for t, x in enumerate(xs):
        msg = est.message(x, oracle, t)
        rule.absorb(torch.arange(W), msg, t)
        est.commit(msg)
        rule.close_round(rule.candidates.mean(dim=0), t)
        if est.server_rule == "state":
            torch.testing.assert_close(rule.candidates, est.state_dict()["g"], rtol=0, atol=TOL)
        if est.server_rule == "diana":
            torch.testing.assert_close(rule.h, est.state_dict()["h"], rtol=0, atol=TOL)
        if est.server_rule == "marina" and coin("marina", t):
            torch.testing.assert_close(rule.candidates, oracle.full_grad(x), rtol=0, atol=TOL)


# --- state round trip -----------------------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_state_round_trip(case: str) -> None:
    oracle, xs = setup()
    est = make(case)
    for t in range(3):
        est.commit(est.message(xs[t], oracle, t))
    clone = make(case)
    clone.load_state_dict(est.state_dict())
    for t in range(3, T):
        a, b = est.message(xs[t], oracle, t), clone.message(xs[t], oracle, t)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values), t
        assert a.seeds == b.seeds
        est.commit(a)
        clone.commit(b)
    with pytest.raises(ValueError, match="missing"):
        make(case).load_state_dict({})


# --- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "comp", "params", "word"),
    [
        ("br-sgdm", TopK(D, k=K), {}, "compressor"),
        ("br-csgd", TopK(D, k=K), {}, "compressor"),
        ("br-diana", TopK(D, k=K), {}, "compressor"),
        ("byz-vr-marina", TopK(D, k=K), {}, "compressor"),
        ("byz-dasha-page", TopK(D, k=K), {}, "compressor"),
        ("byz-dm21", TopK(D + 1, k=K), {}, "compressor"),
        ("byz-dm21", TopK(D, k=K), {"eta": 0.0}, "eta"),
        ("byz-vr-dm21", TopK(D, k=K), {"eta": 1.5}, "eta"),
        ("br-diana", RandK(D, k=K), {"a": 2.0}, "'a'|a must"),
        ("byz-vr-marina", RandK(D, k=K), {"p": 0.0}, "p must"),
        ("byz-dm21", TopK(D, k=K), {"gamma": 0.1}, "gamma"),
        ("byz-dm21", TopK(D, k=K), {"num_workers": 2, "worker_ids": [1]}, "worker_ids"),
        ("nope", TopK(D, k=K), {}, "nope"),
    ],
)
def test_bad_parameters(name: str, comp: Any, params: dict[str, Any], word: str) -> None:
    with pytest.raises(ValueError, match=word):
        build_estimator(name, D, comp, **params)


def test_defaults() -> None:
    comp = RandK(D, k=K)
    assert build_estimator("br-diana", D, comp).server_rule_params() == {"a": pytest.approx(K / D)}
    dasha = build_estimator("byz-dasha-page", D, comp)
    assert dasha.a == pytest.approx(1 / (2 * (D / K - 1) + 1))  # type: ignore[attr-defined]
    assert dasha.p == pytest.approx(K / D)  # type: ignore[attr-defined]
    est = build_estimator("byz-dm21", D, TopK(D, k=K), worker_ids=[3, 8])
    assert est.num_workers == 2 and est.max_nnz(0) == K  # type: ignore[attr-defined]
    assert est.server_rule == "state" and est.server_rule_params() == {}


def test_oracle_shape_is_checked() -> None:
    oracle = ReplayOracle(2, D, T)
    est = make("dm21")
    with pytest.raises(ValueError, match="shape"):
        est.message(torch.zeros(D, dtype=F64), oracle, 0)


@pytest.mark.parametrize("case", ["vr-dm21", "marina", "dasha"])
def test_previous_model_is_a_copy(case: str) -> None:
    """A server that steps x in place must not change the worker's x^{t−1}."""
    oracle, xs = setup()
    expected = run(make(case), oracle, xs)
    est, x = make(case), xs[0].clone()
    for t in range(T):
        x.copy_(xs[t])  # the same tensor, updated in place
        msg = est.message(x, oracle, t)
        est.commit(msg)
        torch.testing.assert_close(msg.to_dense(), expected[t], rtol=0, atol=TOL, msg=f"round {t}")
