"""A simulated run killed part-way resumes from its last evaluation and ends exactly where the
uninterrupted run does (sim/checkpoint.py): the same model bit for bit and the same metrics
records but for their wall times. Stateful pieces are spread over the configurations below (the
STORM and MARINA/PAGE estimators, Rand-k's draws, cclip's centre, the suspicion scores, an
omniscient attack's cohort, bucketing's shuffles), so a piece the checkpoint forgot fails here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from cluster_helpers import byzps, metrics, wait_for
from configs import small_config, to_toml

from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.sim.build import build_simulation
from byzps.sim.checkpoint import CHECKPOINT
from byzps.sim.grid import Cell, run_cell
from byzps.sim.runner import run_simulation


class Killed(Exception):
    """Stands for a kill right after an evaluation was written, before its checkpoint."""


def config_with(**sections: dict[str, Any]) -> dict[str, Any]:
    config = small_config(rounds=30, eval_every=5, workers=7, byzantine=2, k=3)
    for name, values in sections.items():
        config[name] = config.get(name, {}) | values
    return config


CONFIGS = {
    "dm21-nnm-cm-alie": config_with(),
    "vr-dm21-randk-cclip-ipm": config_with(
        algorithm={"name": "byz-vr-dm21", "lr": 0.2, "eta": 0.1},
        compressor={"name": "randk", "k": 3},
        aggregator={"name": "cclip", "pre": []},
        attack={"name": "ipm"},
    ),
    "marina-bucketing-cwtm-sf": config_with(
        algorithm={"name": "byz-vr-marina", "lr": 0.2, "params": {"p": 0.2}},
        compressor={"name": "randk", "k": 3},
        aggregator={"name": "cwtm", "pre": ["bucketing"]},
        cluster={"workers": 11},  # 6 buckets for f = 2
        attack={"name": "sf"},
    ),
    "dasha-page-gm-minmax": config_with(
        algorithm={"name": "byz-dasha-page", "lr": 0.2},
        compressor={"name": "randk", "k": 3},
        aggregator={"name": "gm", "pre": ["nnm"]},
        attack={"name": "minmax"},
    ),
}


def records(out: Path) -> list[dict[str, Any]]:
    """metrics.jsonl without the wall times (the only field a resume may change)."""
    return [{k: v for k, v in r.items() if k != "wall_seconds"} for r in metrics(out)]


def run(config: RunConfig, out: Path, kill_at: int | None = None) -> None:
    def progress(round: int, record: dict[str, Any]) -> None:
        if round == kill_at:
            raise Killed

    task = build_run_task(config)
    simulation = build_simulation(config, task)
    run_simulation(config, task, simulation, out, progress, checkpoints=True)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_run_killed_after_an_evaluation_resumes_to_the_same_end(
    tmp_path: Path, name: str
) -> None:
    config = RunConfig.from_dict(CONFIGS[name])
    run(config, tmp_path / "whole")
    assert not (tmp_path / "whole" / CHECKPOINT).exists()  # removed with the results
    out = tmp_path / "killed"
    with pytest.raises(Killed):
        run(config, out, kill_at=15)  # record 15 written, its checkpoint not: resumes at 10
    assert [r["round"] for r in metrics(out)] == [0, 5, 10, 15]
    run(config, out)
    assert records(out) == records(tmp_path / "whole")
    whole, resumed = np.load(tmp_path / "whole" / "params.npy"), np.load(out / "params.npy")
    assert resumed.tobytes() == whole.tobytes()
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 30 and not (out / CHECKPOINT).exists()


def test_a_checkpoint_of_another_config_is_not_resumed(tmp_path: Path) -> None:
    config = RunConfig.from_dict(CONFIGS["dm21-nnm-cm-alie"])
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(config, out, kill_at=15)
    reseeded = CONFIGS["dm21-nnm-cm-alie"] | {"run": {"seed": 4, "rounds": 30, "eval_every": 5}}
    other = RunConfig.from_dict(reseeded)
    run(other, out)
    run(other, tmp_path / "fresh")
    assert records(out) == records(tmp_path / "fresh")


def test_a_sweep_cell_killed_part_way_resumes(tmp_path: Path) -> None:
    """`byzps sweep` runs a cell through run_cell: a cell directory holding a checkpoint is
    resumed, not wiped."""
    config = RunConfig.from_dict(CONFIGS["vr-dm21-randk-cclip-ipm"])
    cell = Cell("cell", {}, config)
    run_cell(cell, tmp_path / "whole")
    with pytest.raises(Killed):
        run(config, tmp_path / "sweep" / "cell", kill_at=20)
    outcome = run_cell(cell, tmp_path / "sweep")
    assert outcome.status == "run", outcome.error
    assert records(tmp_path / "sweep" / "cell") == records(tmp_path / "whole" / "cell")


@pytest.mark.slow  # two whole runs of 20,000 rounds
def test_byzps_simulate_killed_with_sigkill_resumes_with_resume(tmp_path: Path) -> None:
    """The real command, killed with SIGKILL mid-run: without --resume it refuses the directory;
    with it, it ends on the uninterrupted run's model."""
    run_config = CONFIGS["dm21-nnm-cm-alie"] | {"run": {"seed": 3, "rounds": 20_000,
                                                       "eval_every": 500}}  # fmt: skip
    path = tmp_path / "run.toml"
    path.write_text(to_toml(run_config))
    whole, out = tmp_path / "whole", tmp_path / "killed"
    done = subprocess.run(byzps("simulate", "--config", str(path), "--out", str(whole)),
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    proc = subprocess.Popen(byzps("simulate", "--config", str(path), "--out", str(out)),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    try:
        wait_for(
            lambda: (out / CHECKPOINT).exists() and len(metrics(out)) >= 3, 120, "a checkpoint"
        )
    finally:
        proc.kill()
        proc.wait(timeout=10)
    if (out / "summary.json").exists():
        pytest.fail("the run finished before it could be killed")
    again = [*byzps("simulate", "--config", str(path), "--out", str(out))]
    refused = subprocess.run(again, capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0 and "--resume" in refused.stderr
    resumed = subprocess.run([*again, "--resume"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert records(out) == records(whole)
    assert np.load(out / "params.npy").tobytes() == np.load(whole / "params.npy").tobytes()


def batch_configs(kind: str) -> list[RunConfig]:
    """Three runs that share a batch: a9a with a cohort (seeds and step sizes differ), or the
    quadratic where γ = 1e6 makes the third run diverge before round 10 (the checkpoint the
    resume starts from) while the others go on."""
    if kind == "a9a-cohort":
        runs = [config_with(run={"seed": s}, algorithm={"lr": lr}) for s, lr in
                [(0, 0.5), (1, 0.2), (2, 0.05)]]  # fmt: skip
    else:
        base = {
            "run": {"seed": 0, "rounds": 30, "eval_every": 5},
            "task": {"name": "quadratic", "params": {"dim": 50}},
            "cluster": {"workers": 3},
            "algorithm": {"name": "byz-dm21", "eta": 1.0},
            "compressor": {"name": "identity"},
            "aggregator": {"name": "mean"},
        }
        runs = [base | {"algorithm": base["algorithm"] | {"lr": lr}} for lr in (0.1, 0.05, 1e6)]
    return [RunConfig.from_dict(run) for run in runs]


@pytest.mark.parametrize("kind", ["a9a-cohort", "quadratic-one-diverges"])
def test_a_killed_batch_resumes_to_the_same_end(
    tmp_path: Path, kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A sweep's batch, killed right after its evaluation at round 15 (before that checkpoint),
    resumes from round 10 through `run_batch_of_cells` and ends as the uninterrupted batch:
    every run's records and model, the diverged run's stop included."""
    from byzps.sim import checkpoint as sim_checkpoint
    from byzps.sim.batched import build_batched_simulation
    from byzps.sim.checkpoint import batch_path
    from byzps.sim.grid import run_batch_of_cells
    from byzps.sim.runner import run_batch

    configs = batch_configs(kind)
    cells = [Cell(f"run{r}", {}, config) for r, config in enumerate(configs)]
    whole = run_batch_of_cells(cells, tmp_path / "whole")
    assert all(outcome.status == "run" and outcome.batch == 3 for outcome in whole), whole
    out = tmp_path / "killed"
    saved = sim_checkpoint.save

    def save_then_die(path: Path, configs: Any, target: Any, *args: Any) -> None:
        if target.round == 15:
            raise Killed
        saved(path, configs, target, *args)

    monkeypatch.setattr(sim_checkpoint, "save", save_then_die)
    tasks = [build_run_task(config) for config in configs]
    batch = build_batched_simulation(configs, tasks)
    with pytest.raises(Killed):
        run_batch(configs, tasks, batch, [out / c.name for c in cells], batch_path(out, configs))
    monkeypatch.setattr(sim_checkpoint, "save", saved)
    assert batch_path(out, configs).exists()
    resumed = run_batch_of_cells(cells, out)
    assert all(outcome.status == "run" and outcome.batch == 3 for outcome in resumed), resumed
    for cell in cells:
        assert records(out / cell.name) == records(tmp_path / "whole" / cell.name), cell.name
        got = np.load(out / cell.name / "params.npy")
        assert got.tobytes() == np.load(tmp_path / "whole" / cell.name / "params.npy").tobytes()
    assert not batch_path(out, configs).exists()
    if kind == "quadratic-one-diverges":  # stopped at round 7, before the checkpoint of 10
        assert metrics(out / "run2")[-1]["round"] < 10 and "diverged" in metrics(out / "run2")[-1]


def test_a_checkpoint_that_is_not_one_is_not_loaded(tmp_path: Path) -> None:
    """A cut or foreign file where the checkpoint belongs: the run starts over, from round 0."""
    import torch

    config = RunConfig.from_dict(CONFIGS["dm21-nnm-cm-alie"])
    run(config, tmp_path / "fresh")
    for name, content in {"cut": b"\x80\x02garbage", "text": b"not torch", "foreign": None}.items():
        out = tmp_path / name
        out.mkdir()
        if content is None:
            torch.save({"format": "byzps-sim-1", "simulation": {}}, out / CHECKPOINT)
        else:
            (out / CHECKPOINT).write_bytes(content)
        run(config, out)
        assert records(out) == records(tmp_path / "fresh"), name


def test_a_cell_another_process_runs_is_refused_and_left_alone(tmp_path: Path) -> None:
    """Two processes never write one cell: a cell whose lock another process holds (a second
    sweep on the directory, or a worker a killed sweep left behind) fails here, naming the
    holder, and its directory — checkpoint and all — is not touched."""
    from byzps.common.runlock import RunLock
    from byzps.sim.grid import run_batch_of_cells

    config = RunConfig.from_dict(CONFIGS["dm21-nnm-cm-alie"])
    cell = Cell("cell", {}, config)
    (tmp_path / "cell").mkdir()
    (tmp_path / "cell" / CHECKPOINT).write_bytes(b"the other process's")
    held = RunLock(tmp_path, "cell")
    try:
        outcome = run_cell(cell, tmp_path)
        assert outcome.status == "failed" and "in use by another byzps process" in str(
            outcome.error
        )
        other = Cell("other", {}, RunConfig.from_dict(CONFIGS["dm21-nnm-cm-alie"] | {"run": {
            "seed": 9, "rounds": 30, "eval_every": 5}}))  # fmt: skip
        outcomes = run_batch_of_cells([cell, other], tmp_path)
        assert [o.status for o in outcomes] == ["failed", "run"], [o.error for o in outcomes]
    finally:
        held.release()
    assert (tmp_path / "cell" / CHECKPOINT).read_bytes() == b"the other process's"
    assert run_cell(cell, tmp_path).status == "run"  # once it is free
