"""Validation at the door: each malformed update gets the right gRPC code and reason; SeqLedger."""

from __future__ import annotations

import ast
from pathlib import Path

import grpc
import pytest
import torch

from byzps.common.codec import encode_sparse
from byzps.common.compressors import randk_indices
from byzps.common.sparse import INDEX_DTYPE, SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.validation import (
    Rejected,
    SeqDecision,
    SeqLedger,
    check_round,
    max_update_bytes,
    validate_update,
)

DIM, K = 1000, 10
INVALID = grpc.StatusCode.INVALID_ARGUMENT


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


def assert_rejected(msg: pb.SparseUpdate, code: grpc.StatusCode, match: str, **kw: object) -> None:
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
    assert_rejected(big_values, grpc.StatusCode.RESOURCE_EXHAUSTED, r"bytes, limit 144")
    # Unknown fields are kept by the parser; padding with one must not slip past the limit.
    padding = b"\xfa\x06" + bytes([200, 1]) + b"x" * 200  # field 111, length-delimited, 200 bytes
    padded = pb.SparseUpdate.FromString(topk_update().SerializeToString() + padding)
    assert_rejected(padded, grpc.StatusCode.RESOURCE_EXHAUSTED, r"limit 144")
    assert_rejected(topk_update(), grpc.StatusCode.RESOURCE_EXHAUSTED, r"limit 50", max_bytes=50)


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
    err = Rejected(grpc.StatusCode.PERMISSION_DENIED, "not yours")
    assert (err.code, err.reason, str(err)) == (
        grpc.StatusCode.PERMISSION_DENIED,
        "not yours",
        "PERMISSION_DENIED: not yours",
    )


def test_check_round() -> None:
    check_round(5, server_round=5)
    check_round(1, server_round=5)  # late updates still count
    with pytest.raises(Rejected, match="ahead") as info:
        check_round(6, server_round=5)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    check_round(3, server_round=5, max_lag=2)
    with pytest.raises(Rejected, match="by more than 2") as info:
        check_round(2, server_round=5, max_lag=2)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION


def test_validation_uses_no_grpc_name_but_status_code() -> None:
    """Transport-light: the round engine and the simulator can run these checks without gRPC."""
    import byzps.server.validation as module

    tree = ast.parse(Path(module.__file__).read_text())
    used = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "grpc"
    }
    imports = [n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom))]
    grpc_imports = [
        a.name for n in imports if isinstance(n, ast.Import) for a in n.names if "grpc" in a.name
    ]
    assert used == {"StatusCode"} and grpc_imports == ["grpc"]
    assert not any(isinstance(n, ast.ImportFrom) and "grpc" in (n.module or "") for n in imports)


# ----------------------------------------------------------------------------------------------
# SeqLedger
# ----------------------------------------------------------------------------------------------


def test_seq_accept_then_duplicate() -> None:
    ledger = SeqLedger()
    assert ledger.last("w") == 0
    assert ledger.check("w", 1) is SeqDecision.APPLY
    assert ledger.last("w") == 0  # check alone changes nothing
    ledger.commit("w", 1)
    assert ledger.last("w") == 1
    assert ledger.check("w", 1) is SeqDecision.DUPLICATE
    assert ledger.check("w", 2) is SeqDecision.APPLY
    ledger.commit("w", 2)
    assert ledger.check("w", 1) is SeqDecision.DUPLICATE
    assert ledger.last("other") == 0 and ledger.check("other", 1) is SeqDecision.APPLY


def test_seq_gap_is_failed_precondition() -> None:
    ledger = SeqLedger()
    ledger.commit("w", 1)
    with pytest.raises(Rejected, match="seq 3 leaves a gap: last acknowledged is 1") as info:
        ledger.check("w", 3)
    assert info.value.code == grpc.StatusCode.FAILED_PRECONDITION
    assert ledger.last("w") == 1


def test_seq_zero_is_invalid() -> None:
    with pytest.raises(Rejected, match="start at 1") as info:
        SeqLedger().check("w", 0)
    assert info.value.code == INVALID


def test_commit_out_of_order_is_a_bug() -> None:
    ledger = SeqLedger()
    with pytest.raises(ValueError, match="expected 1"):
        ledger.commit("w", 2)


def test_ledger_state_round_trip() -> None:
    ledger = SeqLedger()
    for seq in (1, 2, 3):
        ledger.commit("a", seq)
    ledger.commit("b", 1)
    state = ledger.state_dict()
    ledger.commit("a", 4)  # the saved state is a copy, not a view
    restored = SeqLedger()
    restored.load_state_dict(state)
    assert restored.state_dict() == {"last_seq": {"a": 3, "b": 1}}
    assert restored.check("a", 3) is SeqDecision.DUPLICATE
    assert restored.check("a", 4) is SeqDecision.APPLY


@pytest.mark.parametrize("bad", [{"a": -1}, {"a": 1.5}, {"a": True}, {3: 1}, [1]])
def test_ledger_refuses_a_corrupt_state(bad: object) -> None:
    with pytest.raises(ValueError, match="last_seq"):
        SeqLedger().load_state_dict({"last_seq": bad})


def test_message_is_not_mutated() -> None:
    msg = topk_update([5, 3])
    before = msg.SerializeToString()
    with pytest.raises(Rejected):
        validate_update(msg, dim=DIM, k_max=K)
    assert msg.SerializeToString() == before
