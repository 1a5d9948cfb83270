"""Each worker's share of a live server (byzps.server.limits, byzps.server.service): one
worker's valid token cannot hold the server's capacity, stall it, or flood it.

Every test drives a real gRPC server on 127.0.0.1 with tight limits, lets one worker misbehave,
and checks what a bound promises: the offender's extra calls are refused at once
(RESOURCE_EXHAUSTED), held calls end by the server's own limits, and the other workers' calls
complete within an ordinary deadline while it happens. Nothing here measures speed (that is
benchmarks/bench_protocol_attacks.py); a deadline is only the line between "served" and "held".
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import grpc
import pytest
import torch
from server_support import (
    SECRET,
    Client,
    code_of,
    finished_code,
    in_process,
    random_update,
    tiny_config,
)

from byzps.common.config import RunConfig
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.proto.v1 import parameter_server_pb2_grpc as pb_grpc
from byzps.server.limits import Admission, Group, Limits
from byzps.server.validation import Refusal, Rejected

C = grpc.StatusCode
#: A deadline any served call meets by far on this machine, however loaded; a held one doesn't.
SERVED = 5.0


def long_polls(client: Client, worker: str, count: int, deadline: float) -> list[object]:
    """`count` GetModel(wait) calls for a round that will not come, all in flight at once (a
    streaming call starts when it is made)."""
    request = pb.GetModelRequest(worker_id=worker, round=10**6, wait=True)
    meta = client.meta(worker)
    return [client.stub.GetModel(request, metadata=meta, timeout=deadline) for _ in range(count)]


def others_are_served(client: Client) -> None:
    """Worker 0 registers, pushes and reads the model; anyone reads Status — each within
    SERVED seconds."""
    client.stub.Register(
        pb.RegisterRequest(worker_id="0"), metadata=client.meta("0"), timeout=SERVED
    )
    request = pb.PushUpdateRequest(worker_id="0", round=0, seq=1)
    request.update.CopyFrom(random_update(torch.Generator().manual_seed(0)))
    client.stub.PushUpdate(request, metadata=client.meta("0"), timeout=SERVED)
    list(
        client.stub.GetModel(
            pb.GetModelRequest(worker_id="0"), metadata=client.meta("0"), timeout=SERVED
        )
    )
    client.stub.Status(pb.StatusRequest(), timeout=SERVED)


def test_a_long_poll_flood_takes_only_its_share_and_others_are_served() -> None:
    limits = Limits(in_flight=4, max_poll_seconds=60.0)
    with in_process(tiny_config(), limits=limits) as srv:
        client = Client(srv.address)
        try:
            # 24: under the 32 streams one connection may hold (byzps.server.daemon).
            flood = long_polls(client, "1", 24, deadline=30.0)
            codes = [finished_code(call, 2.0) for call in flood]
            refused = [c for c in codes if c == C.RESOURCE_EXHAUSTED]
            held = [c for c in codes if c is None]
            assert len(held) == 4 and len(refused) == 20, codes  # its in-flight share
            others_are_served(client)
            assert srv.server.servicer.admission.refused["in_flight"] == 20
            for call in flood:
                call.cancel()  # type: ignore[attr-defined]
        finally:
            client.close()


def test_the_server_ends_a_long_poll_itself() -> None:
    limits = Limits(max_poll_seconds=0.3)
    with in_process(tiny_config(), limits=limits) as srv:
        client = Client(srv.address)
        try:
            started = time.monotonic()
            code = code_of(lambda: client.chunks("1", round=5, wait=True, timeout=60))
            assert code == C.DEADLINE_EXCEEDED
            assert time.monotonic() - started < 30  # the server's 0.3 s, not the client's 60 s
        finally:
            client.close()


def quadratic_config(dim: int) -> RunConfig:
    """A tiny run whose model streams as several 4 MiB chunks."""
    data = tiny_config().to_dict()
    data["task"] = {"name": "quadratic", "params": {"dim": dim}, "batch_size": 1}
    return RunConfig.from_dict(data)


def test_a_stalled_reader_is_cut_off_and_frees_its_slot() -> None:
    limits = Limits(in_flight=1, stall_seconds=0.5)
    with in_process(quadratic_config(3_000_000), limits=limits) as srv:
        # No flow-control window growth: the server's writes block once the first chunks fill it.
        options = [("grpc.http2.bdp_probe", 0)]
        with grpc.insecure_channel(srv.address, options=options) as channel:
            stub = pb_grpc.ParameterServerStub(channel)
            client = Client(srv.address)
            try:
                meta = client.meta("1")
                stream = stub.GetModel(pb.GetModelRequest(worker_id="1"), metadata=meta, timeout=60)
                next(stream)  # read one chunk, then stop reading
                time.sleep(2.0)  # well past stall_seconds
                code = finished_code(stream, SERVED)
                assert code == C.RESOURCE_EXHAUSTED
                # Its one slot is free again: a reader that reads gets the whole model.
                chunks = list(
                    stub.GetModel(pb.GetModelRequest(worker_id="1"), metadata=meta, timeout=60)
                )
                assert sum(len(c.data) for c in chunks) == 4 * 3_000_000
            finally:
                client.close()


def test_a_call_storm_is_refused_by_rate_and_other_workers_are_not() -> None:
    limits = Limits(per_second=1.0, burst=5.0, per_round=0.0)
    with in_process(tiny_config(), limits=limits) as srv:
        client = Client(srv.address)
        try:
            codes = [code_of(lambda: client.register("1")) for _ in range(20)]
            assert codes[:5] == [C.OK] * 5
            assert codes[5:].count(C.RESOURCE_EXHAUSTED) >= 14  # ≤ 1 refill in the meantime
            assert code_of(lambda: client.register("2")) == C.OK  # its own budget
            assert srv.server.servicer.admission.refused["rate"] >= 14
        finally:
            client.close()


def test_anonymous_status_shares_one_small_budget() -> None:
    limits = Limits(anonymous_per_second=2.0)
    with in_process(tiny_config(), limits=limits) as srv:
        anonymous = Client(srv.address, secret=None)
        client = Client(srv.address)
        try:
            codes = [code_of(anonymous.status) for _ in range(12)]
            assert C.RESOURCE_EXHAUSTED in codes and codes[0] == C.OK
            assert code_of(lambda: client.status(as_worker="0")) == C.OK  # a credential's own
        finally:
            anonymous.close()
            client.close()


def test_unauthenticated_calls_hold_nothing() -> None:
    with in_process(tiny_config()) as srv:
        intruder = Client(srv.address, secret=b"not the run's secret")
        try:
            started = time.monotonic()
            code = code_of(lambda: intruder.chunks("1", round=5, wait=True, timeout=30))
            assert code == C.UNAUTHENTICATED
            assert time.monotonic() - started < SERVED
        finally:
            intruder.close()


@pytest.fixture
def admission() -> Iterator[tuple[Admission, list[float]]]:
    now = [0.0]
    yield Admission(Limits(in_flight=2, per_second=1.0, burst=2.0, per_round=3.0), 3,
                    clock=lambda: now[0]), now  # fmt: skip


def test_admission_counts_slots_per_worker_and_group(
    admission: tuple[Admission, list[float]],
) -> None:
    adm, now = admission
    with adm.enter(0, Group.MODEL), adm.enter(0, Group.MODEL):
        with (
            pytest.raises(Rejected, match="2 GetModel calls in flight") as info,
            adm.enter(0, Group.MODEL),
        ):
            pass
        assert info.value.code == Refusal.RESOURCE_EXHAUSTED
        now[0] += 10
        with adm.enter(0, Group.PUSH), adm.enter(1, Group.MODEL):  # other group, other worker
            pass
    now[0] += 10
    with adm.enter(0, Group.MODEL):  # released on exit
        pass


def test_admission_refills_with_time_and_rounds(admission: tuple[Admission, list[float]]) -> None:
    adm, now = admission
    for _ in range(2):
        with adm.enter(2, Group.STATUS):
            pass
    with pytest.raises(Rejected, match="too fast"), adm.enter(2, Group.STATUS):
        pass
    adm.round_closed()  # +3, capped at the burst of 2
    for _ in range(2):
        with adm.enter(2, Group.STATUS):
            pass
    with pytest.raises(Rejected), adm.enter(2, Group.STATUS):
        pass
    now[0] += 1.0
    with adm.enter(2, Group.STATUS):
        pass


def test_tokens_of_the_secret_are_what_the_limits_key_on() -> None:
    """The operator's credential has its own budget (row n), apart from every worker's."""
    from byzps.common.credentials import OPERATOR, TOKEN_METADATA_KEY, token_for
    from byzps.server.auth import Authenticator

    auth = Authenticator(SECRET, 5)
    meta = [(TOKEN_METADATA_KEY, token_for(SECRET, OPERATOR))]
    assert auth.holder(meta) == 5
    assert auth.holder([(TOKEN_METADATA_KEY, token_for(SECRET, "3"))]) == 3
    assert auth.holder([(TOKEN_METADATA_KEY, "00")]) is None
    assert auth.holder([]) is None
    with pytest.raises(Rejected) as info:  # the operator's token is no worker's
        auth.check(meta, OPERATOR)
    assert info.value.code == Refusal.PERMISSION_DENIED


def test_a_long_worker_id_is_refused_with_its_own_code_and_a_short_message() -> None:
    """A refusal quotes the caller's worker id cut short: echoed whole, a 16 KB id made the
    status message exceed gRPC's header limit, and the client saw RESOURCE_EXHAUSTED (no retry
    hint) instead of why it was refused."""
    from byzps.common.credentials import TOKEN_METADATA_KEY, token_for
    from byzps.server.auth import Authenticator

    long_id = "7" * 16_000
    cases = [
        (Authenticator(SECRET, 5), [(TOKEN_METADATA_KEY, "00")], Refusal.UNAUTHENTICATED),
        (Authenticator(SECRET, 5), [(TOKEN_METADATA_KEY, token_for(SECRET, long_id))],
         Refusal.PERMISSION_DENIED),
        (Authenticator(None, 5), [], Refusal.PERMISSION_DENIED),
    ]  # fmt: skip
    for auth, meta, code in cases:
        with pytest.raises(Rejected) as info:
            auth.check(meta, long_id)
        assert info.value.code == code
        assert len(info.value.reason) < 200 and "16000 characters" in info.value.reason


def test_only_share_refusals_invite_a_retry() -> None:
    """Over its share, a caller is told when to come back (byzps-retry-after-ms); a request too
    large is RESOURCE_EXHAUSTED too but final, and the worker client raises it at once."""
    from server_support import update

    from byzps.common.codec import RETRY_AFTER_METADATA_KEY
    from byzps.worker.client import ParameterServerClient, RetryPolicy, ServerError, retry_after

    limits = Limits(per_second=1.0, burst=1.0, per_round=0.0)
    with in_process(tiny_config(k=1), limits=limits) as srv:
        client = Client(srv.address)
        try:
            client.register("1")
            with pytest.raises(grpc.RpcError) as share:
                client.register("1")
            assert share.value.code() == C.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert retry_after(share.value) == pytest.approx(1.0)
            keys = [k for k, _ in share.value.trailing_metadata()]  # type: ignore[attr-defined]
            assert RETRY_AFTER_METADATA_KEY in keys
            big = update([1, 2, 3], [1.0, 2.0, 3.0])  # nnz 3 > k_max 1, and too many bytes
            big.values = big.values + b"\0" * 1000
            with pytest.raises(grpc.RpcError) as size:
                client.push("2", 0, 1, big)
            assert size.value.code() == C.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert retry_after(size.value) is None
        finally:
            client.close()
        worker = ParameterServerClient(
            srv.address, "3", SECRET, retry=RetryPolicy(give_up_after=30.0)
        )
        try:
            worker.register()
            started = time.monotonic()
            with pytest.raises(ServerError, match="RESOURCE_EXHAUSTED"):
                worker.push(0, 1, big)
            assert time.monotonic() - started < SERVED  # final: not retried for 30 s
        finally:
            worker.close()


def test_health_watches_and_reflection_streams_take_only_the_anonymous_share() -> None:
    """Health and reflection need no credential, and their streams stay open as long as the
    caller likes. A flood of them holds at most `anonymous_streams` at once (the rest refused at
    once), each ends by the server's own bound, a reflection stream's requests are metered by
    the anonymous bucket, and a health Check and the workers are served meanwhile."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    limits = Limits(anonymous_streams=2, max_poll_seconds=2.0, anonymous_per_second=5.0)
    with in_process(tiny_config(k=1), limits=limits) as srv:
        client = Client(srv.address)
        try:
            health = health_pb2_grpc.HealthStub(client.channel)
            started = time.monotonic()
            held = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(2)]
            for stream in held:
                next(stream)  # the current status: the stream is open and holds its slot
            flood = [health.Watch(health_pb2.HealthCheckRequest(), timeout=30) for _ in range(6)]
            assert [code_of(lambda s=s: next(s)) for s in flood] == [C.RESOURCE_EXHAUSTED] * 6
            assert health.Check(health_pb2.HealthCheckRequest(), timeout=SERVED)
            others_are_served(client)
            for stream in held:  # ended by the server at max_poll_seconds, with OK
                assert list(stream) == []
                assert stream.code() == C.OK
            assert time.monotonic() - started < 2.0 + SERVED
            assert srv.server.servicer.admission.refused["anonymous_streams"] == 6

            reflect = reflection_pb2_grpc.ServerReflectionStub(client.channel)
            ask = reflection_pb2.ServerReflectionRequest(list_services="")
            replies = reflect.ServerReflectionInfo(iter([ask] * 40), timeout=30)
            answered = []
            with pytest.raises(grpc.RpcError) as info:
                for reply in replies:
                    answered.append(reply)
            assert info.value.code() == C.RESOURCE_EXHAUSTED
            assert 1 <= len(answered) <= 12  # the bucket's 2 × 5 tokens, and what refilled
            services = {s.name for s in answered[0].list_services_response.service}
            assert "byzps.v1.ParameterServer" in services
        finally:
            client.close()
