"""The honest worker daemon: one worker identity running its estimator against a remote server.

Per round, in the order the simulator uses (byzps.sim.simulation):

    (r, x_r) ← GetModel(round ≥ next)          long-poll
    c        ← estimator.message(x_r, oracle, r) local state (momenta) advances here
    [checkpoint: state + pending c]            optional, write-ahead (see checkpoint.py)
    Ack      ← PushUpdate(r, seq, c)           retried with the same seq and bytes
    ACCEPTED / DUPLICATE → estimator.commit(c); seq += 1
    next     ← r + 1

and the loop ends when the server streams the final model (r == config.run.rounds). The algorithm
lives entirely in the estimator built by byzps.sim.build — the very object the simulator runs with
w = h rows runs here with w = 1 — so the network adds transport, not a different algorithm.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from byzps.common.codec import decode_sparse
from byzps.common.credentials import ClientCredential, token_of
from byzps.common.estimators.base import Estimator, GradientOracle
from byzps.common.sparse import SparseBatch
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.worker import checkpoint as ckpt
from byzps.worker.client import ParameterServerClient, Pushed
from byzps.worker.session import (
    AckLedger,
    Run,
    WorkerError,
    build_run,
    check_finite_message,
    check_resumable,
    encode_row,
)
from byzps.worker.shard_client import ShardedClient, connect

log = logging.getLogger(__name__)


@dataclass
class HonestWorker:
    """The estimator, oracle and sequence state of one honest worker, driven by `run()`."""

    worker_id: str
    client: ParameterServerClient | ShardedClient
    run_info: Run
    estimator: Estimator
    oracle: GradientOracle
    digest: str
    checkpoint_dir: Path | None = None
    checkpoint_fsync: bool = True
    ledger: AckLedger | None = None
    last_seq: int = 0
    next_round: int = 0
    _store: ckpt.CheckpointStore | None = field(default=None, init=False, repr=False)

    # --- one round ---------------------------------------------------------------------------

    def step(self) -> bool:
        """Run one round; False once the server has published the final model."""
        r, x = self.client.get_model(self.next_round)
        if r >= self.run_info.rounds:
            log.info("worker %s: final model of round %d received", self.worker_id, r)
            return False
        message = self.estimator.message(x, self.oracle, r)
        check_finite_message(message, r)
        update = encode_row(message.row(0), self.run_info.config, self.estimator.compressor)
        pending = ckpt.Pending(self.last_seq + 1, r, update)
        self._save(pending)
        self._deliver(pending, message)
        self.next_round = r + 1
        return True

    def _deliver(self, pending: ckpt.Pending, message: SparseBatch) -> None:
        """Push until acknowledged, then commit (only then: a refused message changes nothing)."""
        pushed = self.client.push(pending.round, pending.seq, pending.update)
        if pushed.applied:
            self.estimator.commit(message)
            self.last_seq = pending.seq
            if self.ledger is not None:
                self.ledger.record(self.worker_id, pending.seq, pending.round, pushed.value)

    def run(self) -> None:
        while self.step():
            pass
        self._save(None)

    # --- persistence -------------------------------------------------------------------------

    def _save(self, pending: ckpt.Pending | None) -> None:
        if self.checkpoint_dir is None:
            return
        if self._store is None:
            self._store = ckpt.CheckpointStore(self.checkpoint_dir, fsync=self.checkpoint_fsync)
        state = ckpt.WorkerCheckpoint(
            worker_id=self.worker_id,
            config_digest=self.digest,
            estimator=self.estimator.state_dict(copy=False),  # written out before it moves
            last_seq=self.last_seq,
            next_round=self.next_round,
            pending=pending,
        )
        self._store.save(state)

    def resume(self, saved: ckpt.WorkerCheckpoint, server_last_seq: int) -> None:
        """Restore `saved` and settle its pending update against the server's last_seq."""
        if saved.worker_id != self.worker_id or saved.config_digest != self.digest:
            raise WorkerError(
                f"checkpoint belongs to worker {saved.worker_id} of run {saved.config_digest[:12]}"
                f", not worker {self.worker_id} of run {self.digest[:12]}"
            )
        self.estimator.load_state_dict(saved.estimator)
        self.last_seq = saved.last_seq
        self.next_round = saved.next_round
        pending = saved.pending
        if pending is not None:
            batch = SparseBatch.stack([decode_sparse(pb.SparseUpdate.FromString(pending.update))])
            if server_last_seq == pending.seq:
                log.info(
                    "worker %s: pending seq %d was applied; committing", self.worker_id, pending.seq
                )
                self.estimator.commit(batch)
                self.last_seq = pending.seq
                if self.ledger is not None:
                    self.ledger.record(
                        self.worker_id, pending.seq, pending.round, Pushed.DUPLICATE.value
                    )
            elif server_last_seq == pending.seq - 1:
                log.info("worker %s: resending pending seq %d", self.worker_id, pending.seq)
                self._deliver(pending, batch)
                server_last_seq = self.last_seq
            self.next_round = max(self.next_round, pending.round + 1)
        check_resumable(self.worker_id, server_last_seq, self.last_seq)
        if server_last_seq < self.last_seq:
            raise WorkerError(
                f"worker {self.worker_id}: the server's last_seq {server_last_seq} is behind this "
                f"worker's acknowledged seq {self.last_seq}: the server lost acknowledged updates"
            )


def run_worker(
    address: str,
    worker_id: int,
    credential: ClientCredential,
    *,
    checkpoint_dir: Path | None = None,
    checkpoint_fsync: bool = True,
    ledger_path: Path | None = None,
    client_options: dict[str, Any] | None = None,
) -> None:
    """Register, build the run from the server's config, resume if possible, train to the end.
    `credential`: this worker's token (by id), or the master secret (legacy), or None."""
    from byzps.common.components import build_run_compressor, build_run_estimator

    wid = str(worker_id)
    token = token_of(credential, wid)
    client = connect(address, wid, token=token, **(client_options or {}))
    ledger = AckLedger(ledger_path)
    try:
        reply = client.register()
        run_info = build_run(reply)
        config = run_info.config
        if worker_id >= config.honest_workers:
            log.warning(
                "worker %s runs honestly in a Byzantine slot (h = %d)", wid, config.honest_workers
            )
        compressor = build_run_compressor(config, run_info.task)
        estimator = build_run_estimator(config, run_info.task, compressor, [worker_id])
        worker = HonestWorker(
            worker_id=wid,
            client=client,
            run_info=run_info,
            estimator=estimator,
            oracle=run_info.task.oracle([worker_id], config.run.seed),
            digest=config.digest(),
            checkpoint_dir=checkpoint_dir,
            checkpoint_fsync=checkpoint_fsync,
            ledger=ledger,
        )
        client.config_digest = worker.digest  # later (re-)registrations assert the same run
        saved = ckpt.load(checkpoint_dir) if checkpoint_dir is not None else None
        if saved is not None:
            worker.resume(saved, int(reply.last_seq))
        else:
            check_resumable(wid, int(reply.last_seq), 0)
        log.info(
            "worker %s: registered at %s, round %d, %d rounds, resuming at round %d seq %d",
            wid,
            address,
            reply.round,
            run_info.rounds,
            worker.next_round,
            worker.last_seq + 1,
        )
        worker.run()
        log.info("worker %s: done, last seq %d", wid, worker.last_seq)
    finally:
        ledger.close()
        client.close()
