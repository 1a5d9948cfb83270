"""The simulator treats non-finite messages as the gRPC server's door does (INVALID_ARGUMENT): a
Byzantine member's is refused (its state stays stale) and the run goes on; an honest worker's
means the run diverged — it stops with NonFiniteMessage naming the round and the worker before
the values reach the engine, the results record `diverged`, and `byzps simulate` says so in one
line."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from configs import small_config, to_toml

from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.common.sparse import SparseBatch
from byzps.sim.build import build_simulation
from byzps.sim.runner import run_simulation
from byzps.sim.simulation import NonFiniteMessage, Simulation, check_finite

GAUSS_OVERFLOW = {"name": "gauss", "params": {"sigma": 1e39}}  # float32 noise overflows to ±inf


def simulation(**overrides: Any) -> Simulation:
    attack = overrides.pop("attack", None)
    config = small_config(workers=5, byzantine=1, k=2, **overrides)
    if attack is not None:
        config["attack"] = attack
    return build_simulation(RunConfig.from_dict(config))


def snapshot(sim: Simulation) -> tuple[int, torch.Tensor, torch.Tensor]:
    return sim.engine.round, sim.engine.x.clone(), sim.engine.rule.candidates.clone()


def assert_unchanged(sim: Simulation, before: tuple[int, torch.Tensor, torch.Tensor]) -> None:
    round, x, candidates = before
    assert sim.engine.round == round
    assert torch.equal(sim.engine.x, x)
    assert torch.equal(sim.engine.rule.candidates, candidates)
    assert torch.isfinite(sim.engine.rule.candidates).all()


def poison(sim: Simulation, row: int, value: float, at_round: int) -> None:
    """Make the honest estimator's message of batch row `row` carry `value` from `at_round` on."""
    original = sim.honest.message

    def message(x: torch.Tensor, oracle: Any, t: int) -> SparseBatch:
        batch = original(x, oracle, t)
        if t >= at_round:
            values = batch.values.clone()
            values[row, -1] = value
            batch = SparseBatch(batch.indices, values, batch.dim, batch.seeds)
        return batch

    sim.honest.message = message  # type: ignore[method-assign]


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
def test_an_honest_non_finite_message_stops_the_run_before_the_engine(value: float) -> None:
    sim = simulation()
    poison(sim, row=2, value=value, at_round=3)
    assert_stops_at_round_3(sim, worker=2, match=r"^round 3: honest worker 2 sent")


def assert_stops_at_round_3(sim: Simulation, worker: int, match: str) -> None:
    """Rounds 0–2 run; round 3 raises NonFiniteMessage naming `worker` and changes nothing."""
    for _ in range(3):
        sim.step()
    before = snapshot(sim)
    with pytest.raises(NonFiniteMessage, match=match) as info:
        sim.step()
    assert (info.value.round, info.value.worker) == (3, worker)
    assert_unchanged(sim, before)


def test_an_honest_nan_gradient_under_top_k_on_a_large_model_stops_the_run() -> None:
    """A gradient that turned NaN (an overflowed softmax does that at a finite model) reaches the
    compressor before any message: above SMALL_DIM, Top-k's scan and partition used to raise
    ValueError there and end a sweep's cell as failed. It ranks NaN below every number, so an
    all-NaN estimate is sent, refused at the door, and the run stops as diverged."""
    config = small_config(workers=5, byzantine=1, k=50, rounds=10)
    config["task"] = {"name": "quadratic", "params": {"dim": 5000}}
    sim = build_simulation(RunConfig.from_dict(config))
    original = sim.honest_oracle.grad

    def grad(x: torch.Tensor, batch: Any, out: torch.Tensor | None = None) -> torch.Tensor:
        g = original(x, batch, out)
        if sim.engine.round >= 3:
            g[1] = math.nan
        return g

    sim.honest_oracle.grad = grad  # type: ignore[method-assign]
    assert_stops_at_round_3(sim, worker=1, match=r"^round 3: honest worker 1 sent .*nan")


