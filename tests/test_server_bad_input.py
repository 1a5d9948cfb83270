"""Validation at the door over real gRPC: every malformed or unauthorised call gets its precise
status code, and the model, every per-worker state, the ledger and the write-ahead log stay
bit-identical."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import configs
import grpc
import pytest
import torch
from server_support import Client, F, InProcess, N, code_of, in_process, tiny_config, update

from byzps.common.config import RunConfig
from byzps.common.credentials import token_for
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.worker.byzantine import forge

C = grpc.StatusCode
K = 3  # k = 3 so that index order and duplicates can be tested within nnz ≤ k_max


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[InProcess, Client, Path]]:
    store = tmp_path_factory.mktemp("store")
    config = tiny_config(k=K)
    with in_process(config, store_dir=store) as srv:
        client = Client(srv.address)
        try:
            for w in range(N):
                client.register(str(w))
            # one accepted update, so a replay of seq 1 is a duplicate
            ack = client.push("0", 0, 1, update([1, 5, 9], [0.5, -1.0, 2.0]))
            assert ack.status == pb.ACK_STATUS_ACCEPTED and ack.last_seq == 1
            yield srv, client, store
        finally:
            client.close()


def snapshot(srv: InProcess, client: Client, store: Path) -> dict[str, Any]:
    state = srv.coordinator.state_dict()
    return {
        "model": client.model()[1],
        "engine": state["engine"],
        "ledger": state["ledger"],
        "pushed": state["pushed"],
        "bytes_total": state["bytes_total"],
        "round": srv.coordinator.round,
        "wal": b"".join(p.read_bytes() for p in sorted(store.glob("wal-*.log"))),
    }


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where  # bitwise for float tensors without NaN
    else:
        assert a == b, where


def nan_update() -> pb.SparseUpdate:
    return update([1, 2, 3], [0.0, math.nan, 1.0])


def truncated_values() -> pb.SparseUpdate:
    u = update([1, 2, 3], [1.0, 2.0, 3.0])
    u.values = u.values[:-1]
    return u


def truncated_indices() -> pb.SparseUpdate:
    u = update([1, 2, 3], [1.0, 2.0, 3.0])
    u.indices = u.indices[:-2]
    return u


def raw_indices(*idx: int) -> pb.SparseUpdate:
    u = update([1, 2, 3], [1.0, 2.0, 3.0])
    u.indices = b"".join(i.to_bytes(4, "little") for i in idx)
    return u


def padded() -> pb.SparseUpdate:
    u = update([1, 2, 3], [1.0, 2.0, 3.0])
    u.nnz = 3
    u.values = u.values + b"\0" * 10_000  # oversize before anything is decoded
    return u


def with_unknown_field(request: bytes, size: int) -> bytes:
    """`request` plus a length-delimited field 100 of `size` bytes that no message declares."""
    return request + forge.unknown_field(size, field=100)


def with_unknown_update_field(size: int) -> pb.SparseUpdate:
    """A well-formed update plus an unknown field of `size` bytes, within the size limit."""
    return pb.SparseUpdate.FromString(
        update([1], [1.0]).SerializeToString() + forge.unknown_field(size)
    )


def push_padded_outside_update(c: Client, size: int) -> Any:
    request = pb.PushUpdateRequest(worker_id="1", round=0, seq=1, update=update([1], [1.0]))
    raw = with_unknown_field(request.SerializeToString(), size)
    return c.channel.unary_unary("/byzps.v1.ParameterServer/PushUpdate")(
        raw, metadata=c.meta("1"), timeout=10
    )


Case = Callable[[Client], Any]
CASES: dict[str, tuple[Case, grpc.StatusCode]] = {
    "wrong dim": (lambda c: c.push("1", 0, 1, update([1], [1.0], dim=124)), C.INVALID_ARGUMENT),
    "nnz over k_max": (
        lambda c: c.push("1", 0, 1, update([1, 2, 3, 4], [1.0] * 4)),
        C.INVALID_ARGUMENT,
    ),
    "unsorted indices": (lambda c: c.push("1", 0, 1, raw_indices(5, 2, 9)), C.INVALID_ARGUMENT),
    "duplicate indices": (lambda c: c.push("1", 0, 1, raw_indices(2, 2, 9)), C.INVALID_ARGUMENT),
    "index out of range": (
        lambda c: c.push("1", 0, 1, raw_indices(1, 2, 123)),
        C.INVALID_ARGUMENT,
    ),
    "NaN value": (lambda c: c.push("1", 0, 1, nan_update()), C.INVALID_ARGUMENT),
    "Inf value": (
        lambda c: c.push("1", 0, 1, update([1, 2, 3], [0.0, math.inf, 1.0])),
        C.INVALID_ARGUMENT,
    ),
    "truncated values": (lambda c: c.push("1", 0, 1, truncated_values()), C.INVALID_ARGUMENT),
    "truncated indices": (lambda c: c.push("1", 0, 1, truncated_indices()), C.INVALID_ARGUMENT),
    "unspecified dtype": (
        lambda c: c.push("1", 0, 1, update([1], [1.0], dtype=0)),
        C.INVALID_ARGUMENT,
    ),
    "other compressor": (
        lambda c: c.push("1", 0, 1, update([1], [1.0], compressor=pb.COMPRESSOR_IDENTITY)),
        C.INVALID_ARGUMENT,
    ),
    "missing update": (lambda c: c.push("1", 0, 1, None), C.INVALID_ARGUMENT),
    "oversize update": (lambda c: c.push("1", 0, 1, padded()), C.RESOURCE_EXHAUSTED),
    # within the size limit, but kept by serialization: it would be logged and replayed
    "update padded with an unknown field": (
        lambda c: c.push("1", 0, 1, with_unknown_update_field(8)),
        C.INVALID_ARGUMENT,
    ),
    "request padded outside the update (a little)": (
        lambda c: push_padded_outside_update(c, 200),
        C.RESOURCE_EXHAUSTED,
    ),
    "request padded outside the update (3 MiB)": (
        lambda c: push_padded_outside_update(c, 3 << 20),
        C.RESOURCE_EXHAUSTED,
    ),
    "a second update claiming the same round": (
        lambda c: c.push("0", 0, 2, update([1], [1.0])),
        C.FAILED_PRECONDITION,
    ),
    "future round": (lambda c: c.push("1", 1, 1, update([1], [1.0])), C.FAILED_PRECONDITION),
    "seq gap": (lambda c: c.push("1", 0, 2, update([1], [1.0])), C.FAILED_PRECONDITION),
    "seq zero": (lambda c: c.push("1", 0, 0, update([1], [1.0])), C.INVALID_ARGUMENT),
    "unknown worker id": (lambda c: c.push(str(N), 0, 1, update([1], [1.0])), C.PERMISSION_DENIED),
    "non-decimal worker id": (
        lambda c: c.push("01", 0, 1, update([1], [1.0])),
        C.PERMISSION_DENIED,
    ),
    "huge worker id (larger than any legal request)": (
        lambda c: c.push("9" * 5000, 0, 1, update([1], [1.0])),
        C.RESOURCE_EXHAUSTED,
    ),
    "worker id past n": (
        lambda c: c.push("9999999999", 0, 1, update([1], [1.0])),
        C.PERMISSION_DENIED,
    ),
    "non-canonical worker id": (
        lambda c: c.push("01", 0, 1, update([1], [1.0])),
        C.PERMISSION_DENIED,
    ),
    "bad token": (
        lambda c: c.push("1", 0, 1, update([1], [1.0]), token=token_for(b"other", "1")),
        C.UNAUTHENTICATED,
    ),
    "token of another worker": (
        lambda c: c.push("1", 0, 1, update([1], [1.0]), token=token_for(c.secret, "0")),
        C.UNAUTHENTICATED,
    ),
    "missing token": (
        lambda c: c.stub.PushUpdate(
            pb.PushUpdateRequest(worker_id="1", round=0, seq=1, update=update([1], [1.0])),
            timeout=10,
        ),
        C.UNAUTHENTICATED,
    ),
    "garbage request bytes": (
        lambda c: c.channel.unary_unary("/byzps.v1.ParameterServer/PushUpdate")(
            b"\xff\xff\xff", metadata=c.meta("1"), timeout=10
        ),
        C.INVALID_ARGUMENT,
    ),
    # A Register's token is a field of its own: it is read only once the bytes parsed.
    "garbage register bytes": (
        lambda c: c.channel.unary_unary("/byzps.v1.ParameterServer/Register")(
            b"\xff\xff\xff", metadata=c.meta("1"), timeout=10
        ),
        C.INVALID_ARGUMENT,
    ),
    "register over its size limit": (
        lambda c: c.channel.unary_unary("/byzps.v1.ParameterServer/Register")(
            with_unknown_field(pb.RegisterRequest(worker_id="1").SerializeToString(), 4096),
            metadata=c.meta("1"),
            timeout=10,
        ),
        C.RESOURCE_EXHAUSTED,
    ),
    "register with another config digest": (
        lambda c: c.register("1", digest="0" * 64),
        C.FAILED_PRECONDITION,
    ),
    "register with bad token": (lambda c: c.register("1", token="00"), C.UNAUTHENTICATED),
    "model with bad token": (
        lambda c: c.stub.GetModel(
            pb.GetModelRequest(worker_id="1"), metadata=c.meta("1", token="x"), timeout=10
        ).next(),
        C.UNAUTHENTICATED,
    ),
    "model of a future round without wait": (
        lambda c: c.chunks("1", round=1),
        C.FAILED_PRECONDITION,
    ),
}


@pytest.mark.parametrize("name", list(CASES))
def test_refused_with_code_and_nothing_changes(
    served: tuple[InProcess, Client, Path], name: str
) -> None:
    call, expected = CASES[name]
    assert_refused_and_unchanged(served, call, expected)


def assert_refused_and_unchanged(
    served: tuple[InProcess, Client, Path], call: Callable[[Client], Any], expected: Any
) -> None:
    """`call` fails with status `expected` and leaves the server bit-identical."""
    srv, client, store = served
    before = snapshot(srv, client, store)
    assert code_of(lambda: call(client)) == expected
    assert_same(before, snapshot(srv, client, store))


def test_replayed_seq_is_a_duplicate_and_changes_nothing(
    served: tuple[InProcess, Client, Path],
) -> None:
    srv, client, store = served
    before = snapshot(srv, client, store)
    ack = client.push("0", 0, 1, update([4, 6, 8], [9.0, 9.0, 9.0]))
    assert ack.status == pb.ACK_STATUS_DUPLICATE
    assert ack.last_seq == 1 and ack.round == 0
    assert_same(before, snapshot(srv, client, store))


def test_the_server_still_accepts_good_updates_afterwards(
    served: tuple[InProcess, Client, Path],
) -> None:
    srv, client, _ = served
    g_before = srv.coordinator.state_dict()["engine"]["rule"]["g"].clone()
    ack = client.push("1", 0, 1, update([7], [2.5]))
    assert ack.status == pb.ACK_STATUS_ACCEPTED and ack.last_seq == 1
    g = srv.coordinator.state_dict()["engine"]["rule"]["g"]
    expected = g_before.clone()
    expected[1, 7] += 2.5
    assert torch.equal(g, expected)


def test_a_push_that_would_overflow_its_state_is_refused_and_the_run_goes_on() -> None:
    """Two finite pushes of 3e38 would make the sender's g_j +inf (float32): the second is
    refused at the door, its state stays finite, and so do every aggregate and the model."""
    big = float(torch.finfo(torch.float32).max)
    with in_process(tiny_config(k=K)) as srv:
        client = Client(srv.address)
        try:
            for w in range(N):
                client.register(str(w))
            for w in range(N):
                values = [big, -big, big] if w == 1 else [0.1, 0.2, 0.3]
                client.push(str(w), 0, 1, update([1, 2, 3], values))
            assert srv.coordinator.round == 1  # everyone pushed: the round closed
            state = srv.coordinator.state_dict()
            before = state["engine"]["rule"]["g"].clone()
            overflow = lambda: client.push("1", 1, 2, update([1, 2, 3], [big, 0.0, 0.0]))  # noqa: E731
            assert code_of(overflow) == C.INVALID_ARGUMENT
            state = srv.coordinator.state_dict()
            assert torch.equal(state["engine"]["rule"]["g"], before)
            assert state["ledger"]["last_seq"][1] == 1
            ack = client.push("1", 1, 2, update([1, 2, 3], [-big, big, 0.0]))  # back toward 0
            assert ack.status == pb.ACK_STATUS_ACCEPTED
            for w in (0, 2, 3, 4):
                client.push(str(w), 1, 2, update([1, 2, 3], [0.1, 0.2, 0.3]))
            assert srv.coordinator.round == 2
            assert torch.isfinite(srv.coordinator.engine.x).all()
            assert torch.isfinite(srv.coordinator.engine.rule.candidates).all()
        finally:
            client.close()


def permk_update(round: int, seed_round: int, worker: int = 1) -> pb.SparseUpdate:
    """Worker `worker`'s well-formed Perm-K update of a d = 123 run of seed 3, on the shared
    seed of `seed_round` (an honest worker's is its `round`'s)."""
    from byzps.common.codec import encode_update
    from byzps.common.compressors import build_compressor

    comp = build_compressor("permk", 123, num_workers=N)
    seeds = comp.row_seeds(3, [worker], seed_round)
    return encode_update(comp.compress(torch.randn(1, 123), seeds, [worker]).row(0), comp)


def test_a_permk_worker_cannot_choose_its_own_permutation() -> None:
    """Perm-K's blocks are disjoint because every worker of a round reads one shared
    permutation. An update that is exactly the sender's block under another seed (the next
    round's) is refused at the door and changes nothing; its own round's is accepted."""
    run = configs.small_config(seed=3, rounds=5, workers=N, byzantine=F)
    run["compressor"] = {"name": "permk"}
    with in_process(RunConfig.from_dict(run)) as srv:
        client = Client(srv.address)
        try:
            client.register("1")
            before = srv.coordinator.state_dict()
            refused = lambda: client.push("1", 0, 1, permk_update(0, seed_round=1))  # noqa: E731
            assert code_of(refused) == C.INVALID_ARGUMENT
            after = srv.coordinator.state_dict()
            assert torch.equal(after["engine"]["rule"]["g"], before["engine"]["rule"]["g"])
            assert after["ledger"] == before["ledger"]
            ack = client.push("1", 0, 1, permk_update(0, seed_round=0))
            assert ack.status == pb.ACK_STATUS_ACCEPTED
        finally:
            client.close()


# ----------------------------------------------------------------------------------------------
# Packed quantizer fields (issue 13) on this Top-k run: refused, nothing changes
# ----------------------------------------------------------------------------------------------


def quantized(name: str, **params: Any) -> pb.SparseUpdate:
    """A well-formed packed update of compressor `name` for the tiny run's d = 123."""
    from byzps.common.codec import encode_update
    from byzps.common.compressors import build_compressor

    comp = build_compressor(name, 123, num_workers=N, **params)
    seeds = comp.row_seeds(3, [1], 0) if comp.seeded else None
    return encode_update(comp.compress(torch.randn(1, 123), seeds, [1]).row(0), comp)


