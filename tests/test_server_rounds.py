"""Rounds over real gRPC with a hand-moved clock: when a round closes, what it computes, late
updates, long-polls, the end of the run, and a model large enough to need several chunks."""

from __future__ import annotations

import json
import threading
import time

import grpc
import pytest
import torch
from server_support import (
    SECRET,
    Client,
    InProcess,
    N,
    TaskShape,
    code_of,
    in_process,
    random_update,
    tiny_config,
)

from byzps.common.aggregators import build_aggregator
from byzps.common.codec import MAX_MESSAGE_BYTES, decode_model, decode_sparse
from byzps.common.config import RunConfig
from byzps.common.server_rules import build_server_rule
from byzps.common.sparse import SparseBatch
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.engine import RoundEngine, build_server_parts
from byzps.worker.client import ParameterServerClient, Pushed


def tiny(**kw: int) -> RunConfig:
    return tiny_config(**kw)


def everyone_registered(srv: InProcess) -> Client:
    """A client of `srv` with which all N workers registered."""
    client = Client(srv.address)
    for w in range(N):
        client.register(str(w))
    return client


def test_register_reply_describes_the_run() -> None:
    config = tiny()
    with in_process(config) as srv:
        client = Client(srv.address)
        reply = client.register("2", digest=config.digest())
        assert RunConfig.from_dict(json.loads(reply.config_json)) == config
        assert reply.config_digest == config.digest()
        assert reply.model.dim == 123 and reply.model.dtype == pb.VALUE_DTYPE_FLOAT32
        assert sum(t.numel for t in reply.model.tensors) == 123
        assert reply.compressor == pb.COMPRESSOR_TOPK and reply.k_max == 1
        assert reply.round == 0 and reply.last_seq == 0
        client.close()


def test_all_pushed_closes_at_once_and_matches_a_direct_engine() -> None:
    config = tiny()
    _, reference, _ = build_server_parts(config)
    gen = torch.Generator().manual_seed(0)
    with in_process(config) as srv:
        client = everyone_registered(srv)
        for r in range(3):
            for w in range(N):
                u = random_update(gen)
                ack = client.push(str(w), r, r + 1, u)
                assert ack.status == pb.ACK_STATUS_ACCEPTED
                vec = decode_sparse(u)
                reference.absorb(
                    torch.tensor([w]),
                    SparseBatch(vec.indices[None], vec.values[None], vec.dim),
                )
                assert ack.round == (r + 1 if w == N - 1 else r)
            reference.close_round()
            round, x = client.model(round=r + 1)
            assert round == r + 1
            assert torch.equal(x, reference.x)
        client.close()


def test_a_server_without_storage_passes_its_checkpoint_rounds() -> None:
    """No --out and no --checkpoint-dir: the periodic checkpoint is skipped, not an error (it
    used to fail the push that closed round checkpoint_every with INTERNAL)."""
    gen = torch.Generator().manual_seed(1)
    with in_process(tiny(), checkpoint_every=2) as srv:
        client = everyone_registered(srv)
        for r in range(3):
            for w in range(N):
                ack = client.push(str(w), r, r + 1, random_update(gen))
                assert ack.status == pb.ACK_STATUS_ACCEPTED
        assert client.model(round=3)[0] == 3
        client.close()


def test_silent_worker_closes_only_after_deadline_and_with_quorum() -> None:
    config = tiny()
    with in_process(config, quorum=4, deadline=5.0) as srv:
        client = everyone_registered(srv)
        gen = torch.Generator().manual_seed(1)
        for w in range(3):
            client.push(str(w), 0, 1, random_update(gen))
        srv.clock.now += 6  # past the deadline, but only 3 < quorum 4 pushed
        srv.coordinator.tick()
        assert srv.coordinator.round == 0
        client.push("3", 0, 1, random_update(gen))  # quorum reached after the deadline
        assert srv.coordinator.round == 1
        # round 1: four push, the deadline has not passed yet
        for w in range(4):
            client.push(str(w), 1, 2, random_update(gen))
        srv.clock.now += 4
        srv.coordinator.tick()
        assert srv.coordinator.round == 1
        srv.clock.now += 1.5
        srv.coordinator.tick()
        assert srv.coordinator.round == 2
        client.close()


def test_late_update_lands_on_its_worker_and_counts_for_the_current_round() -> None:
    config = tiny()
    with in_process(config, quorum=4, deadline=1.0) as srv:
        client = everyone_registered(srv)
        gen = torch.Generator().manual_seed(2)
        for w in range(4):
            client.push(str(w), 0, 1, random_update(gen))
        srv.clock.now += 2
        srv.coordinator.tick()
        assert srv.coordinator.round == 1
        g_before = srv.coordinator.state_dict()["engine"]["rule"]["g"].clone()
        late = random_update(gen)
        ack = client.push("4", 0, 1, late)  # computed at round 0, arrives in round 1
        assert ack.status == pb.ACK_STATUS_ACCEPTED and ack.round == 1
        g = srv.coordinator.state_dict()["engine"]["rule"]["g"]
        expected = g_before.clone()
        expected[4] += decode_sparse(late).to_dense()
        assert torch.equal(g, expected)
        assert srv.coordinator.state_dict()["pushed"] == [4]
        status = {w.worker_id: w for w in client.status(as_worker="0").workers}
        assert status["4"].last_round == 0 and status["4"].last_seq == 1
        client.close()


