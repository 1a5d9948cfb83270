"""What honest and Byzantine worker daemons share: the run built from a registration, the wire
form of one message row, and the ledger of acknowledged seqs.

Kept apart from the loops so that the two daemons agree on every one of these rules.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from byzps.common.codec import encode_sparse_wire, encode_update
from byzps.common.compressors import VALUE_DTYPES, Compressor
from byzps.common.config import RunConfig
from byzps.common.sparse import SparseBatch, SparseVector
from byzps.common.tasks.base import Task
from byzps.proto.v1 import parameter_server_pb2 as pb

if TYPE_CHECKING:
    from byzps.worker.client import Pushed

log = logging.getLogger(__name__)


class WorkerError(RuntimeError):
    """The worker cannot continue without diverging from the server; the message says why."""


@dataclass(frozen=True)
class Run:
    """The run a server announced at registration, with the task built from it."""

    config: RunConfig
    task: Task

    @property
    def rounds(self) -> int:
        return self.config.run.rounds

    @property
    def seed(self) -> int:
        return self.config.run.seed


def config_from_registration(reply: pb.RegisterReply) -> RunConfig:
    """The server's RunConfig, checked against the digest it sent (a mismatch means the two
    sides would not compute the same algorithm)."""
    config = RunConfig.from_dict(json.loads(reply.config_json))
    if reply.config_digest and config.digest() != reply.config_digest:
        raise WorkerError(
            f"config digest mismatch: server says {reply.config_digest}, "
            f"its config_json hashes to {config.digest()}"
        )
    return config


def build_run(reply: pb.RegisterReply) -> Run:
    """Config and task for the run a registration describes; the task's dimension must be the
    model's the server streams."""
    from byzps.common.components import build_run_task

    config = config_from_registration(reply)
    task = build_run_task(config)
    if task.dim != reply.model.dim:
        raise WorkerError(
            f"task {config.task.name} has d = {task.dim}, server model d = {reply.model.dim}"
        )
    return Run(config, task)


def check_finite_message(message: SparseBatch, round: int) -> None:
    """WorkerError when an honest message holds NaN or ±inf: its gradient or estimate overflowed,
    the run diverged. The server's door would refuse it (INVALID_ARGUMENT) and every later round
    alike, so the worker stops here, before it saves or sends anything, with the reason (exit
    2) rather than as a refused call; the simulator ends such a run the same way (`diverged`)."""
    if not bool(torch.isfinite(message.values).all()):
        raise WorkerError(
            f"round {round}: the message holds non-finite values (the gradient or the estimate "
            "overflowed): the run diverged; a smaller algorithm.lr may avoid it"
        )


def encode_row(vec: SparseVector, config: RunConfig, compressor: Compressor | None = None) -> bytes:
    """One message row's SparseUpdate in wire form, lossless: float32 values, or the value dtype
    `compressor` rounded them to, or its packed code (QSGD, natural, sign). Wire bytes, because
    they are what the worker both checkpoints and sends (byzps.common.codec.encode_sparse_wire).

    A dense row of a sparsifier run (MARINA's full-gradient rounds) declares the identity
    compressor, since no compressor chose its support; the server's door admits it in those
    rounds only, and nothing else in them (byzps.server.validation.Door.admits).
    """
    if compressor is not None and compressor.packed:
        return encode_update(vec, compressor).SerializeToString()
    name = config.compressor.name
    if vec.nnz == vec.dim and vec.seed is None:
        name = "identity"
    dtype = torch.float32 if compressor is None else VALUE_DTYPES[compressor.values]
    return encode_sparse_wire(vec, compressor=name, dtype=dtype)


def check_resumable(worker_id: str, server_last_seq: int, my_last_seq: int) -> None:
    """A worker without knowledge of its acknowledged updates cannot rebuild its mirror g_i.

    The protocol has no call that returns a worker's server-side state, so a worker whose own
    record is behind the server's fails here, loudly, instead of silently computing
    δ = target − g against a g that the server no longer has.
    """
    if server_last_seq > my_last_seq:
        raise WorkerError(
            f"worker {worker_id}: the server has acknowledged seq {server_last_seq} but this "
            f"worker's state only knows seq {my_last_seq}; its error-feedback state cannot be "
            "rebuilt. Restart it with the --checkpoint-dir it ran with, or start a new run."
        )


class AckLedger:
    """Append-only JSON lines {"worker", "seq", "round", "status"} of acknowledged updates.

    The test of a server restart compares it with the server's last_seq; flushed per line so a
    killed worker's ledger is complete up to its last acknowledgement. Recording is idempotent
    per (worker, seq): a restarted worker that settles a pending update it had already recorded
    before it was killed does not record it twice.
    """

    def __init__(self, path: Path | None) -> None:
        self._file: Any = None
        self._last: dict[str, int] = {}
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                data = path.read_bytes()
                complete = data[: data.rfind(b"\n") + 1]
                if len(complete) != len(data):  # a line cut short by a kill
                    with path.open("r+b") as fh:
                        fh.truncate(len(complete))
                for line in complete.decode().splitlines():
                    entry = json.loads(line)
                    self._last[entry["worker"]] = max(
                        self._last.get(entry["worker"], 0), int(entry["seq"])
                    )
            self._file = path.open("a")

    def record(self, worker_id: str, seq: int, round: int, status: str) -> None:
        """Record that `seq` is applied (`status`: "ACCEPTED", or "DUPLICATE" when an earlier
        attempt applied it)."""
        if self._file is None or seq <= self._last.get(worker_id, 0):
            return
        self._last[worker_id] = seq
        line = {
            "worker": worker_id,
            "seq": seq,
            "round": round,
            "status": status,
        }
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def commit_applied(
    outcomes: Sequence[Pushed | None],
    message: SparseBatch,
    commit: Callable[..., None],
    seqs: Sequence[int],
    last_seq: list[int],
    ids: Sequence[str],
    round: int,
    ledger: AckLedger | None,
) -> None:
    """Settle one round of several identities' pushes (the rows of `message`, pushed with
    `seqs`): commit the rows the server applied — all in one call when all were — advance
    their `last_seq` and record them in `ledger`. A row not applied (refused: None, or the run
    finished first) keeps its state and its seq, exactly as if it had not been pushed."""
    applied = [i for i, done in enumerate(outcomes) if done is not None and done.applied]
    if len(applied) == len(outcomes):
        commit(message)
    elif applied:
        commit(SparseBatch.stack([message.row(i) for i in applied]), applied)
    for i in applied:
        last_seq[i] = seqs[i]
        if ledger is not None:
            ledger.record(ids[i], seqs[i], round, outcomes[i].value)  # type: ignore[union-attr]
