"""Run results shared by the simulator and the gRPC server: metrics records and result files.

Both `byzps simulate` and `byzps server` (under `byzps launch`) write the same three files —
DIR/metrics.jsonl, DIR/summary.json, DIR/params.npy — from these functions, so reports and
comparisons never care which of the two produced a run, and the uplink byte count means the
same thing in both.
"""

from __future__ import annotations

import json
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from torch import Tensor

from byzps.common.codec import INDEX_BYTES
from byzps.common.config import RunConfig
from byzps.common.tasks.base import Task

log = logging.getLogger("byzps.server")


@dataclass
class RunResult:
    rounds: int
    wall_seconds: float
    final: dict[str, Any]
    params: np.ndarray


def message_bytes(nnz: int, value_bytes: int = 4) -> int:
    """Payload bytes of one k-sparse message: a 4-byte index plus the value per entry (8·nnz for
    float32). The dense convention's omitted indices are still counted, so identity runs compare
    with sparse ones per entry."""
    return (INDEX_BYTES + value_bytes) * nnz


def uplink_per_worker(total_bytes: int, num_workers: int) -> float:
    """The reported `bytes_uplink`: payload bytes of every accepted message, honest and
    Byzantine, divided by n — the average a worker sent."""
    return total_bytes / num_workers


def round_seconds(seconds: float) -> float:
    return float(f"{seconds:.6f}")


def evaluate(
    task: Task,
    x: Tensor,
    round: int,
    bytes_uplink: float,
    started: float,
    suspicion: list[float] | None = None,
) -> dict[str, Any]:
    """One metrics record, in the field order of metrics.jsonl (`started`: perf_counter origin;
    `suspicion`: the per-worker scores, by worker id, when the run keeps them)."""
    record: dict[str, Any] = {"round": round}
    record.update(task.evaluate(x.to(task.device)))
    record["bytes_uplink"] = bytes_uplink
    if suspicion is not None:
        record["suspicion"] = suspicion
    record["wall_seconds"] = round_seconds(time.perf_counter() - started)
    return record


def params_array(x: Tensor) -> np.ndarray:
    """The model as a float32 numpy array (a copy, safe to keep while x moves on)."""
    return x.detach().to("cpu").float().numpy().copy()


def emit(record: dict[str, Any], metrics_file: IO[str] | None) -> None:
    """Append one record to metrics.jsonl and flush, so a crash loses no written round."""
    if metrics_file is not None:
        metrics_file.write(json.dumps(record) + "\n")
        metrics_file.flush()


def write_results(out: Path, config: RunConfig, result: RunResult, bytes_uplink: float) -> None:
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


def progress_line(record: dict[str, Any], rounds: int) -> str:
    """One evaluation record as a progress line: round, loss, accuracy, uplink."""
    parts = [f"round {record.get('round', '?')}/{rounds}"]
    if "train_loss" in record:
        parts.append(f"loss {record['train_loss']:.6f}")
    if "test_accuracy" in record:
        parts.append(f"acc {record['test_accuracy']:.4f}")
    if "bytes_uplink" in record:
        parts.append(f"uplink {record['bytes_uplink']:,.0f} B/worker")
    return " | ".join(parts)


def evaluation_due(config: RunConfig, round: int) -> bool:
    """Whether `round` gets a metrics record: round 0, every eval_every rounds, the last."""
    run = config.run
    return round == 0 or round % run.eval_every == 0 or round == run.rounds


