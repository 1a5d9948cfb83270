"""The worker's gRPC client against a scripted in-process server: tokens, retries with the same
seq, re-registration after an outage, long-poll re-issue, and the bounded retry budget."""

from __future__ import annotations

import hashlib
import hmac
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures

import grpc
import pytest
import torch

from byzps.common.codec import encode_model
from byzps.common.credentials import TOKEN_METADATA_KEY, token_for
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.proto.v1 import parameter_server_pb2_grpc as pb_grpc
from byzps.worker.client import (
    ParameterServerClient,
    Pushed,
    RetryPolicy,
    ServerError,
    ServerUnreachable,
)

SECRET = b"s3cret"
DIM = 7
FAST = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, give_up_after=5.0)


class Scripted(pb_grpc.ParameterServerServicer):
    """A tiny server whose failures are scripted per call."""

    def __init__(self) -> None:
        self.tokens: list[str] = []
        self.registers = 0
        self.pushes: list[pb.PushUpdateRequest] = []
        self.applied: set[int] = set()
        self.fail_push_after_apply = 0  # abort UNAVAILABLE after applying this many times
        self.poll_delays: list[float] = []
        self.x = torch.arange(DIM, dtype=torch.float32)
        self.refuse_register = False

    def _token(self, context: grpc.ServicerContext) -> None:
        self.tokens.append(dict(context.invocation_metadata()).get(TOKEN_METADATA_KEY, ""))

    def Register(self, request, context):
        self._token(context)
        if self.refuse_register:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, "not a worker of this run")
        self.registers += 1
        return pb.RegisterReply(
            model=pb.ModelSpec(dim=DIM, dtype=pb.VALUE_DTYPE_FLOAT32),
            round=0,
            last_seq=max(self.applied, default=0),
        )

    def GetModel(self, request, context) -> Iterator[pb.ModelChunk]:
        self._token(context)
        if self.poll_delays:
            time.sleep(self.poll_delays.pop(0))
        yield from encode_model(self.x, 3, max_chunk_bytes=64 + 8)  # 2 floats per chunk

    def PushUpdate(self, request, context):
        self._token(context)
        self.pushes.append(request)
        status = pb.ACK_STATUS_DUPLICATE if request.seq in self.applied else pb.ACK_STATUS_ACCEPTED
        self.applied.add(request.seq)
        if self.fail_push_after_apply:
            self.fail_push_after_apply -= 1
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection lost after apply")
        return pb.Ack(status=status, last_seq=request.seq)


@pytest.fixture
def served() -> Iterator[tuple[Scripted, str]]:
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_ParameterServerServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        yield servicer, f"127.0.0.1:{port}"
    finally:
        server.stop(grace=None)


def test_token_is_the_documented_hmac() -> None:
    expected = hmac.new(SECRET, b"worker:3", hashlib.sha256).hexdigest()
    assert token_for(SECRET, "3") == expected
    assert token_for(SECRET, "3") != token_for(SECRET, "4")


def test_every_call_carries_the_token_and_the_model_reassembles(served) -> None:
    servicer, address = served
    with ParameterServerClient(address, "2", SECRET, retry=FAST) as client:
        r, x = client.get_model(0)
    assert r == 3 and torch.equal(x, servicer.x)
    assert servicer.tokens and set(servicer.tokens) == {token_for(SECRET, "2")}


def test_a_lost_ack_is_retried_with_the_same_seq_and_bytes(served) -> None:
    servicer, address = served
    servicer.fail_push_after_apply = 2
    update = pb.SparseUpdate(dim=DIM, nnz=0, dtype=pb.VALUE_DTYPE_FLOAT32,
                             compressor=pb.COMPRESSOR_TOPK)  # fmt: skip
    with ParameterServerClient(address, "1", SECRET, retry=FAST) as client:
        client.register()
        pushed = client.push(0, 1, update)
    assert pushed is Pushed.DUPLICATE  # applied once, acknowledged on the 3rd try
    assert len(servicer.pushes) == 3
    assert {p.SerializeToString() for p in servicer.pushes} == {
        servicer.pushes[0].SerializeToString()
    }
    assert servicer.registers == 3  # re-registered before each retry after UNAVAILABLE


def test_an_expired_long_poll_is_reissued(served) -> None:
    servicer, address = served
    servicer.poll_delays = [0.6, 0.6]
    with ParameterServerClient(address, "0", None, poll_timeout=0.2, retry=FAST) as client:
        started = time.monotonic()
        r, _ = client.get_model(1)
    assert r == 3 and time.monotonic() - started >= 0.4


def test_an_absent_server_ends_in_server_unreachable() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # closed again at once: nothing listens there
    budget = RetryPolicy(initial_backoff=0.01, max_backoff=0.05, give_up_after=0.5)
    with ParameterServerClient(f"127.0.0.1:{port}", "0", None, retry=budget,
                               call_timeout=0.5) as client:  # fmt: skip
        started = time.monotonic()
        with pytest.raises(ServerUnreachable, match="unreachable"):
            client.register()
    assert time.monotonic() - started < 5


def test_a_server_that_comes_back_is_found() -> None:
    """The outage a server restart causes: calls fail UNAVAILABLE, then succeed on the same port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    servicer = Scripted()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ParameterServerServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    threading.Timer(0.7, server.start).start()
    try:
        with ParameterServerClient(f"127.0.0.1:{port}", "0", None, retry=FAST) as client:
            assert client.register().model.dim == DIM
    finally:
        server.stop(grace=None)


def test_a_refusal_is_not_retried(served) -> None:
    servicer, address = served
    servicer.refuse_register = True
    with (
        ParameterServerClient(address, "9", None, retry=FAST) as client,
        pytest.raises(ServerError, match="PERMISSION_DENIED"),
    ):
        client.register()


def test_backoff_grows_to_its_cap_with_jitter() -> None:
    policy = RetryPolicy(initial_backoff=0.1, max_backoff=1.0, multiplier=2.0, jitter=0.5)
    delays = policy.delays(random.Random(0))
    got = [next(delays) for _ in range(8)]
    caps = [0.1, 0.2, 0.4, 0.8, 1.0, 1.0, 1.0, 1.0]
    assert all(c / 2 <= d <= c for d, c in zip(got, caps, strict=True))
