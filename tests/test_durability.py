"""Durability off the round's critical path (docs/durability.md): the log's group commit, the
background checkpoint and the evaluation thread keep "an acknowledged update is never lost, nor
applied twice" under every fsync policy, kill -9 included."""

from __future__ import annotations

import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch
from server_support import (
    SECRET,
    Client,
    N,
    build_coordinator,
    random_update,
    server_process,
    tiny_config,
    write_config,
)

import byzps.server.checkpoint as checkpoint_module
from byzps.common.codec import decode_sparse
from byzps.common.components import build_run_task
from byzps.common.config import RunConfig
from byzps.common.sparse import SparseBatch
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.checkpoint import CheckpointStore
from byzps.server.coordinator import Coordinator, Settings
from byzps.server.engine import build_server_parts
from byzps.server.results import MetricsRecorder
from byzps.server.wal import (
    CloseRecord,
    FsyncPolicy,
    LogWriter,
    UpdateRecord,
    WriteAheadLog,
    read_wal,
)

DIGEST = "d" * 64


def _records(count: int) -> list[UpdateRecord | CloseRecord]:
    out: list[UpdateRecord | CloseRecord] = []
    for i in range(count):
        out.append(UpdateRecord(i % 7, i + 1, i // 7, os.urandom(1 + i * 37 % 300)))
        if i % 7 == 6:
            out.append(CloseRecord(i // 7))
    return out


# --- the log writer ---------------------------------------------------------------------------


@pytest.mark.parametrize("policy", list(FsyncPolicy))
def test_group_commit_writes_every_record_in_order_before_its_ticket_returns(
    tmp_path: Path, policy: FsyncPolicy
) -> None:
    path = tmp_path / "wal.log"
    writer = LogWriter(WriteAheadLog.create(path, 0, DIGEST), policy)
    records = _records(200)
    tickets: list[int] = []
    lock = threading.Lock()

    def submit(chunk: list[UpdateRecord | CloseRecord]) -> None:
        for record in chunk:
            with lock:  # the coordinator's lock: the order of tickets is the order of records
                ticket = writer.submit(record)
                tickets.append(ticket)
            writer.wait(ticket)
            assert writer.done(ticket)

    with ThreadPoolExecutor(4) as pool:
        list(pool.map(submit, [records[i::4] for i in range(4)]))
    writer.close()
    assert sorted(tickets) == list(range(1, len(records) + 1))
    written = read_wal(path).records
    assert sorted(written, key=lambda r: repr(r)) == sorted(records, key=lambda r: repr(r))
    assert len(written) == len(records)


def test_rotation_puts_records_on_either_side_of_it_in_their_own_file(tmp_path: Path) -> None:
    first, second = tmp_path / "a.log", tmp_path / "b.log"
    writer = LogWriter(WriteAheadLog.create(first, 0, DIGEST), FsyncPolicy.GROUP)
    records = _records(30)
    for record in records[:10]:
        writer.submit(record)
    writer.rotate(lambda: WriteAheadLog.create(second, 1, DIGEST))
    for record in records[10:]:
        last = writer.submit(record)
    writer.wait(last)
    writer.close()
    assert read_wal(first).records == records[:10]
    assert read_wal(second).records == records[10:]


def test_a_failed_write_fails_every_waiter_and_every_later_submit(tmp_path: Path) -> None:
    wal = WriteAheadLog.create(tmp_path / "wal.log", 0, DIGEST)
    writer = LogWriter(wal, FsyncPolicy.NONE)
    os.close(wal._appender.fd)  # type: ignore[union-attr]  # the disk goes away under the writer
    ticket = writer.submit(CloseRecord(0))
    with pytest.raises(OSError):
        writer.wait(ticket)
    with pytest.raises(OSError):
        writer.submit(CloseRecord(1))
    with pytest.raises(OSError):
        writer.close()


# --- background checkpoints -------------------------------------------------------------------


def test_a_crash_during_a_background_checkpoint_recovers_every_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While checkpoint 1 is being written, the previous checkpoint plus both logs hold every
    record; once it is written, it plus the new log do — never a record twice."""
    store = CheckpointStore(tmp_path, DIGEST)
    store.checkpoint({"x": torch.zeros(3)}, 0)
    records = _records(20)
    for record in records[:10]:
        store.append(record)
    release, started = threading.Event(), threading.Event()
    save = checkpoint_module.save_atomic

    def slow_save(state: dict[str, Any], path: Path) -> None:
        started.set()
        assert release.wait(30)
        save(state, path)

    monkeypatch.setattr(checkpoint_module, "save_atomic", slow_save)
    outcome: list[Any] = []
    assert store.checkpoint_in_background(
        {"x": torch.ones(3)}, 1, lambda path, error: outcome.append((path, error))
    )
    assert started.wait(30)
    assert not store.checkpoint_in_background({"x": torch.ones(3)}, 2, lambda *a: None)  # skipped
    for record in records[10:]:
        last = store.append(record)
    store.wait(last)

    crashed = CheckpointStore(tmp_path, DIGEST).recover()  # a kill -9 now: what is on disk
    assert torch.equal(crashed.state["x"], torch.zeros(3))
    assert crashed.records == records
    crashed_store_wal = sorted(p.name for p in tmp_path.glob("wal-*.log"))
    assert crashed_store_wal == ["wal-000000.log", "wal-000001.log"]

    release.set()
    store.wait_background()
    assert outcome and outcome[0][1] is None and outcome[0][0].name == "ckpt-000001.pt"
    after = CheckpointStore(tmp_path, DIGEST).recover()
    assert torch.equal(after.state["x"], torch.ones(3))
    assert after.records == records[10:]
    store.close()


def _updates(r: int) -> dict[int, pb.SparseUpdate]:
    """Round r's update of every worker (the same on every call)."""
    return {w: random_update(torch.Generator().manual_seed(1000 * r + w)) for w in range(N)}


def _mirror(engine: Any, w: int, upd: pb.SparseUpdate) -> None:
    vec = decode_sparse(upd)
    engine.absorb(torch.tensor([w]), SparseBatch(vec.indices[None], vec.values[None], vec.dim))


def _push_round(client: Client, engine: Any, seqs: dict[int, int], r: int) -> None:
    """Every worker pushes its round-r update over gRPC (concurrently), mirrored on `engine`."""
    updates = _updates(r)

    def push(w: int) -> pb.Ack:
        return client.push(str(w), r, seqs[w] + 1, updates[w])

    with ThreadPoolExecutor(N) as pool:
        acks = list(pool.map(push, range(N)))
    assert all(a.status == pb.ACK_STATUS_ACCEPTED for a in acks)
    for w in range(N):
        seqs[w] += 1
        _mirror(engine, w, updates[w])
    engine.close_round()


def _coordinator(
    config: RunConfig,
    store: CheckpointStore | None,
    metrics: MetricsRecorder | None = None,
    checkpoint_every: int = 2,
) -> Coordinator:
    settings = Settings(N, 60.0, 60.0, checkpoint_every)
    return build_coordinator(config, settings, store=store, metrics=metrics)


def _drive(coordinator: Coordinator, rounds: range) -> None:
    """Every worker pushes its update of each round straight into the coordinator."""
    for r in rounds:
        for w, upd in _updates(r).items():
            seq = coordinator.status().workers[w].last_seq + 1
            coordinator.push(coordinator.door.receive(w, r, seq, upd))


def test_a_background_checkpoint_loads_and_resumes_to_the_same_state(tmp_path: Path) -> None:
    config = tiny_config(rounds=20)
    live = _coordinator(config, CheckpointStore(tmp_path, config.digest()))
    live.start(None)
    for w in range(N):
        live.register(w)
    _drive(live, range(5))  # background checkpoints at rounds 2 and 4, round 4 logged after
    assert live._store is not None
    live._store.wait_background()
    assert sorted(p.name for p in tmp_path.glob("ckpt-*.pt"))[-1] == "ckpt-000002.pt"
    x_live = live.engine.x.clone()
    seqs_live = [w.last_seq for w in live.status().workers]
    live._store.close()  # what a kill -9 leaves: no final checkpoint

    store = CheckpointStore(tmp_path, config.digest())
    recovered = store.recover()
    assert recovered.generation == 2 and recovered.state is not None
    assert recovered.state["engine"]["round"] == 4
    assert len(recovered.records) == N + 1  # round 4's updates and its close
    resumed = _coordinator(config, store)
    resumed.start(recovered)
    assert resumed.round == 5 and torch.equal(resumed.engine.x, x_live)
    for w in range(N):
        assert resumed.register(w) == (5, seqs_live[w])
    _drive(resumed, range(5, 7))
    uninterrupted = _fresh(config)
    _drive(uninterrupted, range(7))
    assert torch.equal(resumed.engine.x, uninterrupted.engine.x)
    resumed.close(checkpoint=False)


def _fresh(config: RunConfig) -> Coordinator:
    """The uninterrupted run without storage, for comparison."""
    coordinator = _coordinator(config, None)
    coordinator.start(None)
    for w in range(N):
        coordinator.register(w)
    return coordinator


# --- kill -9 under every fsync policy ---------------------------------------------------------


@pytest.mark.parametrize("policy", [p.value for p in FsyncPolicy])
def test_kill_9_mid_push_loses_no_acknowledged_update_and_applies_none_twice(
    tmp_path: Path, policy: str
) -> None:
    """Workers push concurrently (so group commits hold several records) with a background
    checkpoint every round; the server is killed while a round's pushes are in flight. After
    --resume each worker's last seq is its last acknowledged one or the one in flight, its
    retry of that one is accepted once, and the model equals the one every update applied once
    gives."""
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET + b"\n")
    config = write_config(tmp_path, rounds=50, eval_every=1)
    args = ("--checkpoint-dir", str(tmp_path / "ckpt"), "--checkpoint-every", "1")
    args += ("--round-deadline", "60", "--wal-fsync", policy, "--out", str(tmp_path / "out"))
    _, mirror, _ = build_server_parts(RunConfig.load(config))
    seqs = dict.fromkeys(range(N), 0)
    kill_round = 6
    updates = _updates(kill_round)
    acked: dict[int, bool] = {}
    with server_process(config, *args, secret_file=secret, startup=120) as srv:
        client = Client(srv.address)
        for w in range(N):
            client.register(str(w))
        for r in range(kill_round):
            _push_round(client, mirror, seqs, r)

        def push(w: int) -> None:
            try:
                ack = client.push(str(w), kill_round, seqs[w] + 1, updates[w])
                acked[w] = ack.status == pb.ACK_STATUS_ACCEPTED
            except grpc.RpcError:
                acked[w] = False

        threads = [threading.Thread(target=push, args=(w,)) for w in range(N - 1)]
        for t in threads:
            t.start()
        time.sleep(0.005 * (1 + list(FsyncPolicy).index(FsyncPolicy(policy))))
        srv.proc.kill()  # SIGKILL while pushes (and a background checkpoint) may be in flight
        srv.proc.wait(10)
        for t in threads:
            t.join(30)
        client.close()
    with server_process(config, *args, "--resume", secret_file=secret, startup=120) as srv:
        client = Client(srv.address)
        for w in range(N):
            last = client.register(str(w)).last_seq
            if acked.get(w):
                assert last == seqs[w] + 1, f"worker {w}: an acknowledged update was lost"
            else:
                assert last in (seqs[w], seqs[w] + 1), f"worker {w}: seq {last}"
        for w in range(N):  # every worker retries (or makes) its round-6 push: once each
            ack = client.push(str(w), kill_round, seqs[w] + 1, updates[w])
            assert ack.status in (pb.ACK_STATUS_ACCEPTED, pb.ACK_STATUS_DUPLICATE)
            if acked.get(w):
                assert ack.status == pb.ACK_STATUS_DUPLICATE
            _mirror(mirror, w, updates[w])
        mirror.close_round()
        round, x = client.model(round=kill_round + 1)
        assert round == kill_round + 1 and torch.equal(x, mirror.x)
        client.close()
        assert srv.stop() == 0
    rounds = [json.loads(line)["round"] for line in (tmp_path / "out" / "metrics.jsonl").open()]
    assert rounds == list(range(kill_round + 2)), "metrics.jsonl: every due round once, in order"


# --- evaluation beside the round --------------------------------------------------------------


class _SlowTask:
    """A task whose evaluation takes a while and records the thread it ran on."""

    device = torch.device("cpu")  # where `evaluate` wants x (Task.device)

    def __init__(self) -> None:
        self.threads: set[str] = set()

    def evaluate(self, x: torch.Tensor) -> dict[str, float]:
        self.threads.add(threading.current_thread().name)
        time.sleep(0.1)
        return {"train_loss": float(x.sum())}


def test_evaluation_runs_beside_the_caller_on_a_snapshot_and_keeps_the_file_ordered(
    tmp_path: Path,
) -> None:
    config = tiny_config(rounds=12, eval_every=2)
    task = _SlowTask()
    recorder = MetricsRecorder(tmp_path, config, task, resume=False)  # type: ignore[arg-type]
    seen: list[int] = []
    recorder.on_record = lambda record: seen.append(record["round"])
    x = torch.zeros(4)
    began = time.perf_counter()
    for r in range(12):
        x += 1  # moves on at once: the records must hold the values of their own rounds
        recorder.record(r, x, 0.0)
        recorder.record(r, x, 0.0)  # once only
    assert time.perf_counter() - began < 0.3  # the 6 evaluations (0.6 s) did not run here
    x += 1
    recorder.record(12, x, 0.0)  # the last round, as the coordinator's _finish does
    recorder.finish(12, x, 0.0)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").open()]
    assert [r["round"] for r in records] == [0, 2, 4, 6, 8, 10, 12] == seen
    expected = [4.0 * (r + 1) for r in (0, 2, 4, 6, 8, 10, 12)]
    assert [r["train_loss"] for r in records] == expected
    assert threading.current_thread().name not in task.threads
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["final"]["round"] == 12 and summary["final"]["train_loss"] == 52.0
    recorder.close()


def test_a_finished_run_has_every_due_record_and_the_final_one_in_its_summary(
    tmp_path: Path,
) -> None:
    config = tiny_config(rounds=7, eval_every=2)
    out = tmp_path / "out"
    metrics = MetricsRecorder(out, config, build_run_task(config), resume=False)
    coordinator = _coordinator(config, CheckpointStore(tmp_path / "ckpt", config.digest()), metrics)
    coordinator.start(None)
    for w in range(N):
        coordinator.register(w)
    _drive(coordinator, range(7))
    assert coordinator.finished
    summary = json.loads((out / "summary.json").read_text())  # written before the last Ack
    assert summary["final"]["round"] == 7
    coordinator.close()
    records = [json.loads(line) for line in (out / "metrics.jsonl").open()]
    assert [r["round"] for r in records] == [0, 2, 4, 6, 7]
    assert records[-1] == summary["final"]
