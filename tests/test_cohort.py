"""The Byzantine cohort: k-sparse messages within honest limits, exact mirrors of the server."""

from __future__ import annotations

import pytest
import torch
from oracles import ReplayOracle

from byzps.common.aggregators import build_aggregator
from byzps.common.attacks import ATTACKS, build_attack
from byzps.common.attacks.cohort import ByzantineCohort
from byzps.common.compressors import build_compressor
from byzps.common.estimators import build_estimator
from byzps.common.server_rules import build_server_rule

N, F, D, ROUNDS = 7, 3, 40, 6
# inf's messages carry +inf on purpose: the door refuses them (tests/test_attacks_optimal.py).
ATTACK_NAMES = [name for name in ATTACKS.names() if name not in ("na", "inf")]


def make_cohort(
    attack: str,
    algorithm: str = "byz-dm21",
    compressor: str = "topk",
    knowledge: str = "omniscient",
) -> ByzantineCohort:
    params = {"k": 4} if compressor != "identity" else {}
    comp = build_compressor(compressor, D, **params)
    extra = {"eta": 0.3} if algorithm in ("byz-dm21", "byz-vr-dm21", "byz-ef21-sgdm") else {}
    shadow = build_estimator(algorithm, D, comp, worker_ids=list(range(N - F, N)), seed=5, **extra)
    return ByzantineCohort(
        build_attack(attack),
        shadow,
        worker_ids=list(range(N - F, N)),
        num_workers=N,
        dim=D,
        seed=5,
        knowledge=knowledge,  # type: ignore[arg-type]
        aggregator=build_aggregator("cm", F, pre=["nnm"], n=N),  # for alie-opt, ipm-opt
    )


@pytest.mark.parametrize("attack", ATTACK_NAMES)
@pytest.mark.parametrize(("algorithm", "compressor"), [("byz-dm21", "topk"), ("br-csgd", "randk")])
def test_messages_respect_k_max_and_mirror_the_server(
    attack: str, algorithm: str, compressor: str
) -> None:
    cohort = make_cohort(attack, algorithm, compressor)
    oracle = ReplayOracle(F, D, ROUNDS, seed=1)
    rule = build_server_rule(cohort.shadow.server_rule, N, D, **cohort.shadow.server_rule_params())
    byz_rows = torch.arange(N - F, N)
    honest = torch.randn(N - F, D, dtype=torch.float64).float()
    for t in range(ROUNDS):
        x = torch.full((D,), 0.1 * t)
        messages = cohort.messages(x, oracle, t, honest=honest)
        messages.validate()
        assert messages.num_rows == F
        assert messages.nnz == cohort.shadow.max_nnz(t) == cohort.shadow.compressor.k
        rule.absorb(byz_rows, messages, t)
        cohort.commit(messages)
        # The cohort knows its members' server-side bases exactly.
        torch.testing.assert_close(cohort._sent.candidates, rule.candidates[byz_rows])
        aggregate = rule.candidates.mean(0)
        rule.close_round(aggregate, t)
        cohort.close_round(aggregate, t)


def test_state_rule_candidates_converge_to_a_fixed_target() -> None:
    """Error feedback lets a k-sparse attacker reach any target state over rounds."""
    cohort = make_cohort("mimic")
    oracle = ReplayOracle(F, D, 40, seed=2)
    honest = torch.randn(N - F, D)
    for t in range(40):
        messages = cohort.messages(torch.zeros(D), oracle, t, honest=honest)
        cohort.commit(messages)
    torch.testing.assert_close(cohort._sent.candidates, honest[0].expand(F, -1))


def test_omniscient_attack_requires_honest_candidates() -> None:
    cohort = make_cohort("alie")
    with pytest.raises(ValueError, match="honest"):
        cohort.messages(torch.zeros(D), ReplayOracle(F, D, 2), 0)


def test_cohort_knowledge_uses_only_shadows() -> None:
    cohort = make_cohort("alie", knowledge="cohort")
    messages = cohort.messages(torch.zeros(D), ReplayOracle(F, D, 2), 0)
    assert messages.num_rows == F


class ShadowsAlways(ByzantineCohort):
    """A cohort that runs its shadows even where `runs_shadows` would skip them."""

    runs_shadows = True  # type: ignore[assignment]


@pytest.mark.parametrize("attack", ATTACK_NAMES)
@pytest.mark.parametrize("knowledge", ["omniscient", "cohort"])
def test_skipping_the_shadows_never_changes_a_message(attack: str, knowledge: str) -> None:
    """Where the cohort skips its shadows (omniscient attacks that read neither them nor
    anything derived from them), every message is bitwise what running them gives."""
    fast = make_cohort(attack, knowledge=knowledge)
    full = make_cohort(attack, knowledge=knowledge)
    full.__class__ = ShadowsAlways
    oracle = ReplayOracle(F, D, ROUNDS, seed=2)
    gen = torch.Generator().manual_seed(9)
    skipped = not fast.runs_shadows
    reads_honest = attack not in ("lf", "bf", "gauss", "overflow")
    assert skipped == (knowledge == "omniscient" and reads_honest)
    for t in range(ROUNDS):
        x, honest = torch.randn(D, generator=gen), torch.randn(N - F, D, generator=gen)
        a = fast.messages(x, oracle, t, honest=honest)
        b = full.messages(x, oracle, t, honest=honest)
        assert torch.equal(a.indices, b.indices) and torch.equal(a.values, b.values), t
        fast.commit(a)
        full.commit(b)
        aggregate = torch.randn(D, generator=gen)
        fast.close_round(aggregate, t)
        full.close_round(aggregate, t)


@pytest.mark.parametrize("attack", ["gauss", "alie"])  # alie skips its shadows, gauss does not
def test_state_dict_round_trip_reproduces_messages(attack: str) -> None:
    a, b = make_cohort(attack), make_cohort(attack)
    oracle = ReplayOracle(F, D, 10, seed=3)
    honest = torch.randn(N - F, D)
    for t in range(3):
        a.commit(a.messages(torch.zeros(D), oracle, t, honest=honest))
    b.load_state_dict(a.state_dict())
    for t in range(3, 6):
        ma = a.messages(torch.ones(D), oracle, t, honest=honest)
        mb = b.messages(torch.ones(D), oracle, t, honest=honest)
        torch.testing.assert_close(ma.values, mb.values)
        assert torch.equal(ma.indices, mb.indices)
        a.commit(ma)
        b.commit(mb)


def test_unbiased_compressor_state_rule_attackers_stay_bounded() -> None:
    """DASHA's accumulating rule with Rand-k: the cohort's own states converge to a fixed target
    instead of blowing up (plain Q(t − g) would grow like ω^(t/2) with ω = d/k − 1)."""
    comp = build_compressor("randk", D, k=1)
    shadow = build_estimator("byz-dasha-page", D, comp, worker_ids=list(range(N - F, N)), seed=5)
    cohort = ByzantineCohort(
        build_attack("mimic"),
        shadow,
        worker_ids=list(range(N - F, N)),
        num_workers=N,
        dim=D,
        seed=5,
    )
    oracle = ReplayOracle(F, D, 400, seed=4)
    honest = torch.randn(N - F, D)
    for t in range(400):
        messages = cohort.messages(torch.zeros(D), oracle, t, honest=honest)
        assert messages.nnz == 1
        cohort.commit(messages)
    error = (cohort._sent.candidates - honest[0]).norm() / honest[0].norm()
    assert float(error) < 0.5, float(error)
