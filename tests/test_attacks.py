"""Attack targets: the formulas of docs/algorithms.md#attacks, checked against direct
computations."""

from __future__ import annotations

import math

import pytest
import torch
from oracles import ReplayOracle

from byzps.common.attacks import ATTACKS, AttackView, RunsView, build_attack
from byzps.common.attacks.cohort import ByzantineCohort
from byzps.common.attacks.strategies import FLT_MAX, _honest_std, alie_z
from byzps.common.codec import decode_sparse, encode_sparse
from byzps.common.compressors import build_compressor
from byzps.common.estimators import build_estimator
from byzps.common.server_rules import build_server_rule
from byzps.common.sparse import SparseBatch

D = 50


def make_view(h: int = 12, m: int = 8, seed: int = 0) -> AttackView:
    gen = torch.Generator().manual_seed(seed)
    honest = torch.randn(h, D, generator=gen, dtype=torch.float64) + 3.0
    shadow = torch.randn(m, D, generator=gen, dtype=torch.float64)
    bases = torch.randn(m, D, generator=gen, dtype=torch.float64)
    return AttackView(
        honest, shadow, bases, n=h + m, f=m, generator=torch.Generator().manual_seed(7)
    )


def test_alie_z_for_paper_setting() -> None:
    assert alie_z(20, 8) == pytest.approx(0.6745, abs=1e-3)


def test_the_compiled_spread_is_torchs_bit_for_bit() -> None:
    """ALIE's σ on CPU float32 comes from a compiled kernel, not torch.std; over stacks of
    every scale (1e-8 … 1e8, offsets up to 1e3 times the spread), one run and many, and
    columns holding inf, −inf, NaN or values near the float32 limit, it returns the very bits
    torch.std does, so swapping it in moved no run."""
    gen = torch.Generator().manual_seed(0)
    for trial in range(60):
        shape = (12, 123) if trial % 2 else (5, 7, 31)
        scale = 10.0 ** torch.empty(1).uniform_(-8, 8, generator=gen).item()
        offset = scale * 10.0 ** torch.empty(1).uniform_(-2, 3, generator=gen).item()
        honest = torch.randn(*shape, generator=gen) * scale + offset
        assert torch.equal(_honest_std(honest), honest.std(dim=-2))
    edges = torch.randn(2, 6, 5, generator=gen)
    edges[0, 1, 0], edges[0, 2, 1], edges[0, 3, 2] = math.inf, -math.inf, math.nan
    edges[1, :3, 3], edges[1, 3:, 3] = FLT_MAX, -FLT_MAX  # a spread beyond float32: inf
    edges[1, :, 4] = 1.5  # no spread: exactly 0
    expected = edges.std(dim=-2)
    assert torch.equal(_honest_std(edges).isnan(), expected.isnan())
    assert torch.equal(_honest_std(edges).nan_to_num(), expected.nan_to_num())
    assert torch.isinf(expected[1, 3]) and expected[1, 4] == 0
    strided = edges.transpose(-1, -2).contiguous().transpose(-1, -2)  # not row-major
    assert torch.equal(_honest_std(strided).nan_to_num(), expected.nan_to_num())


def test_alie_target_is_mean_minus_z_std() -> None:
    view = make_view()
    target = build_attack("alie").targets(view)
    expected = view.honest.mean(0) - alie_z(20, 8) * view.honest.std(0)
    assert target.shape == (8, D)
    torch.testing.assert_close(target, expected.expand(8, -1))


def test_ipm_target() -> None:
    view = make_view()
    target = build_attack("ipm", epsilon=0.5).targets(view)
    torch.testing.assert_close(target, (-0.5 * view.honest.mean(0)).expand(8, -1))


def test_sign_flip_negates_honest_rows() -> None:
    view = make_view()
    target = build_attack("sf").targets(view)
    honest_rows = {tuple(row.tolist()) for row in (-view.honest)}
    assert all(tuple(row.tolist()) in honest_rows for row in target)


def test_bit_flip_and_label_flip_use_own_shadow() -> None:
    view = make_view()
    torch.testing.assert_close(build_attack("bf").targets(view), -view.shadow)
    lf = build_attack("lf")
    assert lf.flips_labels
    torch.testing.assert_close(lf.targets(view), view.shadow)


def test_gauss_has_requested_scale_and_is_seeded() -> None:
    view = make_view(m=8)
    wide = AttackView(
        view.honest,
        view.shadow,
        torch.zeros(8, 20000, dtype=torch.float64),
        n=20,
        f=8,
        generator=torch.Generator().manual_seed(3),
    )
    target = build_attack("gauss", sigma=0.5).targets(wide)
    assert float(target.std()) == pytest.approx(0.5, rel=0.02)
    again = AttackView(
        wide.honest, wide.shadow, wide.bases, n=20, f=8, generator=torch.Generator().manual_seed(3)
    )
    torch.testing.assert_close(build_attack("gauss", sigma=0.5).targets(again), target)