class MetricsRecorder:
    """metrics.jsonl of a live server: one record at round 0, every eval_every rounds and at the
    end, plus summary.json / params.npy when the run finishes.

    Evaluation runs beside the rounds, not in them: `record` takes a copy of x and hands it to
    one background thread, which evaluates and appends the records one at a time in the order
    they were handed over, so the file stays ordered; `on_record(record)`, if set, is called
    there after each append. `flush` waits for every record handed over; `finish` (the last
    round's record, then summary.json) and `close` do too, so the finished files are complete.

    On resume it keeps the records already written (a torn last line is dropped) and records a
    round only once, so replaying the write-ahead log never duplicates a line.

    `assemble(round, x)`, if set, turns the x handed over into the whole model before it is
    evaluated (rank 0 of a sharded server holds a slice and fetches the others' beside the
    rounds: byzps.server.shard_peer.ShardContext.gather_model); None skips the record.
    """

    def __init__(
        self, out: Path | None, config: RunConfig, task: Task, *, resume: bool, elapsed: float = 0
    ) -> None:
        self.out = out
        self.config = config
        self.task = task
        self.started = time.perf_counter() - elapsed
        self.last: dict[str, Any] | None = None
        self.on_record: Callable[[dict[str, Any]], None] | None = None
        self.assemble: Callable[[int, Tensor], Tensor | None] | None = None
        self._last_x: tuple[int, Tensor] | None = None  # the newest evaluated (round, whole x)
        self._rounds: set[int] = set()
        self._file: IO[str] | None = None
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        #: Whether `finish` wrote the run's results (summary.json, params.npy).
        self.results_written = False
        if out is None:
            return
        out.mkdir(parents=True, exist_ok=True)
        path = out / "metrics.jsonl"
        kept: list[str] = []
        if resume and path.exists():
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                    self._rounds.add(int(record["round"]))
                except (ValueError, KeyError, TypeError):
                    continue
                kept.append(line)
                self.last = record
            tmp = out / "metrics.jsonl.tmp"
            tmp.write_text("".join(line + "\n" for line in kept))
            tmp.replace(path)
        self._file = path.open("a" if resume else "w")
        self._thread = threading.Thread(target=self._work, name="byzps-metrics", daemon=True)
        self._thread.start()

    @property
    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def due(self, round: int) -> bool:
        return evaluation_due(self.config, round)

    def record(
        self, round: int, x: Tensor, bytes_uplink: float, suspicion: list[float] | None = None
    ) -> None:
        """Queue the record of `round` (evaluated on a copy of `x`) if one is due and not yet
        written; its wall_seconds is now's, not the evaluation's."""
        if self.out is None or not self.due(round) or round in self._rounds:
            return
        self._rounds.add(round)
        snapshot = x.detach().clone()
        wall = round_seconds(self.elapsed)

        def job() -> None:
            model = snapshot if self.assemble is None else self.assemble(round, snapshot)
            if model is None:  # the whole model of this round is no longer to be had
                return
            self._last_x = (round, model)
            record = evaluate(self.task, model, round, bytes_uplink, self.started, suspicion)
            record["wall_seconds"] = wall
            emit(record, self._file)
            self.last = record
            if self.on_record is not None:
                self.on_record(record)

        self._jobs.put(job)

    def flush(self) -> None:
        """Wait until every record queued so far is written (re-raising an evaluation error)."""
        if self._thread is not None:
            self._jobs.join()
        if self._error is not None:
            raise self._error

    def finish(
        self,
        round: int,
        x: Tensor,
        bytes_uplink: float,
        suspicion: list[float] | None = None,
        *,
        queued: bool = False,
    ) -> None:
        """summary.json and params.npy of the finished run (after the records queued before).

        `queued`: written by the metrics thread instead, after this returns. A shard restarted on
        a finished run needs its peers' slices for them, and learns the peers' addresses only
        once every shard listens, which it cannot do while its start waits here. `close` waits
        for the job; `results_written` says whether it succeeded."""
        if self.out is None:
            return
        if queued:
            snapshot = x.detach().clone()
            self._jobs.put(lambda: self._write_results(round, snapshot, bytes_uplink, suspicion))
            return
        self.flush()
        self._write_results(round, x, bytes_uplink, suspicion)

    @property
    def results_missing(self) -> bool:
        """This recorder writes the run's results (rank 0, or the only server) and has not."""
        return self.out is not None and not self.results_written

    def _write_results(
        self, round: int, x: Tensor, bytes_uplink: float, suspicion: list[float] | None
    ) -> None:
        if self._last_x is not None and self._last_x[0] == round:
            x = self._last_x[1]
        elif self.assemble is not None:
            whole = self.assemble(round, x)
            if whole is None:
                raise RuntimeError(f"round {round}: the whole final model cannot be assembled")
            x = whole
        final = self.last
        if final is None or final["round"] != round:
            final = evaluate(self.task, x, round, bytes_uplink, self.started, suspicion)
        result = RunResult(round, round_seconds(self.elapsed), final, params_array(x))
        assert self.out is not None
        write_results(self.out, self.config, result, bytes_uplink)
        self.results_written = True

    def close(self) -> None:
        if self._thread is not None:
            self._jobs.put(None)
            self._thread.join()
            self._thread = None
        if self._file is not None:
            self._file.close()
            self._file = None

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                if self._error is None:
                    job()
            except Exception as exc:  # kept for flush(): the run must not end without its records
                log.exception("evaluation failed; no further metrics records are written")
                self._error = exc
            finally:
                self._jobs.task_done()


class RoundLog:
    """rounds.jsonl of a live server: one line per closed round, {"round", "opened", "closed",
    "pushes"} (wall-clock seconds; `pushes`: workers whose update counted in it).

    Why: a round's duration is what a slow or flooding worker would stretch, so the attack
    benchmarks read honest round times from here; evaluation records are too sparse for that.
    Appended and flushed per line, so a resumed server continues the same file.
    """

    def __init__(self, out: Path | None) -> None:
        self._file: IO[str] | None = None
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
            self._file = (out / "rounds.jsonl").open("a")

    def record(self, round: int, opened: float, closed: float, pushes: int) -> None:
        line = {"round": round, "opened": opened, "closed": closed, "pushes": pushes}
        emit(line, self._file)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
