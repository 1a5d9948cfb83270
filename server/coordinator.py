"""The round state machine of a live server: registration, pushes, quorum, deadlines, answers.

Transport-free: the servicer (byzps.server.service) decodes and authenticates a call and hands
this module domain values — a worker's row, an `Update` that passed the door's wire checks — and
maps its refusals (Rejected) to status codes; nothing here knows gRPC or protobuf, so every rule is
unit-testable without sockets. All state mutation happens under one lock, in this order for a
push:

    seq check → round check → door.admit (the state stays finite) → engine.absorb → ledger.commit
    → WAL record queued → maybe close the round (its record queued too)

and then, outside the lock, the push waits for the log's writer to have written its record (group
commit: byzps.server.wal.LogWriter) before it returns the Ack — so an update is on disk before it
is acknowledged, pushes arriving meanwhile share the next write, and a refused update changes
nothing. A duplicate's Ack waits the same way for the record of the original. A closed round's
model is served only once its close record is on disk (`_published`): no worker ever computes
on a model that a crash could take back. A round closes when every registered worker has pushed
for it, or when at least `quorum` have and `round_deadline` seconds passed since it opened;
workers that missed it keep their stale state.

The first round opens once all n workers registered, or at the startup timeout; on a shard also
once a peer shard closed it (`_follow_peers`: a worker may register with some shards only).
A resumed run that had already opened its first round opens its recovered round at once: it
does not wait for registrations again (`start`), and its registered set is what it had — the
checkpoint's table, every pusher in the log, and the rows registered when the run opened
(`CheckpointStore.record_open`) — so "every registered worker pushed" never means fewer workers
than before the restart.

Nothing here blocks waiting for a round: `model` and `downlink` answer at once (None: not yet),
and listeners registered with `on_change` hear of every closed round and of shutdown, so the
servicer can park waiting callers without holding a thread each.

Replaying the write-ahead log after a crash goes through the same `_accept` / `_close` steps as
live traffic, which is why replay reproduces the engine state bit for bit.
"""

from __future__ import annotations

import contextlib
import enum
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from byzps.common.aggregators.collective import Collective, all_sum, sharded
from byzps.common.config import RunConfig
from byzps.common.downlink import DenseModel, Downlink
from byzps.common.sparse import SparseBatch
from byzps.server.checkpoint import CheckpointStore, Recovered
from byzps.server.engine import RoundEngine
from byzps.server.metrics import ServerMetrics
from byzps.server.results import (
    MetricsRecorder,
    RoundLog,
    evaluation_due,
    progress_line,
    uplink_per_worker,
)
from byzps.server.shard_peer import COLLECTIVE, MODEL, PeerError, ShardContext, pack_arrays
from byzps.server.validation import (
    Door,
    Refusal,
    Rejected,
    SeqDecision,
    SeqLedger,
    Update,
    check_round,
)
from byzps.server.wal import CloseRecord, Record, UpdateRecord

log = logging.getLogger("byzps.server")


class Phase(enum.Enum):
    STARTING = "starting"  # waiting for all n registrations (or the startup timeout, or a peer)
    RUNNING = "running"  # a round is open
    FINISHED = "finished"  # round == rounds: only the final model is served


@dataclass(frozen=True)
class Settings:
    """Operational knobs of a server (not part of the run config, so not in its digest)."""

    quorum: int
    round_deadline: float = 10.0
    startup_timeout: float = 60.0
    checkpoint_every: int = 50


@dataclass
class WorkerInfo:
    last_seen: float  # wall clock (time.time()) of its last authenticated call
    last_round: int = -1  # round its last accepted update claimed; -1: none yet


@dataclass(frozen=True)
class AckInfo:
    duplicate: bool
    round: int
    last_seq: int


@dataclass(frozen=True)
class WorkerStatus:
    row: int
    last_seen: float
    last_seq: int
    last_round: int


@dataclass(frozen=True)
class StatusInfo:
    round: int
    rounds: int
    phase: Phase
    num_workers: int
    workers: list[WorkerStatus]
    bytes_in: int
    bytes_out: int
    #: Per-worker suspicion scores by row, or None when the run keeps none.
    suspicion: list[float] | None = None