PACKED_CASES: dict[str, tuple[Callable[[], pb.SparseUpdate], grpc.StatusCode]] = {
    "packed codes on a Top-k update": (
        lambda: update([1], [1.0], packed=b"\x01"),
        C.INVALID_ARGUMENT,
    ),
    "a scale on a Top-k update": (lambda: update([1], [1.0], scale=2.0), C.INVALID_ARGUMENT),
    "levels on a Top-k update": (lambda: update([1], [1.0], levels=3), C.INVALID_ARGUMENT),
    "a QSGD update in a Top-k run": (lambda: quantized("qsgd", levels=2), C.INVALID_ARGUMENT),
    "a scaled-sign update in a Top-k run": (lambda: quantized("sign"), C.INVALID_ARGUMENT),
    # larger than 8·k_max + 64 bytes: refused on size, before it is parsed
    "a natural-compression update in a Top-k run": (
        lambda: quantized("natural"),
        C.RESOURCE_EXHAUSTED,
    ),
    "a Perm-K update in a Top-k run": (lambda: quantized("permk"), C.RESOURCE_EXHAUSTED),
}


@pytest.mark.parametrize("name", list(PACKED_CASES))
def test_packed_fields_are_refused_where_the_run_sends_pairs(
    served: tuple[InProcess, Client, Path], name: str
) -> None:
    build, expected = PACKED_CASES[name]
    assert_refused_and_unchanged(served, lambda c: c.push("1", 0, 1, build()), expected)
