"""Validation at the door: each malformed update gets the right gRPC code and reason; SeqLedger."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch

from byzps.common.codec import encode_sparse
from byzps.common.compressors import randk_indices
from byzps.common.server_rules import build_server_rule
from byzps.common.sparse import INDEX_DTYPE, SparseBatch, SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.validation import (
    Door,
    Refusal,
    Rejected,
    SeqDecision,
    SeqLedger,
    Update,
    check_round,
    max_update_bytes,
    validate_update,
)

DIM, K = 1000, 10
INVALID = Refusal.INVALID_ARGUMENT


def topk_update(
    indices: list[int] | None = None, values: list[float] | None = None
) -> pb.SparseUpdate:
    indices = list(range(0, 100, 10)) if indices is None else indices
    values = [float(i) + 0.5 for i in range(len(indices))] if values is None else values
    vec = SparseVector(torch.tensor(indices, dtype=INDEX_DTYPE), torch.tensor(values), DIM)
    return encode_sparse(vec, compressor="topk")


def randk_update(seed: int = 3, k: int = K) -> pb.SparseUpdate:
    vec = SparseVector(randk_indices(DIM, k, seed), torch.ones(k), DIM, seed)
    return encode_sparse(vec, compressor="randk")


def changed(msg: pb.SparseUpdate, **fields: object) -> pb.SparseUpdate:
    out = pb.SparseUpdate()
    out.CopyFrom(msg)
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def without_seed(msg: pb.SparseUpdate) -> pb.SparseUpdate:
    msg.ClearField("seed")
    return msg


def assert_rejected(msg: pb.SparseUpdate, code: Refusal, match: str, **kw: object) -> None:
    kw = {"dim": DIM, "k_max": K, **kw}
    with pytest.raises(Rejected, match=match) as info:
        validate_update(msg, **kw)  # type: ignore[arg-type]
    assert info.value.code == code


def test_valid_updates_pass() -> None:
    vec = validate_update(topk_update(), dim=DIM, k_max=K, compressor="topk")
    assert vec.nnz == K and vec.values.dtype == torch.float32
    vec.validate()
    vec = validate_update(randk_update(), dim=DIM, k_max=K, compressor="randk")
    assert vec.seed == 3


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (changed(topk_update(), dim=DIM + 1), r"dim 1001 does not match the model's 1000"),
        (topk_update(list(range(K + 1))), r"nnz 11 exceeds k_max 10"),
        (topk_update([5, 3]), r"indices\[1\] = 3 is below"),
        (topk_update([5, 5]), r"indices\[1\] = 5 repeats"),
        (topk_update([5, DIM]), r"indices\[1\] = 1000 is outside \[0, 1000\)"),
        (topk_update([5, 6], [1.0, float("nan")]), r"values\[1\] = nan is not finite"),
        (topk_update([5, 6], [float("inf"), 1.0]), r"values\[0\] = inf is not finite"),
        (changed(topk_update(), values=topk_update().values[:-2]), r"values: 38 bytes"),
        (changed(topk_update(), indices=topk_update().indices[:-4]), r"indices: 36 bytes"),
        (changed(topk_update(), compressor=pb.COMPRESSOR_UNSPECIFIED), r"COMPRESSOR_UNSPECIFIED"),
        (changed(topk_update(), dtype=pb.VALUE_DTYPE_UNSPECIFIED), r"VALUE_DTYPE_UNSPECIFIED"),
        (changed(randk_update(), seed=4), r"not the Rand-k selection of seed 4"),
        (changed(randk_update(), indices=topk_update().indices), r"not the Rand-k selection"),
        (without_seed(randk_update()), r"Rand-k update without a seed"),
        (randk_update(k=K - 1), r"Rand-k update with nnz 9, expected k = 10"),
    ],
    ids=[
        "wrong-dim",
        "nnz-over-k_max",
        "unsorted",
        "duplicate",
        "out-of-range",
        "nan",
        "inf",
        "truncated-values",
        "truncated-indices",
        "unspecified-compressor",
        "unspecified-dtype",
        "wrong-randk-seed",
        "randk-foreign-indices",
        "randk-missing-seed",
        "randk-short",
    ],
)
def test_malformed_update_is_invalid_argument(msg: pb.SparseUpdate, match: str) -> None:
    assert_rejected(msg, INVALID, match)


def test_compressor_must_match_the_run() -> None:
    assert_rejected(
        topk_update(), INVALID, r"compressor 'topk' but this run uses 'randk'", compressor="randk"
    )


def test_oversize_message_is_resource_exhausted() -> None:
    big_values = changed(topk_update(), values=b"\0" * (8 * K + 100))
    assert_rejected(big_values, Refusal.RESOURCE_EXHAUSTED, r"bytes, limit 144")
    # Unknown fields are kept by the parser; padding with one must not slip past the limit.
    padding = b"\xfa\x06" + bytes([200, 1]) + b"x" * 200  # field 111, length-delimited, 200 bytes
    padded = pb.SparseUpdate.FromString(topk_update().SerializeToString() + padding)
    assert_rejected(padded, Refusal.RESOURCE_EXHAUSTED, r"limit 144")
    assert_rejected(topk_update(), Refusal.RESOURCE_EXHAUSTED, r"limit 50", max_bytes=50)


def test_size_limit_fits_a_full_update() -> None:
    """The default limit must accept the largest honest update (k_max entries, seed, big dim)."""
    k = 1000
    dim = 2**31 - 1
    vec = SparseVector(
        torch.arange(dim - k, dim, dtype=INDEX_DTYPE), torch.ones(k), dim, seed=2**64 - 1
    )
    msg = encode_sparse(vec, compressor="topk")
    assert msg.ByteSize() <= max_update_bytes(k)
    assert validate_update(msg, dim=dim, k_max=k).nnz == k


def test_identity_dense_convention_passes() -> None:
    vec = SparseVector(torch.arange(DIM, dtype=INDEX_DTYPE), torch.ones(DIM), DIM)
    msg = encode_sparse(vec, compressor="identity")
    assert msg.indices == b""
    out = validate_update(msg, dim=DIM, k_max=DIM, compressor="identity")
    assert torch.equal(out.indices, vec.indices)


def test_rejected_carries_code_and_reason() -> None:
    err = Rejected(Refusal.PERMISSION_DENIED, "not yours")
    assert (err.code, err.reason, str(err)) == (
        Refusal.PERMISSION_DENIED,
        "not yours",
        "PERMISSION_DENIED: not yours",
    )


def test_check_round() -> None:
    check_round(5, server_round=5)
    check_round(1, server_round=5)  # late updates still count
    with pytest.raises(Rejected, match="ahead") as info:
        check_round(6, server_round=5)
    assert info.value.code == Refusal.FAILED_PRECONDITION
    check_round(3, server_round=5, max_lag=2)
    with pytest.raises(Rejected, match="by more than 2") as info:
        check_round(2, server_round=5, max_lag=2)
    assert info.value.code == Refusal.FAILED_PRECONDITION


def test_validation_is_transport_free() -> None:
    """No gRPC in the door: the simulator runs the same checks without a server."""
    import byzps.server.validation as module

    tree = ast.parse(Path(module.__file__).read_text())
    imported = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    imported += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [name for name in imported if name.split(".")[0] == "grpc"]


# ----------------------------------------------------------------------------------------------
# SeqLedger
# ----------------------------------------------------------------------------------------------


def test_seq_accept_then_duplicate() -> None:
    ledger = SeqLedger()
    assert ledger.last(0) == 0
    assert ledger.check(0, 1) is SeqDecision.APPLY
    assert ledger.last(0) == 0  # check alone changes nothing
    ledger.commit(0, 1)
    assert ledger.last(0) == 1
    assert ledger.check(0, 1) is SeqDecision.DUPLICATE
    assert ledger.check(0, 2) is SeqDecision.APPLY
    ledger.commit(0, 2)
    assert ledger.check(0, 1) is SeqDecision.DUPLICATE
    assert ledger.last(3) == 0 and ledger.check(3, 1) is SeqDecision.APPLY


def test_seq_gap_is_failed_precondition() -> None:
    ledger = SeqLedger()
    ledger.commit(0, 1)
    with pytest.raises(Rejected, match="seq 3 leaves a gap: last acknowledged is 1") as info:
        ledger.check(0, 3)
    assert info.value.code == Refusal.FAILED_PRECONDITION
    assert ledger.last(0) == 1


def test_seq_zero_is_invalid() -> None:
    with pytest.raises(Rejected, match="start at 1") as info:
        SeqLedger().check(0, 0)
    assert info.value.code == INVALID


def test_commit_out_of_order_is_a_bug() -> None:
    ledger = SeqLedger()
    with pytest.raises(ValueError, match="expected 1"):
        ledger.commit(0, 2)


def test_ledger_state_round_trip() -> None:
    ledger = SeqLedger()
    for seq in (1, 2, 3):
        ledger.commit(1, seq)
    ledger.commit(2, 1)
    state = ledger.state_dict()
    ledger.commit(1, 4)  # the saved state is a copy, not a view
    restored = SeqLedger()
    restored.load_state_dict(state)
    assert restored.state_dict() == {"last_seq": {1: 3, 2: 1}}
    assert restored.check(1, 3) is SeqDecision.DUPLICATE
    assert restored.check(1, 4) is SeqDecision.APPLY


@pytest.mark.parametrize("bad", [{1: -1}, {1: 1.5}, {1: True}, {"3": 1}, [1]])
def test_ledger_refuses_a_corrupt_state(bad: object) -> None:
    with pytest.raises(ValueError, match="last_seq"):
        SeqLedger().load_state_dict({"last_seq": bad})


def test_message_is_not_mutated() -> None:
    msg = topk_update([5, 3])
    before = msg.SerializeToString()
    with pytest.raises(Rejected):
        validate_update(msg, dim=DIM, k_max=K)
    assert msg.SerializeToString() == before


# ----------------------------------------------------------------------------------------------
# The door's state check: an update must leave its sender's server state finite
# ----------------------------------------------------------------------------------------------

FLT_MAX = float(torch.finfo(torch.float32).max)


def door_update(row: int, values: list[float], round: int = 0) -> Update:
    vec = SparseVector(torch.tensor([1, 2], dtype=INDEX_DTYPE), torch.tensor(values), DIM)
    return Update(row, round, 1, vec, 16, b"")


@pytest.mark.parametrize(
    ("rule", "params"), [("state", {}), ("diana", {"a": 0.5}), ("marina", {"p": 0.5})]
)
def test_door_refuses_what_would_overflow_a_state_and_changes_nothing(
    rule: str, params: dict[str, float]
) -> None:
    server_rule = build_server_rule(rule, 3, DIM, **params)
    door = Door(DIM, "topk", lambda r: K, rounds=10)
    first = door_update(1, [FLT_MAX, -FLT_MAX])
    door.admit(server_rule, first)  # finite on its own
    batch = SparseBatch(first.vector.indices[None], first.vector.values[None], DIM)
    server_rule.absorb(torch.tensor([1]), batch, 0)
    later = 1
    if rule == "marina":  # candidates are base + message: a base near max, in a round using it
        server_rule.close_round(server_rule.candidates[1].clone(), 0)
        later = next(r for r in range(1, 100) if not server_rule.is_full(r))
    before = {k: v.clone() for k, v in server_rule.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(Rejected, match="non-finite") as info:
        door.admit(server_rule, door_update(1, [FLT_MAX, 0.0], round=later))
    assert info.value.code == Refusal.INVALID_ARGUMENT
    after = {k: v for k, v in server_rule.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(before[k], after[k]) for k in before)
    if rule != "marina":  # marina's base is shared by every row
        door.admit(server_rule, door_update(2, [FLT_MAX, 1.0], round=later))
    rows = torch.tensor([1, 2])
    two = SparseBatch(
        torch.tensor([[1, 2], [1, 2]], dtype=INDEX_DTYPE), torch.tensor([[FLT_MAX, 0.0]] * 2), DIM
    )
    expected = [0, 1] if rule == "marina" else [0]
    assert door.refused_rows(server_rule, rows, two, later).tolist() == expected


def test_door_refuses_batches_over_k_max() -> None:
    door = Door(DIM, "topk", lambda r: 1, rounds=10)
    rule = build_server_rule("state", 2, DIM)
    batch = SparseBatch(torch.tensor([[1, 2]], dtype=INDEX_DTYPE), torch.ones(1, 2), DIM)
    assert door.refused_rows(rule, torch.tensor([0]), batch, 0).tolist() == [0]


def test_one_update_per_claimed_round() -> None:
    check_round(3, server_round=5, last_round=2)
    with pytest.raises(Rejected, match="already claimed round 3") as info:
        check_round(3, server_round=5, last_round=3)
    assert info.value.code == Refusal.FAILED_PRECONDITION


@pytest.mark.parametrize("over", [0, 1])
def test_the_door_counts_unknown_fields_inside_an_update_against_its_size_limit(over: int) -> None:
    """Door.receive sizes an update by the bytes it serializes to (the ones the log keeps): a
    Byzantine worker padding its update with unknown fields reaches the limit at exactly
    max_update_bytes, one byte more is refused as RESOURCE_EXHAUSTED."""
    from byzps.worker.byzantine.forge import unknown_field

    door = Door(DIM, "topk", lambda r: K, rounds=10)
    plain = encode_sparse(
        SparseVector(torch.arange(K, dtype=INDEX_DTYPE), torch.ones(K), DIM), compressor="topk"
    )
    extra = max_update_bytes(K) - plain.ByteSize() + over  # padding bytes, tag and length included
    padding = next(p for n in range(extra, -1, -1) if len(p := unknown_field(n)) == extra)
    padded = pb.SparseUpdate.FromString(plain.SerializeToString() + padding)
    assert len(padded.SerializeToString()) == max_update_bytes(K) + over
    if not over:
        assert door.receive(0, 0, 1, padded).encoded == padded.SerializeToString()
        return
    with pytest.raises(Rejected, match="limit") as info:
        door.receive(0, 0, 1, padded)
    assert info.value.code == Refusal.RESOURCE_EXHAUSTED
