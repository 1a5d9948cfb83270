"""Run a simulation to the end and write its results: metrics.jsonl, summary.json, params.npy.

The same files are written by `byzps launch` (the gRPC cluster), so reports and comparisons never
care which of the two produced a run.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from byzps.common.config import RunConfig
from byzps.common.tasks.base import Task
from byzps.sim.simulation import Simulation

Progress = Callable[[int, dict[str, Any]], None]


@dataclass
class RunResult:
    rounds: int
    wall_seconds: float
    final: dict[str, Any]
    params: np.ndarray


def evaluate(task: Task, simulation: Simulation, round: int, started: float) -> dict[str, Any]:
    """One metrics record, in the field order of metrics.jsonl."""
    record: dict[str, Any] = {"round": round}
    record.update(task.evaluate(simulation.x))
    record["bytes_uplink"] = simulation.bytes_uplink
    record["wall_seconds"] = round_seconds(time.perf_counter() - started)
    return record


def round_seconds(seconds: float) -> float:
    return float(f"{seconds:.6f}")


def run_simulation(
    config: RunConfig,
    task: Task,
    simulation: Simulation,
    out: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Run `config.run.rounds` rounds, evaluating every `eval_every` rounds and at the end."""
    started = time.perf_counter()
    metrics_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics_file = (out / "metrics.jsonl").open("w")
    record = evaluate(task, simulation, 0, started)
    try:
        _emit(record, metrics_file, progress)
        for t in range(1, config.run.rounds + 1):
            simulation.step()
            if t % config.run.eval_every == 0 or t == config.run.rounds:
                record = evaluate(task, simulation, t, started)
                _emit(record, metrics_file, progress)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    wall = round_seconds(time.perf_counter() - started)
    params = simulation.x.detach().to("cpu", dtype=simulation.x.dtype).float().numpy().copy()
    result = RunResult(config.run.rounds, wall, record, params)
    if out is not None:
        write_results(out, config, result, simulation.bytes_uplink)
    return result


def _emit(record: dict[str, Any], metrics_file: Any, progress: Progress | None) -> None:
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()
    if progress is not None:
        progress(record["round"], record)


def write_results(out: Path, config: RunConfig, result: RunResult, bytes_uplink: int) -> None:
    """summary.json and params.npy, each written to a temporary name and renamed into place."""
    summary = {
        "config": config.to_dict(),
        "config_digest": config.digest(),
        "final": result.final,
        "rounds": result.rounds,
        "wall_seconds": result.wall_seconds,
        "bytes_uplink": bytes_uplink,
    }
    tmp = out / "summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")
    tmp_params = out / "params.tmp.npy"
    np.save(tmp_params, result.params.astype(np.float32))
    tmp_params.replace(out / "params.npy")
