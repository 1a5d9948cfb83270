"""alie-opt, ipm-opt (the scale searched against the run's aggregator) and inf (refused at the
door): the search picks its best trial, follows ByzFL's schedule, never does less damage than the
fixed attack, leaves the server's aggregator alone, and the simulator runs each attack."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from configs import small_config

from byzps.common.aggregators import build_aggregator
from byzps.common.attacks import ATTACKS, AttackView, build_attack
from byzps.common.attacks.optimal import LineSearch, OptimalScale
from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.common.seeding import generator
from byzps.sim.build import build_simulation
from byzps.sim.runner import run_simulation
from byzps.sim.simulation import Simulation

N, F, D = 9, 2, 12
RULES = [(name, pre) for name in ("cm", "cwtm", "krum", "gm") for pre in ((), ("nnm",))]


def rule_id(value: object) -> str:
    return "+".join(value) or "plain" if isinstance(value, tuple) else str(value)


def honest_rows(seed: int = 0, h: int = N - F) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(h, D, generator=gen) + 1.0


def make_view(honest: torch.Tensor, name: str, pre: tuple[str, ...], f: int = F) -> AttackView:
    n = honest.shape[0] + f
    aggregator = build_aggregator(name, f, pre=pre, n=n)
    return AttackView(
        honest=honest,
        shadow=honest[:f],
        bases=torch.zeros(f, honest.shape[1]),
        n=n,
        f=f,
        generator=generator(0, "attack", 0),
        aggregate=aggregator,
    )


def brute_damage(
    honest: torch.Tensor, target: torch.Tensor, name: str, pre: tuple[str, ...]
) -> float:
    """‖F(honest, f × target) − μ‖ from a freshly built aggregator, independent of the attack."""
    rows = torch.cat([honest, target.expand(F, -1)])
    aggregate = build_aggregator(name, F, pre=pre)(rows)
    return float((aggregate.double() - honest.double().mean(0)).norm())


def alie_target(honest: torch.Tensor, z: float) -> torch.Tensor:
    return honest.mean(0) - z * honest.std(0)


def ipm_target(honest: torch.Tensor, epsilon: float) -> torch.Tensor:
    return -epsilon * honest.mean(0)


FAMILIES = {"alie-opt": alie_target, "ipm-opt": ipm_target}


@pytest.mark.parametrize(("name", "pre"), RULES, ids=rule_id)
@pytest.mark.parametrize("attack", sorted(FAMILIES))
def test_the_chosen_scale_maximises_the_damage_over_the_trials(
    attack: str, name: str, pre: tuple[str, ...]
) -> None:
    honest = honest_rows(seed=len(name))
    opt = build_attack(attack, evals=12)
    assert isinstance(opt, OptimalScale)
    result = opt.search(make_view(honest, name, pre))
    assert len(result.trials) == 12 + 1  # ByzFL's evals, plus the fixed attack's scale
    brute = [brute_damage(honest, FAMILIES[attack](honest, s), name, pre) for s, _ in result.trials]
    torch.testing.assert_close(
        torch.tensor([d for _, d in result.trials], dtype=torch.float64),
        torch.tensor(brute, dtype=torch.float64),
        rtol=1e-5,
        atol=1e-6,
    )
    best = max(range(len(brute)), key=lambda i: (brute[i], -i))
    assert result.scale == result.trials[best][0]
    assert result.damage == pytest.approx(max(brute), rel=1e-5)
    # targets() sends that scale's target, the same for every member.
    targets = opt.targets(make_view(honest, name, pre))
    expected = FAMILIES[attack](honest, result.scale)
    torch.testing.assert_close(targets, expected.expand(F, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("name", "pre"), RULES, ids=rule_id)
def test_optimal_variants_do_at_least_the_fixed_attacks_damage(
    name: str, pre: tuple[str, ...]
) -> None:
    honest = honest_rows(seed=7)
    view = make_view(honest, name, pre)
    for fixed, optimal in (("alie", "alie-opt"), ("ipm", "ipm-opt")):
        baseline = brute_damage(honest, build_attack(fixed).targets(view)[0], name, pre)
        found = brute_damage(honest, build_attack(optimal).targets(view)[0], name, pre)
        assert found >= baseline * (1 - 1e-6), (fixed, found, baseline)


def test_line_search_follows_byzfls_expansion_then_contraction() -> None:
    calls: list[float] = []

    def peak_at_25(s: float) -> float:
        calls.append(s)
        return -abs(s - 25.0)

    trials = LineSearch(evals=8).maximise(peak_at_25)
    # Expansion: 0 → 10 (better, δ 20) → 30 (better, δ 40) → 70 (worse: δ ← 0.8·40 = 32);
    # contraction from 30: 30 + 32, 30 + 25.6, … with δ shrinking after every try.
    expected = [0.0, 10.0, 30.0, 70.0, 62.0, 55.6, 50.48, 46.384]
    assert [s for s, _ in trials] == pytest.approx(expected)
    assert calls == [s for s, _ in trials]
    # A damage that grows without bound keeps doubling the step (IPM against the mean).
    assert [s for s, _ in LineSearch(evals=5).maximise(lambda s: s)] == [0, 10, 30, 70, 150]


@pytest.mark.parametrize(
    ("params", "key"),
    [
        ({"evals": 0}, "evals"),
        ({"evals": True}, "evals"),
        ({"evals": 2.5}, "evals"),
        ({"evals": 10**6}, "evals"),
        ({"start": math.nan}, "start"),
        ({"delta": 0.0}, "delta"),
        ({"delta": "10"}, "delta"),
        ({"ratio": 0.5}, "ratio"),
        ({"ratio": 1.0}, "ratio"),
        ({"z": 1.0}, "z"),
    ],
)
@pytest.mark.parametrize("attack", ["alie-opt", "ipm-opt"])
def test_bad_parameters_are_refused_by_name(attack: str, params: dict[str, Any], key: str) -> None:
    with pytest.raises(ValueError, match=key):
        build_attack(attack, **params)


def test_registered_with_their_parameters() -> None:
    for attack in ("alie-opt", "ipm-opt"):
        assert [p.name for p in ATTACKS.parameters(attack)] == ["evals", "start", "delta", "ratio"]
    assert ATTACKS.parameters("inf") == ()


def test_the_stand_in_rows_have_the_servers_count() -> None:
    """A cohort that knows only its m shadows repeats them to the n − f honest rows."""
    shadows = honest_rows(h=F)
    view = dataclasses.replace(make_view(honest_rows(), "cm", ()), honest=shadows)
    rows = view.rows(torch.zeros(F, D))
    assert rows.shape == (N, D)
    assert torch.equal(rows[: N - F], shadows[torch.arange(N - F) % F])


# --- in the simulator ---------------------------------------------------------------------------


def sim_config(attack: str, **overrides: Any) -> RunConfig:
    config = small_config(workers=9, byzantine=2, k=4, **overrides)
    params = {"evals": 6} if attack.endswith("-opt") else {}
    config["attack"] = {"name": attack, "params": params}
    return RunConfig.from_dict(config)


def aggregator_state(sim: Simulation) -> dict[str, Any]:
    return sim.engine.aggregator.state_dict()


@pytest.mark.parametrize("pre", [("bucketing",), ()], ids=["bucketing+cm", "cclip"])
@pytest.mark.parametrize("attack", ["alie-opt", "ipm-opt"])
def test_the_search_never_advances_the_servers_aggregator(
    attack: str, pre: tuple[str, ...]
) -> None:
    aggregator = "cm" if pre else "cclip"
    sim = build_simulation(sim_config(attack, aggregator=aggregator, pre=pre))
    cohort = sim.cohort
    assert cohort is not None and cohort.aggregator is not None
    assert cohort.aggregator is not sim.engine.aggregator
    for t in range(4):
        # The cohort's search as step() runs it, on a saved cohort: the server's state is as is.
        saved, before = cohort.state_dict(), aggregator_state(sim)
        honest = sim.engine.rule.candidates[sim.honest_rows]
        cohort.messages(sim.x, sim.cohort_oracle, t, honest, before)  # type: ignore[arg-type]
        assert _same(aggregator_state(sim), before)
        cohort.load_state_dict(saved)
        sim.step()
        state = aggregator_state(sim)
        if pre:  # one call per round (not one per evaluation), and the search started from it
            assert state["calls"] == t + 1
            assert cohort.aggregator.state_dict()["calls"] == t + 1
        else:  # cclip's centre is the last aggregate, not some trial's
            assert torch.equal(state["centre"], sim.engine.last_aggregate)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    return bool(a == b)


def test_a_deployed_cohort_steps_its_own_copy_once_per_round() -> None:
    """Knowledge "cohort" (the `byzps attack` daemon): no server state to read, so the copy of
    bucketing's counter must follow the server's by one call per round."""
    config = small_config(workers=9, byzantine=2, k=4, aggregator="cm", pre=("bucketing",))
    config["attack"] = {"name": "alie-opt", "knowledge": "cohort", "params": {"evals": 4}}
    sim = build_simulation(RunConfig.from_dict(config))
    assert sim.cohort is not None and sim.cohort.aggregator is not None
    for t in range(3):
        sim.step()
        copy_calls = sim.cohort.aggregator.state_dict()["calls"]
        assert copy_calls == aggregator_state(sim)["calls"] == t + 1


def test_same_seed_same_run() -> None:
    runs = []
    for _ in range(2):
        sim = build_simulation(sim_config("alie-opt", aggregator="cm", pre=("bucketing",)))
        for _ in range(3):
            sim.step()
        runs.append(sim.x.clone())
    assert torch.equal(runs[0], runs[1])


def test_a_cohort_without_the_runs_aggregator_is_refused() -> None:
    from byzps.common.attacks.cohort import ByzantineCohort

    sim = build_simulation(sim_config("alie-opt"))
    assert sim.cohort is not None
    with pytest.raises(ValueError, match="aggregator"):
        ByzantineCohort(
            sim.cohort.attack,
            sim.cohort.shadow,
            worker_ids=sim.cohort.worker_ids,
            num_workers=9,
            dim=sim.cohort.dim,
            seed=3,
        )


@pytest.mark.parametrize("attack", ["alie-opt", "ipm-opt", "inf"])
def test_a_short_run_under_each_attack_writes_finite_results(attack: str, tmp_path: Path) -> None:
    config = sim_config(attack, rounds=6, eval_every=3)
    task = build_run_task(config)
    result = run_simulation(config, task, build_simulation(config, task), out=tmp_path)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["rounds"] == 6 and summary["config"]["attack"]["name"] == attack
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 3, 6]
    assert all(math.isfinite(r["train_loss"]) and "diverged" not in r for r in records)
    assert np.isfinite(np.load(tmp_path / "params.npy")).all()
    assert np.isfinite(result.params).all()


@pytest.mark.parametrize(("algorithm", "compressor"), [("byz-dm21", "topk"), ("br-csgd", "randk")])
def test_inf_is_refused_every_round_and_the_run_is_the_silent_one(
    algorithm: str, compressor: str
) -> None:
    config = small_config(workers=7, byzantine=2, k=4, attack="inf")
    eta = {"eta": 0.1} if algorithm == "byz-dm21" else {}
    config["algorithm"] = {"name": algorithm, "lr": 0.5, **eta}
    config["compressor"] = {"name": compressor, "k": 4}
    run = RunConfig.from_dict(config)
    task = build_run_task(run)
    attacked = build_simulation(run, task)
    # The same run whose Byzantine workers never send anything: their states stay at zero.
    silent = dataclasses.replace(
        build_simulation(run, task), cohort=None, cohort_oracle=None, byzantine_rows=None
    )
    rounds = 5
    for _ in range(rounds):
        attacked.step()
        silent.step()
    assert attacked.refused == rounds * 2  # both members, every round
    assert silent.refused == 0
    assert torch.equal(attacked.x, silent.x)
    assert torch.isfinite(attacked.engine.rule.candidates).all()