def test_mimic_copies_one_honest_worker() -> None:
    view = make_view()
    torch.testing.assert_close(
        build_attack("mimic", target=3).targets(view), view.honest[3].expand(8, -1)
    )


def test_minmax_is_the_largest_feasible_deviation() -> None:
    view = make_view()
    target = build_attack("minmax").targets(view)[0]
    honest = view.honest
    mu, sigma = honest.mean(0), honest.std(0)
    max_pairwise = torch.cdist(honest, honest).max()
    # Feasible: no honest row is farther from the target than the honest diameter ...
    assert float(torch.cdist(target[None], honest).max()) <= float(max_pairwise) * (1 + 1e-9)
    # ... tight: a slightly larger step along −σ breaks the constraint ...
    gamma = float((mu - target).norm() / sigma.norm())
    assert gamma > 0
    beyond = mu - 1.001 * gamma * sigma
    assert float(torch.cdist(beyond[None], honest).max()) > float(max_pairwise)
    # ... and the deviation is along −σ.
    torch.testing.assert_close(target, mu - gamma * sigma)


def test_no_attack_has_no_targets() -> None:
    with pytest.raises(RuntimeError):
        build_attack("na").targets(make_view())


def test_registry_names_and_bad_params() -> None:
    assert set(ATTACKS.names()) == {
        "na",
        "alie",
        "ipm",
        "sf",
        "lf",
        "bf",
        "gauss",
        "mimic",
        "minmax",
        "scale",
        "overflow",
        "inf",
        "alie-opt",
        "ipm-opt",
    }
    with pytest.raises(ValueError, match="epsilon2"):
        build_attack("ipm", epsilon2=1.0)
    with pytest.raises(ValueError, match="sigma"):
        build_attack("gauss", sigma=-1.0)


# --- large-norm and overflow attacks --------------------------------------------------------


def test_scale_targets_minus_m_along_the_honest_mean() -> None:
    view = make_view()
    target = build_attack("scale", magnitude=1e6).targets(view)
    mu = view.honest.mean(0)
    assert target.shape == (8, D)
    torch.testing.assert_close(target, (-1e6 * mu / mu.norm()).expand(8, -1))
    assert float(target[0].norm()) == pytest.approx(1e6)


def test_scale_without_an_honest_direction_uses_minus_ones() -> None:
    view = make_view()
    flat = AttackView(
        torch.zeros_like(view.honest), view.shadow, view.bases, n=20, f=8,
        generator=view.generator,
    )  # fmt: skip
    target = build_attack("scale", magnitude=10.0).targets(flat)
    torch.testing.assert_close(target, torch.full((8, D), -10.0 / math.sqrt(D), dtype=target.dtype))


def test_overflow_targets_the_base_plus_flt_max() -> None:
    view = make_view()
    target = build_attack("overflow").targets(view)
    assert target.dtype == torch.float64  # b + FLT_MAX lies beyond float32
    torch.testing.assert_close(target - view.bases, torch.full_like(target, FLT_MAX))
    halved = AttackView(view.honest, view.shadow, view.bases, n=20, f=8,
                        generator=view.generator, gain=4.0)  # fmt: skip
    below = build_attack("overflow", sign=-1).targets(halved)
    torch.testing.assert_close(below - view.bases, torch.full_like(below, -FLT_MAX / 4))