class Coordinator:
    """One run's server: the engine plus everything about rounds and who sent what."""

    def __init__(
        self,
        config: RunConfig,
        engine: RoundEngine,
        door: Door,
        settings: Settings,
        *,
        metrics: MetricsRecorder | None = None,
        rounds_log: RoundLog | None = None,
        store: CheckpointStore | None = None,
        clock: Callable[[], float] = time.monotonic,
        observer: ServerMetrics | None = None,
        shards: ShardContext | None = None,
    ) -> None:
        n = config.cluster.workers
        if not 1 <= settings.quorum <= n:
            raise ValueError(f"quorum must be in [1, {n}], got {settings.quorum}")
        self.config = config
        self.engine = engine
        self.door = door
        self.dim = int(engine.x.numel())
        self.num_workers = n
        self.rounds = config.run.rounds
        self.settings = settings
        self._metrics = metrics
        if metrics is not None:  # its records are evaluated and logged on its own thread
            metrics.on_record = lambda record: log.info("%s", progress_line(record, self.rounds))
        self._rounds_log = rounds_log
        self._store = store
        self._clock = clock
        #: This server's place in a sharded one (byzps.server.shard_peer); None: unsharded.
        self._shards = shards
        # Live metrics (byzps.server.metrics): told of every round closed live.
        self._observer = observer if observer is not None else ServerMetrics()
        self._lock = threading.Lock()
        self._listeners: list[Callable[[], None]] = []
        self._ledger = SeqLedger()
        self._workers: dict[int, WorkerInfo] = {}
        self._pushed: set[int] = set()
        self._bytes_total = 0  # payload bytes of every accepted update
        # On a shard: every shard's payload bytes as of the last close (the barrier sums them).
        self._cluster_bytes = 0
        self._bytes_in = 0
        self._bytes_out = 0
        self._phase = Phase.STARTING
        self._opened_at = 0.0
        self._opened_wall = 0.0
        self._startup_deadline = 0.0
        # The run has opened its first round: here, or before a restart (on record, `start`).
        self._run_opened = False
        self._stopping = False
        self.failure: BaseException | None = None
        # This round's dense answers (see _snapshot); emptied whenever x moves.
        self._snapshots: dict[tuple[int, bool], DenseModel] = {}
        # Group commit: the newest round whose close record is on disk (the one served), the
        # (log ticket, round) of a closed round still waiting for it, each row's newest ticket.
        self._published = 0
        self._unpublished: tuple[int, int] | None = None
        self._row_ticket: dict[int, int] = {}

    # --- lifecycle ------------------------------------------------------------------------

    def start(self, recovered: Recovered | None = None) -> None:
        """Begin serving: restore `recovered` (checkpoint + replayed log) or start fresh at x⁰,
        then write the generation checkpoint a later resume starts from."""
        with self._lock:
            if recovered is not None and recovered.state is not None:
                self._load_state(recovered.state)
                # Rank 0 evaluates beside the rounds, so it may not have fetched the checkpoint
                # round's slice yet; the replay below publishes only the rounds after it.
                self._publish_slice()
            if recovered is not None:
                for record in recovered.records:
                    self._replay(record)
                # Registrations are not logged, and a replayed push re-registers only its
                # pusher: a worker that registered and never pushed (a silent Byzantine one)
                # would be forgotten, and a resume at round 0 would wait for it until the
                # startup timeout. A run past round 0, or whose open is on record, had opened
                # its first round: it opens the recovered one at once (`_maybe_open`) with the
                # rows registered at the open among its registered ones.
                for row, seen in (recovered.opened or {}).items():
                    self._workers.setdefault(row, WorkerInfo(seen))
                self._run_opened = self.engine.round > 0 or recovered.opened is not None
            if self.engine.round >= self.rounds:
                self._finish(starting=True)
            else:
                self._record_metrics()
            if self._store is not None:
                # The generation a later resume starts from. A shard does not wait for its first
                # record here: rank 0 evaluates it from every shard's slice, and the shards
                # learn each other's addresses only once all of them listen.
                self._checkpoint(flush=self._shards is None)
            self._published = self.engine.round
            self._startup_deadline = self._clock() + self.settings.startup_timeout
            # A shard's close is a barrier with its peers, and they reach this shard only once
            # it listens: a round whose pushes its log already holds in full (killed while it
            # waited at the barrier) is closed by the first tick instead, or this shard and
            # its peers would wait for each other until the peer timeout.
            self._maybe_open(close=self._shards is None)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Call `listener()` (under the lock: it must only schedule work) whenever a round
        closes or the server stops, so that waiting callers can look again."""
        self._listeners.append(listener)

    def stop(self) -> None:
        """Refuse new work and wake every waiting caller (graceful shutdown, step 1)."""
        with self._lock:
            self._stopping = True
            self._notify()

    def close(self, *, checkpoint: bool = True) -> None:
        """Final checkpoint (unless storage failed) and release files (shutdown, step 2)."""
        with self._lock:
            self._stopping = True
            if checkpoint and self._store is not None and self.failure is None:
                self._checkpoint()
            for resource in (self._store, self._metrics, self._rounds_log):
                if resource is not None:
                    resource.close()

    @property
    def round(self) -> int:
        return self.engine.round

    @property
    def finished(self) -> bool:
        return self._phase is Phase.FINISHED

    def tick(self) -> None:
        """Time-driven transitions: the startup timeout and round deadlines (call it often)."""
        with self._lock:
            if self.failure is None and not self._stopping:
                with contextlib.suppress(Rejected):  # a failed close sets `failure`
                    self._maybe_open()
                    self._maybe_close()
            pending = self._unpublished
            behind = self._overdue_round()
            if behind is None:
                behind = self._starting_round()
        if pending is not None:
            # A storage failure sets `failure`, and the daemon stops.
            with contextlib.suppress(Rejected):
                self.settle(pending[0])
        if behind is not None:
            self._follow_peers(behind)

    def _starting_round(self) -> int | None:
        """On a shard still waiting to open its first round, that round; None otherwise. Caller
        holds the lock."""
        waiting = self._phase is Phase.STARTING and self.failure is None and not self._stopping
        return self.engine.round if self._shards is not None and waiting else None

    def _overdue_round(self) -> int | None:
        """On a shard, the open round once its deadline has passed without this shard closing
        it (too few pushes arrived here); None otherwise. Caller holds the lock."""
        running = self._phase is Phase.RUNNING and self.failure is None and not self._stopping
        late = self._clock() - self._opened_at >= self.settings.round_deadline
        return self.engine.round if self._shards is not None and running and late else None

    def _follow_peers(self, round: int) -> None:
        """Catch up with a peer shard that already closed `round` (its barrier part is
        published): every shard must close every round, or the closer waits at the barrier
        forever.

        A running shard closes it only past its deadline (`_overdue_round`), so that in a healthy
        round each shard closes on its own pushes and a shard's round holds exactly what one
        server's would. A shard still starting (`_starting_round`) opens it: a worker may
        register with some shards only, and then a shard that saw all n open at once, closed the
        round and waits at the barrier, while one that missed a registration would wait for its
        startup timeout — past the closer's peer timeout, which then stops it. Opened here, the
        round closes by the ordinary rules: at once if every worker registered here pushed, else
        on the quorum after the deadline, or by following the peer as a running shard does."""
        assert self._shards is not None
        if not self._shards.peers.published(COLLECTIVE, round, 0):
            return
        with self._lock, contextlib.suppress(Rejected):  # a failed close sets `failure`
            if self._starting_round() == round:
                log.info("round %d: a peer shard opened and closed it; opening it here too", round)
                self._open()
                self._maybe_close()
            elif self._overdue_round() == round:
                log.info("round %d: a peer shard closed it; closing it here too", round)
                self._close()

    # --- RPC-facing operations ------------------------------------------------------------

    def register(self, row: int) -> tuple[int, int]:
        """Mark worker `row` registered; returns (current round, its last acknowledged seq)."""
        with self._lock:
            self._check_serving()
            self._touch(row)
            self._maybe_open()
            return self.engine.round, self._ledger.last(row)

    def touch(self, row: int) -> None:
        """Record an authenticated call from a registered worker (its last-seen time)."""
        with self._lock:
            info = self._workers.get(row)
            if info is not None:
                info.last_seen = time.time()

    def k_max(self, round: int) -> int:
        """The largest nnz an update computed at `round` may carry (dense MARINA/PAGE rounds)."""
        return self.door.k_max(round)

    def push(self, update: Update) -> AckInfo:
        """Apply one update exactly once; Rejected (nothing changed) otherwise. A push after
        the run finished is refused with OUT_OF_RANGE: workers take it as "stop", not a fault.
        Returns once the update's log record is on disk: `apply` then `settle`."""
        ack, ticket = self.apply(update)
        self.settle(ticket)  # on disk before the Ack (with a close this push caused)
        return ack

    def apply(self, update: Update) -> tuple[AckInfo, int]:
        """`push` without the wait for the disk: the Ack, and the log ticket that must be on disk
        before the Ack may be sent (`settle`, or `durable` to ask; 0 without storage).

        Why split: the wait holds no lock and needs no CPU, but a thread blocked in it is a
        thread the coordinator's pool lacks. With the pool's four threads each parked on a group
        commit, at most four pushes shared one fsync: at n = 1,000 a round was ~250 fsyncs and
        half the pool's samples sat in that wait (py-spy; 0.28 rounds/s, 0.39 after). The
        servicer applies on the pool and leaves the wait to one thread for all pushes
        (`DurableAcks`), so a group commit holds every push that arrived during the previous
        one."""
        with self._lock:
            self._check_serving()
            if self._phase is Phase.FINISHED:
                raise Rejected(Refusal.OUT_OF_RANGE, f"the run finished at round {self.rounds}")
            known = self._workers.get(update.row)
            if known is not None:
                known.last_seen = time.time()
            if self._ledger.check(update.row, update.seq) is SeqDecision.DUPLICATE:
                ack = AckInfo(True, self.engine.round, self._ledger.last(update.row))
                ticket = self._row_ticket.get(update.row, 0)  # the original's record
            else:
                last_round = -1 if known is None else known.last_round
                check_round(
                    update.round,
                    server_round=self.engine.round,
                    last_round=last_round,
                    pushed_now=update.row in self._pushed,
                )
                self._accept(update)
                record = UpdateRecord(update.row, update.seq, update.round, update.encoded)
                self._row_ticket[update.row] = self._log(record)
                self._maybe_open()
                self._maybe_close()
                ack = AckInfo(False, self.engine.round, update.seq)
                ticket = 0 if self._store is None else self._store.last_ticket
        return ack, ticket

    def durable(self, ticket: int) -> bool:
        """Whether log record `ticket` is on disk (lock-free; always, without storage)."""
        return self._store is None or self._store.done(ticket)

    def settle(self, ticket: int) -> None:
        """Wait, without the lock, until log record `ticket` is on disk; then serve a round
        whose close record now is. Rejected (UNAVAILABLE) when the log failed."""
        if self._store is None:
            return
        try:
            self._store.wait(ticket)
        except OSError as exc:
            with self._lock:
                self._fail(exc)
            raise Rejected(Refusal.UNAVAILABLE, "the server's storage failed") from None
        with self._lock:
            pending = self._unpublished
            if pending is not None and self._store.done(pending[0]):
                self._published = max(self._published, pending[1])
                self._unpublished = None
                self._notify()

    def model(self, round: int, known_round: int | None) -> DenseModel | None:
        """x_r once r ≥ round and r > known_round (the final model once finished); None while
        no such round exists. UNAVAILABLE once the server shuts down."""
        with self._lock:
            r = self._ready_round(round, known_round)
            return None if r is None else self._snapshot(r, with_aggregate=False)

    def downlink(self, round: int, known_round: int | None, has_aggregate: bool) -> Downlink | None:
        """Like `model`, but as the cheapest answer that keeps the caller exact: the change of ĝ
        when the caller holds x and ĝ of round r − 1 and that round recorded one; otherwise x_r
        densely, with ĝ_r while deltas are being produced (so the caller can take the next)."""
        with self._lock:
            r = self._ready_round(round, known_round)
            if r is None:
                return None
            delta = self.engine.last_delta
            if delta is not None and delta.round == r:
                if has_aggregate and known_round == r - 1:
                    return delta  # immutable: the engine makes new tensors every round
                return self._snapshot(r, with_aggregate=True)
            return self._snapshot(r, with_aggregate=False)

    def _snapshot(self, round: int, *, with_aggregate: bool) -> DenseModel:
        """x_r (with ĝ_r) as one immutable copy per round shared by every caller, so that the
        reply is copied and serialized once per round, not once per worker (see
        byzps.server.broadcast). Called under the lock with round == engine.round."""
        key = (round, with_aggregate)
        snapshot = self._snapshots.get(key)
        if snapshot is None:
            aggregate = self.engine.last_aggregate.clone() if with_aggregate else None
            snapshot = DenseModel(round, self.engine.x.clone(), aggregate)
            self._snapshots[key] = snapshot
        return snapshot

    def _ready_round(self, round: int, known_round: int | None) -> int | None:
        """The round r to serve (see `model`), or None when it has not closed yet."""
        self._check_serving()
        r = self.engine.round
        if r > self._published:
            return None  # its close record is not on disk yet
        ready = r >= round and (known_round is None or r > known_round)
        return r if ready or self._phase is Phase.FINISHED else None

    def account(self, bytes_in: int = 0, bytes_out: int = 0) -> None:
        """Count request and reply bytes. Lock-free on purpose: only the servicer's event-loop
        thread calls it, and it must never wait behind an aggregation holding the lock."""
        self._bytes_in += bytes_in
        self._bytes_out += bytes_out

    def status(self) -> StatusInfo:
        with self._lock:
            workers = [
                WorkerStatus(row, info.last_seen, self._ledger.last(row), info.last_round)
                for row, info in sorted(self._workers.items())
            ]
            return StatusInfo(
                self.engine.round,
                self.rounds,
                self._phase,
                self.num_workers,
                workers,
                self._bytes_in,
                self._bytes_out,
                self.engine.suspicion.report(),
            )

    @property
    def num_registered(self) -> int:
        """Worker ids registered so far (read without the lock, for the metrics endpoint)."""
        return len(self._workers)

    @property
    def traffic(self) -> tuple[int, int]:
        """(request bytes, reply bytes) counted by `account`, read without the lock."""
        return self._bytes_in, self._bytes_out

    @property
    def bytes_uplink(self) -> float:
        """Payload bytes per worker so far (on a shard, of all shards as of the last close)."""
        total = self._bytes_total if self._shards is None else self._cluster_bytes
        return uplink_per_worker(total, self.num_workers)

    # --- state transitions (caller holds the lock) ----------------------------------------

    def _notify(self) -> None:
        for listener in self._listeners:
            listener()

    def _check_serving(self) -> None:
        if self.failure is not None or self._stopping:
            raise Rejected(Refusal.UNAVAILABLE, "the server is shutting down")

    def _touch(self, row: int) -> WorkerInfo:
        info = self._workers.get(row)
        if info is None:
            info = self._workers[row] = WorkerInfo(time.time())
        else:
            info.last_seen = time.time()
        return info

    def _accept(self, update: Update) -> None:
        """Apply an update that passed the seq and round checks: the door's state check, then
        absorb, then commit its seq — the one path of live pushes and WAL replay."""
        self.door.admit(self.engine.rule, update)
        vec = update.vector
        seeds = None if vec.seed is None else (vec.seed,)
        batch = SparseBatch(vec.indices[None], vec.values[None], vec.dim, seeds)
        self.engine.absorb(torch.tensor([update.row], dtype=torch.long), batch)
        self._ledger.commit(update.row, update.seq)
        self._touch(update.row).last_round = update.round
        self._pushed.add(update.row)
        self._bytes_total += update.wire_bytes

    def _log(self, record: Record) -> int:
        """Queue `record` for the log; its ticket (0 without storage)."""
        if self._store is None:
            return 0
        try:
            return self._store.append(record)
        except OSError as exc:
            self._fail(exc)
            raise Rejected(Refusal.UNAVAILABLE, "the server's storage failed") from None

    def _fail(self, exc: Exception) -> None:
        # The engine ran ahead of the disk (or a close broke off half-way): acknowledging
        # anything more would lose updates.
        if self.failure is None:
            self.failure = exc
            log.error("stopping: %s", exc)
        self._notify()

    def _maybe_open(self, *, close: bool = True) -> None:
        """Open the first round once every worker registered or the startup timeout passed, and
        a resumed run's round at once if the run had opened its first one; then close it at
        once if it is already due (unless `close` is False)."""
        if self._phase is not Phase.STARTING:
            return
        registered = len(self._workers) >= self.num_workers
        if self._run_opened or registered or self._clock() >= self._startup_deadline:
            self._open()
            if close:
                self._maybe_close()

    def _open(self) -> None:
        """STARTING → RUNNING; the run's first open is recorded with the rows registered then,
        so that a resume does not wait for registrations again (`start`)."""
        resumed = self._run_opened
        self._phase = Phase.RUNNING
        self._opened_at = self._clock()
        self._opened_wall = time.time()
        self._run_opened = True
        how = " (resumed: the run had opened its first round)" if resumed else ""
        log.info("round %d open with %d registered workers%s", self.round, len(self._workers), how)
        if resumed or self._store is None:
            return
        try:
            self._store.record_open({row: i.last_seen for row, i in self._workers.items()})
        except OSError as exc:  # a resume at round 0 then waits as a first start does
            log.error("could not record the open of round %d: %s", self.round, exc)

    def _maybe_close(self) -> None:
        if self._phase is not Phase.RUNNING or not self._pushed:
            return
        # Every pusher is registered (`_accept` registers it), so equal sizes mean everyone has
        # pushed: O(1) per push where a subset test cost O(n), O(n²) a round.
        everyone = len(self._pushed) >= len(self._workers)
        quorum = (
            len(self._pushed) >= self.settings.quorum
            and self._clock() - self._opened_at >= self.settings.round_deadline
        )
        if everyone or quorum:
            self._close()

    def _close(self, *, replaying: bool = False, sums: bytes = b"") -> None:
        """Aggregate and step (through the peers on a shard; from a logged close's `sums` when
        replaying one), then everything a closed round entails."""
        closing = self.engine.round
        began = time.perf_counter()
        if self._shards is None:
            self.engine.close_round()
        elif replaying:
            self._close_replayed_shard(sums)
        else:
            sums = self._close_shard(closing)
        aggregation = time.perf_counter() - began
        self._snapshots.clear()
        ticket = 0
        if not replaying:
            ticket = self._log(CloseRecord(closing, sums))
            if self._rounds_log is not None:
                now = time.time()
                self._rounds_log.record(closing, self._opened_wall, now, len(self._pushed))
            opened = self._clock() - self._opened_at
            self._observer.round_closed(opened, aggregation, self.engine.x)
        self._pushed.clear()
        self._opened_at = self._clock()
        self._opened_wall = time.time()
        if self.engine.round >= self.rounds:
            self._finish()
        else:
            every = self.settings.checkpoint_every
            if (
                not replaying
                and self._store is not None
                and every > 0
                and self.engine.round % every == 0
            ):
                self._checkpoint(background=True)
            self._record_metrics()
        if ticket and self._store is not None:
            self._unpublished = (ticket, self.engine.round)  # served once `settle` sees it
        else:
            self._published = self.engine.round
            self._notify()

    def _close_shard(self, closing: int) -> bytes:
        """One shard's close of round `closing`: the barrier, then the engine's close with every
        reduction summed over the shards; returns the sums received, for the close record.

        The log is made durable first: the parts published here must be the ones a restart of
        this shard would publish again, and the peers use them at once. A peer that gives no
        part in time stops this shard (the close broke off with the engine half-way); a resume
        from its log finishes the round with the peers' parts, which they keep."""
        assert self._shards is not None
        collective = self._shards.collective
        try:
            if self._store is not None:
                self._store.wait(self._store.last_ticket)
            collective.begin(closing)
            self._close_through(collective)
        except (PeerError, OSError) as exc:
            self._fail(exc)
            raise Rejected(Refusal.UNAVAILABLE, "a peer shard or the log failed") from None
        return pack_arrays(collective.sums)

    def _close_through(self, collective: Collective) -> None:
        """The engine's close as one shard of `collective`, live or replayed: first the barrier,
        the all-sum of pushes and payload bytes (every shard is closing this round: a peer still
        open follows, `_follow_peers`), then every reduction of the aggregation."""
        with sharded(collective):
            summed = all_sum(np.array([float(len(self._pushed)), float(self._bytes_total)]))
            self._cluster_bytes = int(summed[1])
            self.engine.close_round()

    def _close_replayed_shard(self, sums: bytes) -> None:
        """A logged close of a shard, redone from the sums it received."""
        assert self._shards is not None
        collective = self._shards.replay(self.engine.round, sums)
        self._close_through(collective)
        if not collective.exhausted:
            raise ValueError("the logged close received more sums than its replay used")

    def _finish(self, *, starting: bool = False) -> None:
        """The run's results; a shard that starts on a finished run writes them once it listens
        and its peers can be reached (`MetricsRecorder.finish`'s `queued`)."""
        self._phase = Phase.FINISHED
        self._record_metrics()
        if self._metrics is not None:
            self._metrics.finish(
                self.engine.round,
                self.engine.x,
                self.bytes_uplink,
                self.engine.suspicion.report(),
                queued=starting and self._shards is not None,
            )
        log.info("run finished at round %d", self.engine.round)

    @property
    def results_missing(self) -> bool:
        """The run finished here but its results could not be written (rank 0 only)."""
        return self.finished and self._metrics is not None and self._metrics.results_missing

    def _publish_slice(self) -> None:
        """On a shard, its slice of x when this round gets a metrics record: rank 0 evaluates
        the whole model, fetching every shard's slice."""
        if self._shards is not None and evaluation_due(self.config, self.engine.round):
            part = self.engine.x.detach().cpu().numpy().copy()
            self._shards.outbox.put(MODEL, self.engine.round, 0, part)

    def _record_metrics(self) -> None:
        self._publish_slice()
        if self._metrics is not None:
            self._metrics.record(
                self.engine.round, self.engine.x, self.bytes_uplink, self.engine.suspicion.report()
            )

    # --- persistence ----------------------------------------------------------------------

    def _replay(self, record: Record) -> None:
        """Redo one logged step exactly as it happened live."""
        if isinstance(record, CloseRecord):
            if record.round != self.engine.round:
                raise ValueError(f"log closes round {record.round} at round {self.engine.round}")
            self._close(replaying=True, sums=record.sums)
            return
        self._accept(self.door.replayed(record.row, record.round, record.seq, record.update))

    def state_dict(self) -> dict[str, Any]:
        with self._lock:
            return self._state_dict()

    def _state_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine.state_dict(),
            "ledger": self._ledger.state_dict(),
            "workers": {
                row: {"last_seen": i.last_seen, "last_round": i.last_round}
                for row, i in self._workers.items()
            },
            "pushed": sorted(self._pushed),
            "bytes_total": self._bytes_total,
            "cluster_bytes": self._cluster_bytes,
            "bytes_in": self._bytes_in,
            "bytes_out": self._bytes_out,
            "elapsed": 0.0 if self._metrics is None else self._metrics.elapsed,
            "rng": {"torch": torch.get_rng_state()},
        }

    def _load_state(self, state: dict[str, Any]) -> None:
        self.engine.load_state_dict(state["engine"])
        self._snapshots.clear()
        self._ledger.load_state_dict(state["ledger"])
        self._workers = {
            int(row): WorkerInfo(float(i["last_seen"]), int(i["last_round"]))
            for row, i in state["workers"].items()
        }
        self._pushed = {int(row) for row in state["pushed"]}
        self._bytes_total = int(state["bytes_total"])
        self._cluster_bytes = int(state.get("cluster_bytes", 0))
        self._bytes_in = int(state["bytes_in"])
        self._bytes_out = int(state["bytes_out"])
        torch.set_rng_state(state["rng"]["torch"])

    def _checkpoint(self, *, background: bool = False, flush: bool = True) -> None:
        """Checkpoint the state now; `background`: from a snapshot (state_dict clones every
        tensor) written by the store's thread while the rounds go on (skipped, with a log line,
        while the previous one is still being written: see CheckpointStore). `flush`: first wait
        for the metrics records queued so far."""
        assert self._store is not None
        round = self.engine.round
        if self._metrics is not None and flush:
            # The records of the rounds this checkpoint covers are written (the evaluation
            # thread is normally done with them long since): a resume from it re-evaluates only
            # the rounds it replays, so metrics.jsonl stays complete even after a kill -9.
            self._metrics.flush()
        try:
            if not background:
                path = self._store.checkpoint(self._state_dict(), round)
                log.info("checkpoint %s at round %d", path.name, round)
                return

            def done(path: Path | None, error: BaseException | None) -> None:
                if path is not None:
                    log.info("checkpoint %s at round %d", path.name, round)
                else:
                    log.error("checkpoint failed (the previous one stays valid): %s", error)

            if not self._store.checkpoint_in_background(self._state_dict(), round, done):
                log.info("checkpoint at round %d skipped: the previous one is being written", round)
        except OSError as exc:
            # The old generation is intact and its log still grows: keep serving.
            log.error("checkpoint failed (the previous one stays valid): %s", exc)