def test_a_silent_worker_cannot_bank_its_rounds_and_spend_them_in_one() -> None:
    """Worker 4 stays silent for rounds 0–2, then, in round 3, pushes claims for rounds 0, 1
    and 3. An honest worker has at most one late update per open round (the one it computed
    while the round closed), and sends it before its next: the first late claim is accepted,
    the second refused (FAILED_PRECONDITION, its state unchanged), the current one accepted.
    Before, every banked round was accepted: R + 1 absorbs and log records in one round."""
    config = tiny()
    with in_process(config, quorum=4, deadline=1.0) as srv:
        client = everyone_registered(srv)
        gen = torch.Generator().manual_seed(3)
        for round in range(3):
            for w in range(4):
                client.push(str(w), round, round + 1, random_update(gen))
            srv.clock.now += 2
            srv.coordinator.tick()
        assert srv.coordinator.round == 3
        assert client.push("4", 0, 1, random_update(gen)).status == pb.ACK_STATUS_ACCEPTED
        g_before = srv.coordinator.state_dict()["engine"]["rule"]["g"].clone()
        banked = lambda: client.push("4", 1, 2, random_update(gen))  # noqa: E731
        assert code_of(banked) == grpc.StatusCode.FAILED_PRECONDITION
        assert torch.equal(srv.coordinator.state_dict()["engine"]["rule"]["g"], g_before)
        assert client.push("4", 3, 2, random_update(gen)).status == pb.ACK_STATUS_ACCEPTED
        status = {w.worker_id: w for w in client.status(as_worker="0").workers}
        assert status["4"].last_round == 3 and status["4"].last_seq == 2
        client.close()


def test_round_zero_opens_at_the_startup_timeout() -> None:
    config = tiny()
    with in_process(config, startup=3.0, quorum=4) as srv:
        client = Client(srv.address)
        gen = torch.Generator().manual_seed(3)
        for w in range(2):
            client.register(str(w))
            client.push(str(w), 0, 1, random_update(gen))
        srv.coordinator.tick()
        assert srv.coordinator.round == 0  # not open yet: only 2 of 5 registered
        srv.clock.now += 3
        srv.coordinator.tick()  # opens with the 2 registered, both pushed: closes
        assert srv.coordinator.round == 1
        client.close()


def test_long_poll_wakes_on_close_and_ends_at_its_deadline() -> None:
    config = tiny()
    with in_process(config) as srv:
        client = everyone_registered(srv)
        code = code_of(lambda: client.chunks("0", round=1, wait=True, timeout=0.5))
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED
        got: dict[str, object] = {}

        def poll() -> None:
            got["model"] = client.model(known_round=0, wait=True, timeout=20)

        waiter = threading.Thread(target=poll)
        waiter.start()
        time.sleep(0.3)
        assert "model" not in got
        gen = torch.Generator().manual_seed(4)
        for w in range(N):
            client.push(str(w), 0, 1, random_update(gen))
        waiter.join(20)
        round, x = got["model"]  # type: ignore[misc]
        assert round == 1 and torch.equal(x, srv.coordinator.engine.x)
        client.close()


def test_after_the_last_round_the_final_model_is_served_and_pushes_refused() -> None:
    config = tiny(rounds=2, eval_every=1)
    with in_process(config) as srv:
        client = everyone_registered(srv)
        gen = torch.Generator().manual_seed(5)
        for r in range(2):
            for w in range(N):
                client.push(str(w), r, r + 1, random_update(gen))
        assert srv.coordinator.finished
        round, _ = client.model(known_round=2, wait=True, timeout=5)
        assert round == 2
        code = code_of(lambda: client.push("0", 2, 3, random_update(gen)))
        assert code == grpc.StatusCode.OUT_OF_RANGE
        # A worker whose last update arrives after the end is told so, and stops cleanly.
        worker = ParameterServerClient(srv.address, "1", SECRET)
        worker.register()
        assert worker.push(1, 3, random_update(gen)) is Pushed.RUN_FINISHED
        worker.close()
        client.close()


def test_a_large_model_streams_in_several_chunks_of_at_most_4_mib() -> None:
    config = tiny()
    d = 2_100_000
    x0 = torch.randn(d, generator=torch.Generator().manual_seed(6))
    engine = RoundEngine(
        x0, build_server_rule("state", N, d), build_aggregator("mean", 1), config.algorithm.lr
    )
    task = TaskShape(d, (1_000_000, 1_100_000))
    with in_process(config, task=task, engine=engine, max_nnz=lambda r: 1) as srv:
        client = Client(srv.address)
        assert client.register("0").model.dim == d
        chunks = client.chunks("0")
        assert len(chunks) >= 2
        assert all(c.ByteSize() <= MAX_MESSAGE_BYTES for c in chunks)
        round, x = decode_model(chunks, dim=d)
        assert round == 0 and torch.equal(x, x0)
        client.close()


@pytest.mark.parametrize("wait", [False, True])
def test_status_needs_no_token_and_counts_traffic(wait: bool) -> None:
    """Anonymous Status shows the run's progress; a credential adds every worker's line."""
    config = tiny()
    with in_process(config) as srv:
        client = Client(srv.address)
        client.register("3")
        client.chunks("3", wait=wait)
        anonymous = Client(srv.address, secret=None).status()
        assert (anonymous.round, anonymous.rounds, anonymous.phase) == (0, 20, "starting")
        assert (anonymous.num_workers, anonymous.registered, anonymous.finished) == (N, 1, False)
        assert not anonymous.workers
        assert anonymous.bytes_in > 0 and anonymous.bytes_out > 123 * 4
        wrong = Client(srv.address, secret=b"not the secret").status(as_worker="3")
        assert not wrong.workers and wrong.registered == 1
        status = client.status(as_worker="0")
        assert [w.worker_id for w in status.workers] == ["3"]
        assert status.workers[0].last_seen.seconds > 0
        client.close()