@pytest.mark.parametrize(
    ("name", "params", "match"),
    [
        ("scale", {"magnitude": 0.0}, "magnitude"),
        ("scale", {"magnitude": -1.0}, "magnitude"),
        ("scale", {"magnitude": math.inf}, "magnitude"),
        ("scale", {"magnitude": math.nan}, "magnitude"),
        ("scale", {"magnitude": FLT_MAX}, "FLT_MAX/2"),
        ("scale", {"magnitude": "big"}, "number"),
        ("overflow", {"magnitude": 1e39}, "FLT_MAX"),
        ("overflow", {"sign": 0}, "sign"),
        ("overflow", {"sign": 2}, "sign"),
        ("overflow", {"direction": 1}, "direction"),
    ],
)
def test_large_norm_attacks_refuse_bad_parameters(
    name: str, params: dict[str, object], match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        build_attack(name, **params)


N_COHORT, F_COHORT, K = 7, 3, 4


def cohort_for(attack: str, algorithm: str, compressor: str) -> ByzantineCohort:
    """F_COHORT members of an N_COHORT-worker run, D coordinates, k = K (or dense)."""
    comp = build_compressor(compressor, D, **({} if compressor == "identity" else {"k": K}))
    ids = list(range(N_COHORT - F_COHORT, N_COHORT))
    extra = {"eta": 0.3} if algorithm == "byz-dm21" else {}
    shadow = build_estimator(algorithm, D, comp, worker_ids=ids, seed=5, **extra)
    return ByzantineCohort(
        build_attack(attack), shadow, worker_ids=ids, num_workers=N_COHORT, dim=D, seed=5,
        knowledge="cohort",
    )  # fmt: skip


def wire_values(messages: SparseBatch, compressor: str) -> list[torch.Tensor]:
    """Each row as the server decodes it: the wire's checks (finite values, lengths, order)."""
    return [decode_sparse(encode_sparse(row, compressor=compressor)).values
            for row in messages.rows()]  # fmt: skip


@pytest.mark.parametrize(
    ("attack", "algorithm", "compressor"),
    [
        ("scale", "byz-dm21", "topk"),
        ("scale", "br-csgd", "randk"),
        ("overflow", "byz-dm21", "topk"),
        ("overflow", "byz-dm21", "randk"),
        ("overflow", "br-csgd", "randk"),
        ("overflow", "byz-dm21", "identity"),
    ],
)
def test_large_norm_messages_are_finite_float32_within_k_max(
    attack: str, algorithm: str, compressor: str
) -> None:
    """Whatever the server state becomes, every message the cohort builds passes the wire's
    finite-values check as float32 and keeps the compressor's nnz (and Rand-k's seeds)."""
    cohort = cohort_for(attack, algorithm, compressor)
    oracle = ReplayOracle(F_COHORT, D, 6, seed=1)
    server = build_server_rule(cohort.shadow.server_rule, F_COHORT, D,
                               **cohort.shadow.server_rule_params())  # fmt: skip
    rows = torch.arange(F_COHORT)
    for t in range(6):
        messages = cohort.messages(torch.full((D,), 0.1 * t), oracle, t)
        assert messages.values.dtype == torch.float32
        assert messages.nnz == cohort.shadow.max_nnz(t)
        if compressor == "randk":
            assert cohort.shadow.compressor.check(messages)
        for row, values in enumerate(wire_values(messages, compressor)):
            assert values.abs().max() <= FLT_MAX
            if attack == "overflow":  # ±FLT_MAX where the state is still finite, else 0
                assert set(values.abs().unique().tolist()) <= {FLT_MAX, 0.0}
                if bool(torch.isfinite(server.candidates[row]).any()):
                    assert float(values.abs().max()) == FLT_MAX
        server.absorb(rows, messages, t)  # a server without the door's state check
        cohort.commit(messages)
        aggregate = server.candidates.mean(0)
        server.close_round(aggregate, t)
        cohort.close_round(aggregate, t)


def test_overflow_makes_a_state_non_finite_on_the_second_push() -> None:
    """Under the accumulating rule with Top-k: g = ±FLT_MAX after one accepted push (finite),
    ±inf after the second — the push a server must refuse at the door."""
    cohort = cohort_for("overflow", "byz-dm21", "topk")
    oracle = ReplayOracle(F_COHORT, D, 3, seed=1)
    server = build_server_rule("state", F_COHORT, D)
    rows = torch.arange(F_COHORT)
    first = cohort.messages(torch.zeros(D), oracle, 0)
    server.absorb(rows, first, 0)
    cohort.commit(first)
    assert bool(torch.isfinite(server.candidates).all())
    assert float(server.candidates.abs().max()) == FLT_MAX
    second = cohort.messages(torch.zeros(D), oracle, 1)
    assert torch.equal(second.indices, first.indices)  # Top-k keeps the same coordinates
    server.absorb(rows, second, 1)
    assert not bool(torch.isfinite(server.candidates).all())


@pytest.mark.parametrize("name", ["alie", "ipm", "sf", "gauss"])
@pytest.mark.parametrize("d", [1, 123, 30_000])
def test_several_runs_targets_are_bitwise_each_runs_own(name: str, d: int) -> None:
    """`targets_runs` (a batched simulation's call) gives run after run exactly what each run's
    view gives alone: alie and ipm reduce the runs' stacked honest rows together, the others
    ask view by view; each run's view holds its own blocks and its own generator keys."""
    attack = build_attack(name)
    runs = 5
    honest = torch.cat(
        [
            torch.randn(12, d, generator=torch.Generator().manual_seed(r)) * 10.0 ** (r - 2)
            for r in range(runs)
        ]
    )
    bases = torch.randn(runs * 8, d, generator=torch.Generator().manual_seed(99))

    def stacked() -> RunsView:  # fresh ones: a view's generator is drawn from once
        seeds = [10 + r for r in range(runs)]
        return RunsView(honest, honest[:0], bases, seeds=seeds, round=3, n=20, f=8)

    together = attack.targets_runs(stacked())
    alone = []
    for r in range(runs):
        own, members = honest[12 * r : 12 * (r + 1)], bases[8 * r : 8 * (r + 1)]
        view = AttackView(own, honest[:0], members, n=20, f=8, generator=None,
                          generator_keys=(10 + r, "attack", 3))  # fmt: skip
        alone.append(attack.targets(view))
        assert torch.equal(stacked().view(r).bases, view.bases)
        assert stacked().view(r).generator_keys == view.generator_keys
    assert together.shape == (runs * 8, d)
    assert together.view(torch.int32).equal(torch.cat(alone).view(torch.int32))
