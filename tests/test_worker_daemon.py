"""The honest worker loop without a network: a fake client backed by the real round engine.

Checks that a worker (w = 1) driven round by round reproduces the simulator's batched honest
estimator, and that the write-ahead checkpoint settles a pending update after a crash either way
(applied → commit, not applied → resend the same seq), or fails loudly when it cannot know g.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import grpc
import pytest
import torch

from byzps.common.codec import decode_sparse
from byzps.common.components import build_run_compressor, build_run_estimator, build_run_task
from byzps.common.config import RunConfig
from byzps.common.sparse import SparseBatch
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.engine import build_engine
from byzps.worker import checkpoint as ckpt
from byzps.worker.byzantine.daemon import resolve_attack
from byzps.worker.client import Pushed, ServerError
from byzps.worker.daemon import HonestWorker
from byzps.worker.session import AckLedger, Run, WorkerError, check_resumable

CONFIG = {
    "run": {"seed": 3, "rounds": 12, "eval_every": 12},
    "task": {"name": "a9a-logreg"},
    "cluster": {"workers": 1, "byzantine": 0},
    "algorithm": {"name": "byz-dm21", "lr": 0.5, "eta": 0.2},
    "compressor": {"name": "topk", "k": 3},
    "aggregator": {"name": "mean"},
}


class EngineClient:
    """A single-worker server in memory: absorbs each accepted update and closes the round."""

    def __init__(self, config: RunConfig, task) -> None:
        self.engine = build_engine(config, task)
        self.last_seq = 0
        self.lose_next_ack = False
        self.crash_before_push = False

    def get_model(self, round: int, known_round: int | None = None):
        return self.engine.round, self.engine.x.clone()

    def push(self, round: int, seq: int, update: bytes) -> Pushed:
        if self.crash_before_push:
            self.crash_before_push = False
            raise ConnectionError("crash before the update left the worker")
        if seq <= self.last_seq:
            return Pushed.DUPLICATE
        if seq != self.last_seq + 1:  # as the real server: a gap ends the call with a status
            raise ServerError("PushUpdate", grpc.StatusCode.FAILED_PRECONDITION, "seq gap")
        batch = SparseBatch.stack([decode_sparse(pb.SparseUpdate.FromString(update))])
        self.engine.absorb(torch.tensor([0]), batch)
        self.engine.close_round()
        self.last_seq = seq
        if self.lose_next_ack:
            self.lose_next_ack = False
            raise ConnectionError("crash after the server applied the update")
        return Pushed.ACCEPTED


def make_worker(tmp_path: Path | None) -> tuple[HonestWorker, EngineClient]:
    config = RunConfig.from_dict(CONFIG)
    task = build_run_task(config)
    estimator = build_run_estimator(config, task, build_run_compressor(config, task), [0])
    client = EngineClient(config, task)
    worker = HonestWorker(
        worker_id="0",
        client=client,  # type: ignore[arg-type]
        run_info=Run(config, task),
        estimator=estimator,
        oracle=task.oracle([0], config.run.seed),
        digest=config.digest(),
        checkpoint_dir=tmp_path,
    )
    return worker, client


def reference_params() -> torch.Tensor:
    worker, client = make_worker(None)
    worker.run()
    return client.engine.x


@pytest.mark.parametrize("applied", [True, False])
def test_a_crashed_worker_resumes_from_its_write_ahead_checkpoint(
    tmp_path: Path, applied: bool
) -> None:
    expected = reference_params()
    worker, client = make_worker(tmp_path)
    for _ in range(5):
        worker.step()
    # applied: the server applied round 5's update, the worker died before hearing so;
    # not applied: the worker died after its write-ahead save, before the push left.
    client.lose_next_ack, client.crash_before_push = applied, not applied
    with pytest.raises(ConnectionError):
        worker.step()
    saved = ckpt.load(tmp_path)
    assert saved is not None and saved.pending is not None and saved.pending.seq == 6

    restarted, _ = make_worker(tmp_path)
    restarted.client = client  # type: ignore[assignment]
    restarted.resume(saved, client.last_seq)
    restarted.run()
    assert client.last_seq == 12
    torch.testing.assert_close(client.engine.x, expected, rtol=0, atol=0)


def test_a_worker_whose_gradient_turned_nan_stops_before_it_saves_or_sends(
    tmp_path: Path,
) -> None:
    """A NaN gradient (an overflowed loss) makes the message NaN: the server would refuse it
    every round, so the worker stops with WorkerError (exit 2) naming the round, and nothing of
    that round is checkpointed or pushed."""
    worker, client = make_worker(tmp_path)
    original = worker.oracle.grad

    def grad(x: torch.Tensor, batch: object, out: torch.Tensor | None = None) -> torch.Tensor:
        g = original(x, batch, out)
        return g.fill_(math.nan) if client.engine.round >= 3 else g

    worker.oracle.grad = grad  # type: ignore[method-assign]
    for _ in range(3):
        worker.step()
    with pytest.raises(WorkerError, match=r"^round 3: the message holds non-finite values"):
        worker.step()
    assert client.last_seq == 3 and client.engine.round == 3
    saved = ckpt.load(tmp_path)
    assert saved is not None and (saved.pending is None or saved.pending.seq == 3)


def test_a_worker_without_its_state_refuses_to_diverge() -> None:
    with pytest.raises(WorkerError, match="cannot be rebuilt"):
        check_resumable("4", server_last_seq=7, my_last_seq=0)
    check_resumable("4", server_last_seq=0, my_last_seq=0)


def test_what_a_push_outcome_means() -> None:
    assert Pushed.ACCEPTED.applied and Pushed.DUPLICATE.applied
    assert not Pushed.RUN_FINISHED.applied  # the run ended first: nothing applied, go on


def test_omniscient_attacks_on_honest_statistics_are_refused_unless_forced() -> None:
    config = RunConfig.from_dict(
        {**CONFIG, "cluster": {"workers": 5, "byzantine": 1}, "attack": {"name": "alie"}}
    )
    with pytest.raises(WorkerError, match="force-cohort"):
        resolve_attack(config, None, force_cohort=False)
    assert resolve_attack(config, None, force_cohort=True).name == "alie"
    bitflip = RunConfig.from_dict({**CONFIG, "cluster": {"workers": 5, "byzantine": 1},
                                   "attack": {"name": "bf"}})  # fmt: skip
    assert resolve_attack(bitflip, None, force_cohort=False).name == "bf"


def test_the_ack_ledger_records_each_seq_once_and_survives_a_cut_line(tmp_path: Path) -> None:
    path = tmp_path / "ledger.jsonl"
    first = AckLedger(path)
    first.record("2", 1, 0, "ACCEPTED")
    first.record("2", 2, 1, "ACCEPTED")
    first.close()
    path.write_text(path.read_text() + '{"worker": "2", "se')  # killed mid-write
    second = AckLedger(path)
    second.record("2", 2, 1, "DUPLICATE")  # a restart settling seq 2 again
    second.record("2", 3, 2, "ACCEPTED")
    second.close()
    assert [json.loads(line)["seq"] for line in path.read_text().splitlines()] == [1, 2, 3]
