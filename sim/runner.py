"""Run a simulation to the end and write its results: metrics.jsonl, summary.json, params.npy.

The same files are written by `byzps launch` (the gRPC cluster), so reports and comparisons never
care which of the two produced a run. A batch of runs (sim/batched.py) writes each run's files
exactly as the run alone would, but for the wall times.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import IO, Any

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
from byzps.server.suspicion import SuspicionScores
from byzps.sim import checkpoint as sim_checkpoint
from byzps.sim.batched import BatchedSimulation
from byzps.sim.checkpoint import Resumed
from byzps.sim.simulation import NonFiniteMessage, Simulation

__all__ = ["RunResult", "evaluate", "round_seconds", "run_batch", "run_simulation", "write_results"]

Progress = Callable[[int, dict[str, Any]], None]


class RunRecorder:
    """One run's evaluations: its metrics file, the schedule (every `eval_every` rounds and the
    last), the record of a diverged run, and the final files.

    A run that diverges (an honest message became non-finite) ends there: its final record is
    the evaluation at the last model with `diverged` set to the reason, and the results are
    written all the same — a diverged cell is a result of a sweep (the report ranks it worst),
    not a crash.
    """

    def __init__(
        self,
        config: RunConfig,
        task: Task,
        suspicion: SuspicionScores,
        out: Path | None,
        progress: Progress | None,
        started: float,
        resumed: Resumed | None = None,
    ) -> None:
        self.config, self.task, self.suspicion = config, task, suspicion
        self.out, self.progress, self.started = out, progress, started
        self.record: dict[str, Any] = {}
        if resumed is not None:  # its metrics file ends on the checkpoint's record
            self.started -= resumed.elapsed
            self.record = resumed.record
        self.file: IO[str] | None = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self.file = (out / "metrics.jsonl").open("a" if resumed is not None else "w")

    def due(self, round: int) -> bool:
        return round % self.config.run.eval_every == 0 or round == self.config.run.rounds

    def evaluate(
        self, x: Any, round: int, bytes_uplink: float, diverged: str | None = None
    ) -> None:
        record = evaluate(self.task, x, round, bytes_uplink, self.started, self.suspicion.report())
        if diverged is not None:
            record["diverged"] = diverged
        emit(record, self.file)
        if self.progress is not None:
            self.progress(record["round"], record)
        self.record = record

    def elapsed(self) -> float:
        """Seconds the run has run, those before a resume included."""
        return time.perf_counter() - self.started

    def finish(self, x: Any, bytes_uplink: float) -> RunResult:
        """Close the metrics file and write summary.json and params.npy."""
        self.close()
        wall = round_seconds(self.elapsed())
        result = RunResult(int(self.record["round"]), wall, self.record, params_array(x))
        if self.out is not None:
            write_results(self.out, self.config, result, bytes_uplink)
        return result

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


def run_simulation(
    config: RunConfig,
    task: Task,
    simulation: Simulation,
    out: Path | None = None,
    progress: Progress | None = None,
    *,
    checkpoints: bool = False,
) -> RunResult:
    """Run `config.run.rounds` rounds, evaluating every `eval_every` rounds and at the end.

    With `checkpoints` (and `out`), the run is checkpointed at every evaluation and, when `out`
    holds a checkpoint of this config, resumed from it (sim/checkpoint.py)."""
    path = None if out is None or not checkpoints else out / sim_checkpoint.CHECKPOINT
    resumed = None
    if path is not None:
        resumed = sim_checkpoint.resume(path, [config], simulation, [out])
    recorder = RunRecorder(
        config,
        task,
        simulation.engine.suspicion,
        out,
        progress,
        time.perf_counter(),
        None if resumed is None else resumed[0],
    )
    try:
        if resumed is None:
            recorder.evaluate(simulation.x, 0, simulation.bytes_uplink)
        elif progress is not None:
            progress(simulation.round, recorder.record)  # where the run stands again
        for t in range(simulation.round + 1, config.run.rounds + 1):
            try:
                simulation.step()
            except NonFiniteMessage as exc:
                recorder.evaluate(simulation.x, exc.round, simulation.bytes_uplink, str(exc))
                break
            if recorder.due(t):
                recorder.evaluate(simulation.x, t, simulation.bytes_uplink)
                if path is not None and t < config.run.rounds:
                    sim_checkpoint.save(path, [config], simulation, recorder.elapsed())
    finally:
        recorder.close()
    result = recorder.finish(simulation.x, simulation.bytes_uplink)
    if path is not None:
        sim_checkpoint.discard(path)
    return result


def run_batch(
    configs: Sequence[RunConfig],
    tasks: Sequence[Task],
    batch: BatchedSimulation,
    outs: Sequence[Path | None],
    checkpoint: Path | None = None,
) -> list[RunResult]:
    """Run a batch to the end (sim/batched.py): every run's files as it would write them alone;
    a run that diverges stops there while the others go on. With `checkpoint`, the batch is
    checkpointed there at every evaluation and resumed from it when it holds these configs'."""
    started = time.perf_counter()
    resumed = None
    if checkpoint is not None:
        resumed = sim_checkpoint.resume(checkpoint, configs, batch, outs)
    recorders = [
        RunRecorder(c, t, e.suspicion, out, None, started, None if resumed is None else resumed[r])
        for r, (c, t, e, out) in enumerate(zip(configs, tasks, batch.engines, outs, strict=True))
    ]
    rounds = configs[0].run.rounds
    try:
        if resumed is None:
            for r, recorder in enumerate(recorders):
                recorder.evaluate(batch.x(r), 0, batch.bytes_uplink(r))
        for t in range(batch.round + 1, rounds + 1):
            if not batch.running:
                break
            was_running = [run.stopped is None for run in batch.runs]
            batch.step()
            for r, recorder in enumerate(recorders):
                stopped = batch.runs[r].stopped
                if not was_running[r]:
                    continue
                if stopped is not None:
                    recorder.evaluate(
                        batch.x(r), stopped.round, batch.bytes_uplink(r), str(stopped)
                    )
                elif recorder.due(t):
                    recorder.evaluate(batch.x(r), t, batch.bytes_uplink(r))
            if checkpoint is not None and recorders[0].due(t) and t < rounds and batch.running:
                sim_checkpoint.save(checkpoint, configs, batch, recorders[0].elapsed())
    finally:
        for recorder in recorders:
            recorder.close()
    results = [rec.finish(batch.x(r), batch.bytes_uplink(r)) for r, rec in enumerate(recorders)]
    if checkpoint is not None:
        sim_checkpoint.discard(checkpoint)
    return results