def test_a_byzantine_non_finite_message_is_refused_and_the_run_goes_on() -> None:
    sim = simulation(attack=GAUSS_OVERFLOW)
    assert sim.byzantine_rows is not None and sim.byzantine_rows.tolist() == [4]
    stale = sim.engine.rule.candidates[4].clone()
    for _ in range(3):
        sim.step()
    assert sim.engine.round == 3
    assert torch.equal(sim.engine.rule.candidates[4], stale)  # never absorbed
    assert torch.isfinite(sim.engine.rule.candidates).all() and torch.isfinite(sim.x).all()


def test_check_finite_names_the_first_bad_row_and_counts_the_rest() -> None:
    values = torch.ones(4, 3)
    values[1, 2] = math.nan
    values[3, 0] = math.inf
    batch = SparseBatch(torch.zeros(4, 3, dtype=torch.int32), values, dim=10)
    rows = torch.tensor([5, 6, 7, 8])
    with pytest.raises(NonFiniteMessage, match=r"honest worker 6 .*\(nan\).*1 other") as info:
        check_finite(batch, rows, 9, torch.tensor([1, 3]))
    assert info.value.worker == 6 and info.value.round == 9
    check_finite(SparseBatch(batch.indices, torch.ones(4, 3), 10), rows, 9, torch.tensor([]))
    with pytest.raises(NonFiniteMessage, match=r"honest worker 5 .*state non-finite"):
        check_finite(SparseBatch(batch.indices, torch.ones(4, 3), 10), rows, 9, torch.tensor([0]))


def test_finite_runs_are_unaffected() -> None:
    sim = simulation(rounds=5)
    for _ in range(5):
        sim.step()
    assert sim.engine.round == 5 and torch.isfinite(sim.x).all()


def diverging_config() -> dict[str, Any]:
    """A quadratic with γ = 100 while curvatures reach 1: |1 − γh| ≈ 99 per round overflows."""
    return {
        "run": {"seed": 0, "rounds": 200, "eval_every": 10},
        "task": {"name": "quadratic", "params": {"dim": 50}},
        "cluster": {"workers": 3},
        "algorithm": {"name": "byz-dm21", "lr": 100.0, "eta": 1.0},
        "compressor": {"name": "identity"},
        "aggregator": {"name": "mean"},
    }


def test_a_diverged_run_ends_with_its_results_written(tmp_path: Path) -> None:
    config = RunConfig.from_dict(diverging_config())
    sim = build_simulation(config)
    result = run_simulation(config, build_run_task(config), sim, tmp_path)
    assert 0 < result.rounds < 200
    assert result.final["diverged"].startswith(f"round {result.rounds}: honest worker")
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["diverged"] and summary["rounds"] == result.rounds
    last = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["round"] == result.rounds and "diverged" in last


def test_simulate_cli_reports_divergence_without_a_traceback(tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text(to_toml(diverging_config()))
    args = [sys.executable, "-m", "byzps.cli.main", "simulate", "--config", str(config),
            "--out", str(tmp_path / "out")]  # fmt: skip
    done = subprocess.run(args, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert "honest worker" in done.stderr and "the run diverged" in done.stderr
    assert (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("aggregator", ["cm", "gm", "krum", "cclip"])
def test_an_overflowing_member_is_refused_by_the_servers_own_door(aggregator: str) -> None:
    """The `overflow` attack pushes ±FLT_MAX: its first push is finite and accepted, the next
    would make the member's state ±inf, and the simulator's door — the server's `Door` — refuses
    it, so every state, aggregate and the model stay finite under every rule."""
    sim = simulation(attack={"name": "overflow"}, aggregator=aggregator, pre=())
    big = float(torch.finfo(torch.float32).max)
    for _ in range(4):
        sim.step()
    member = sim.engine.rule.candidates[4]
    assert torch.isfinite(sim.engine.rule.candidates).all() and torch.isfinite(sim.x).all()
    assert float(member.abs().max()) == big  # its first push landed; later ones were refused
