"""Run a simulation to the end and write its results: metrics.jsonl, summary.json, params.npy.

The same files are written by `byzps launch` (the gRPC cluster), so reports and comparisons never
care which of the two produced a run.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from byzps.common.config import RunConfig
from byzps.common.tasks.base import Task
from byzps.server.results import (
    RunResult,
    emit,
    evaluate,
    params_array,
    round_seconds,
    write_results,
)
from byzps.sim.simulation import NonFiniteMessage, Simulation

__all__ = ["RunResult", "evaluate", "round_seconds", "run_simulation", "write_results"]

Progress = Callable[[int, dict[str, Any]], None]


def run_simulation(
    config: RunConfig,
    task: Task,
    simulation: Simulation,
    out: Path | None = None,
    progress: Progress | None = None,
) -> RunResult:
    """Run `config.run.rounds` rounds, evaluating every `eval_every` rounds and at the end.

    A run that diverges (an honest message became non-finite) ends there: its final record is
    the evaluation at the last model with `diverged` set to the reason, and the results are
    written all the same — a diverged cell is a result of a sweep (the report ranks it worst),
    not a crash.
    """
    started = time.perf_counter()
    metrics_file = None
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        metrics_file = (out / "metrics.jsonl").open("w")
    suspicion = simulation.engine.suspicion
    record = evaluate(task, simulation.x, 0, simulation.bytes_uplink, started, suspicion.report())
    try:
        _emit(record, metrics_file, progress)
        for t in range(1, config.run.rounds + 1):
            try:
                simulation.step()
            except NonFiniteMessage as exc:
                record = evaluate(
                    task, simulation.x, exc.round, simulation.bytes_uplink, started,
                    suspicion.report(),
                )  # fmt: skip
                record["diverged"] = str(exc)
                _emit(record, metrics_file, progress)
                break
            if t % config.run.eval_every == 0 or t == config.run.rounds:
                record = evaluate(
                    task, simulation.x, t, simulation.bytes_uplink, started, suspicion.report()
                )
                _emit(record, metrics_file, progress)
    finally:
        if metrics_file is not None:
            metrics_file.close()
    wall = round_seconds(time.perf_counter() - started)
    params = params_array(simulation.x)
    result = RunResult(int(record["round"]), wall, record, params)
    if out is not None:
        write_results(out, config, result, simulation.bytes_uplink)
    return result


def _emit(record: dict[str, Any], metrics_file: Any, progress: Progress | None) -> None:
    emit(record, metrics_file)
    if progress is not None:
        progress(record["round"], record)
