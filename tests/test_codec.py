"""Wire codec: round trips, and a precise WireFormatError for every malformed input."""

from __future__ import annotations

import struct
from collections.abc import Callable

import numpy as np
import pytest
import torch

from byzps.common.codec import (
    MAX_MESSAGE_BYTES,
    WireFormatError,
    compressor_name,
    decode_delta,
    decode_model,
    decode_sparse,
    encode_delta,
    encode_model,
    encode_push_request,
    encode_sparse,
    encode_sparse_wire,
)
from byzps.common.sparse import INDEX_DTYPE, SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def random_vector(dim: int, nnz: int, seed: int = 0, rand_seed: int | None = None) -> SparseVector:
    gen = torch.Generator().manual_seed(seed)
    idx = torch.sort(torch.randperm(dim, generator=gen)[:nnz]).values.to(INDEX_DTYPE)
    return SparseVector(idx, torch.randn(nnz, generator=gen), dim, rand_seed)


def packed(fmt: str, *xs: float) -> bytes:
    return struct.pack(f"<{len(xs)}{fmt}", *xs)


def update(idx: list[int], vals: list[float], /, dim: int = 10, **kw: object) -> pb.SparseUpdate:
    """A hand-built float32 Top-k update; `kw` overrides any field, so tests can break it."""
    msg = pb.SparseUpdate(
        dim=dim,
        nnz=len(vals),
        indices=packed("I", *idx),
        values=packed("f", *vals),
        dtype=pb.VALUE_DTYPE_FLOAT32,
        compressor=pb.COMPRESSOR_TOPK,
    )
    for name, value in kw.items():
        setattr(msg, name, value)
    return msg


# ----------------------------------------------------------------------------------------------
# SparseVector ↔ SparseUpdate
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_sparse_round_trip(dtype: torch.dtype) -> None:
    vec = random_vector(100_000, 1_000)
    msg = pb.SparseUpdate.FromString(
        encode_sparse(vec, compressor="topk", dtype=dtype).SerializeToString()
    )
    assert len(msg.indices) == 4 * vec.nnz
    assert len(msg.values) == torch.finfo(dtype).bits // 8 * vec.nnz
    out = decode_sparse(msg)
    assert out.dim == vec.dim and out.seed is None
    assert out.indices.dtype == INDEX_DTYPE and torch.equal(out.indices, vec.indices)
    assert out.values.dtype == torch.float32
    assert torch.equal(out.values, vec.values.to(dtype).float())  # widening is exact
    out.validate()
    out.values.mul_(2)  # decoded tensors own writable memory


def test_wire_bytes_are_little_endian_uint32_and_float32() -> None:
    vec = SparseVector(torch.tensor([1, 258], dtype=INDEX_DTYPE), torch.tensor([1.5, -2.0]), 300)
    msg = encode_sparse(vec, compressor="topk")
    assert msg.indices == packed("I", 1, 258)
    assert msg.values == packed("f", 1.5, -2.0)


def test_seed_round_trips_including_zero() -> None:
    for seed in (0, 2**64 - 1):
        msg = encode_sparse(random_vector(50, 5, rand_seed=seed), compressor="randk")
        assert msg.compressor == pb.COMPRESSOR_RANDK
        assert decode_sparse(msg).seed == seed


def test_empty_update_round_trips() -> None:
    vec = SparseVector(torch.empty(0, dtype=INDEX_DTYPE), torch.empty(0), 10)
    msg = encode_sparse(vec, compressor="topk")
    out = decode_sparse(msg)
    assert out.nnz == 0 and out.dim == 10 and msg.indices == b"" and msg.values == b""


def test_dense_convention_omits_indices() -> None:
    vec = SparseVector(torch.arange(64, dtype=INDEX_DTYPE), torch.randn(64), 64)
    msg = encode_sparse(vec, compressor="identity")
    assert msg.indices == b"" and msg.nnz == 64
    out = decode_sparse(msg)
    assert torch.equal(out.indices, vec.indices) and torch.equal(out.values, vec.values)
    explicit = encode_sparse(vec, compressor="identity", omit_dense_indices=False)
    assert len(explicit.indices) == 4 * 64
    assert torch.equal(decode_sparse(explicit).indices, vec.indices)


def test_compressor_names() -> None:
    assert compressor_name(pb.COMPRESSOR_RANDK) == "randk"
    with pytest.raises(WireFormatError, match="COMPRESSOR_UNSPECIFIED"):
        compressor_name(pb.COMPRESSOR_UNSPECIFIED)
    with pytest.raises(WireFormatError, match="unknown value 42"):
        compressor_name(42)


@pytest.mark.parametrize(
    ("msg", "match"),
    [
        (
            update([1, 2], [1.0, 2.0], indices=packed("I", 1)),
            r"indices: 4 bytes, expected 4·nnz = 8",
        ),
        (update([1, 2], [1.0, 2.0], values=packed("f", 1.0) + b"\0"), r"values: 5 bytes.* = 8"),
        (update([3, 1], [1.0, 2.0]), r"indices\[1\] = 1 is below indices\[0\] = 3"),
        (update([4, 4], [1.0, 2.0]), r"indices\[1\] = 4 repeats indices\[0\] = 4"),
        (update([1, 10], [1.0, 2.0]), r"indices\[1\] = 10 is outside \[0, 10\)"),
        (update([2**32 - 1, 3], [1.0, 2.0]), r"indices\[0\] = 4294967295 is outside"),
        (update([1, 2], [1.0, float("nan")]), r"values\[1\] = nan is not finite"),
        (update([1, 2], [float("-inf"), 1.0]), r"values\[0\] = -inf is not finite"),
        (update([1, 2], [1.0, 2.0], dim=0), r"dim: 0 is outside"),
        (update([1, 2], [1.0, 2.0], dim=1), r"nnz: 2 exceeds dim 1"),
        (update([], [], dtype=pb.VALUE_DTYPE_UNSPECIFIED), r"VALUE_DTYPE_UNSPECIFIED \(0\)"),
        (update([], [], dtype=7), r"dtype: unknown value 7"),
        (update([0], [1.0], dim=1, indices=b"\0\0"), r"or 0 bytes when nnz == dim"),
    ],
    ids=[
        "truncated-indices",
        "truncated-values",
        "unsorted",
        "duplicate",
        "out-of-range",
        "negative-as-uint32",
        "nan",
        "inf",
        "zero-dim",
        "nnz-over-dim",
        "unspecified-dtype",
        "unknown-dtype",
        "dense-truncated",
    ],
)
def test_malformed_sparse_update(msg: pb.SparseUpdate, match: str) -> None:
    with pytest.raises(WireFormatError, match=match):
        decode_sparse(msg)


def test_float16_overflow_is_refused_on_receipt() -> None:
    msg = update([1], [0.0])
    msg.dtype, msg.values = pb.VALUE_DTYPE_FLOAT16, np.array([np.inf], "<f2").tobytes()
    with pytest.raises(WireFormatError, match="not finite"):
        decode_sparse(msg)


def test_wire_format_error_is_a_value_error() -> None:
    assert issubclass(WireFormatError, ValueError)


def test_delta_round_trip_and_checks() -> None:
    vec = random_vector(1000, 30)
    round_, out = decode_delta(
        pb.SparseModelDelta.FromString(encode_delta(5, vec).SerializeToString())
    )
    assert round_ == 5 and torch.equal(out.indices, vec.indices)
    assert encode_delta(5, vec).delta.compressor == pb.COMPRESSOR_UNSPECIFIED
    with pytest.raises(WireFormatError, match="round"):
        decode_delta(encode_delta(0, vec))
    with pytest.raises(WireFormatError, match="delta: missing"):
        decode_delta(pb.SparseModelDelta(round=1))


# ----------------------------------------------------------------------------------------------
# Dense model ↔ ModelChunk stream
# ----------------------------------------------------------------------------------------------


def test_large_model_round_trips_in_bounded_chunks() -> None:
    dim = 2_100_000  # 8.4 MB of float32: more than two full chunks
    x = torch.randn(dim, generator=torch.Generator().manual_seed(1))
    chunks = [pb.ModelChunk.FromString(c.SerializeToString()) for c in encode_model(x, round=7)]
    assert len(chunks) == 3
    assert all(c.ByteSize() <= MAX_MESSAGE_BYTES for c in chunks)
    assert chunks[0].ByteSize() > MAX_MESSAGE_BYTES - 64  # chunks are filled, not tiny
    round_, y = decode_model(iter(chunks), dim=dim)
    assert round_ == 7 and torch.equal(x, y)


def test_small_chunks_and_non_float32_input() -> None:
    x = torch.arange(1000, dtype=torch.float64).reshape(10, 100)
    chunks = list(encode_model(x, round=0, max_chunk_bytes=64 + 4 * 300))
    assert [len(c.data) // 4 for c in chunks] == [300, 300, 300, 100]
    round_, y = decode_model(chunks, dim=1000)
    assert round_ == 0 and torch.equal(y, x.reshape(-1).float())


def chunks_of(x: list[float], round: int = 2) -> list[pb.ModelChunk]:
    """Two-element chunks of `x`, so tests can corrupt one."""
    return list(encode_model(torch.tensor(x), round=round, max_chunk_bytes=64 + 8))


@pytest.mark.parametrize(
    ("corrupt", "match"),
    [
        (lambda cs: cs[1:], r"chunk 0: offset 2, expected 0"),
        (lambda cs: [cs[0], cs[2]], r"chunk 1: offset 4, expected 2"),
        (lambda cs: cs[:2], r"stream: ended at coordinate 4 of 6"),
        (lambda cs: [], r"stream: no chunks"),
        (lambda cs: [*cs, cs[2]], r"chunk 3: offset 4, expected 6"),
        (lambda cs: [*cs[:2], _with(cs[2], round=3)], r"chunk 2: round 3 in a stream of round 2"),
        (lambda cs: [_with(cs[0], total_dim=7), *cs[1:]], r"chunk 0: total_dim 7, expected 6"),
        (
            lambda cs: [_with(cs[0], data=cs[0].data[:-1]), *cs[1:]],
            r"chunk 0: 7 data bytes, not a positive multiple of 4",
        ),
        (lambda cs: [_with(cs[0], data=b""), *cs[1:]], r"chunk 0: 0 data bytes"),
        (
            lambda cs: [*cs[:2], _with(cs[2], data=cs[2].data * 2)],
            r"chunk 2: covers \[4, 8\) beyond dim 6",
        ),
        (
            lambda cs: [*cs[:2], _with(cs[2], data=packed("f", 1.0, float("inf")))],
            r"x\[5\] = inf is not finite",
        ),
    ],
    ids=[
        "missing-first",
        "gap",
        "truncated-stream",
        "empty-stream",
        "extra-chunk",
        "mixed-rounds",
        "wrong-total",
        "partial-float",
        "empty-chunk",
        "overrun",
        "non-finite",
    ],
)
def test_malformed_chunk_stream(
    corrupt: Callable[[list[pb.ModelChunk]], list[pb.ModelChunk]], match: str
) -> None:
    with pytest.raises(WireFormatError, match=match):
        decode_model(corrupt(chunks_of([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])), dim=6)


def _with(chunk: pb.ModelChunk, **fields: object) -> pb.ModelChunk:
    out = pb.ModelChunk()
    out.CopyFrom(chunk)
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def test_encode_refuses_bad_arguments() -> None:
    with pytest.raises(ValueError, match="empty model"):
        list(encode_model(torch.empty(0), round=0))
    with pytest.raises(ValueError, match="max_chunk_bytes"):
        list(encode_model(torch.ones(3), round=0, max_chunk_bytes=64))
    with pytest.raises(ValueError, match="dtype"):
        encode_sparse(random_vector(10, 2), compressor="topk", dtype=torch.float64)


# --- wire bytes without intermediate copies ---------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("dense", [True, False])
def test_wire_bytes_parse_to_the_message_encode_sparse_builds(
    dtype: torch.dtype, dense: bool
) -> None:
    """encode_sparse_wire puts the bulk fields last, straight from the tensors; a parser must
    see exactly encode_sparse's message, seed included, and so must the push request around it."""
    dim = 9 if dense else 40
    indices = (
        torch.arange(dim, dtype=torch.int32)
        if dense
        else torch.tensor([2, 7, 31], dtype=torch.int32)
    )
    vec = SparseVector(indices, torch.randn(indices.numel()), dim, None if dense else 12345)
    name = "identity" if dense else "randk"
    expected = encode_sparse(vec, compressor=name, dtype=dtype)
    wire = encode_sparse_wire(vec, compressor=name, dtype=dtype)
    assert pb.SparseUpdate.FromString(wire) == expected
    assert decode_sparse(pb.SparseUpdate.FromString(wire)).values.tolist() == (
        decode_sparse(expected).values.tolist()
    )
    request = pb.PushUpdateRequest.FromString(encode_push_request("7", 3, 11, wire))
    assert request == pb.PushUpdateRequest(worker_id="7", round=3, seq=11, update=expected)


def test_dense_rows_share_their_indices_and_nothing_writes_them() -> None:
    """Decoded dense updates share one cached arange; after they went through the server's
    state update and an estimator's commit, it must still be arange."""
    from byzps.common.server_rules import scatter_add_rows
    from byzps.common.sparse import SparseBatch, dense_indices

    dim = 16
    wire = encode_sparse_wire(
        SparseVector(torch.arange(dim, dtype=torch.int32), torch.ones(dim), dim),
        compressor="identity",
    )
    a, b = (decode_sparse(pb.SparseUpdate.FromString(wire)) for _ in range(2))
    assert a.indices.data_ptr() == b.indices.data_ptr() == dense_indices(1, dim).data_ptr()
    state = torch.zeros(2, dim)
    scatter_add_rows(state, torch.tensor([0, 1]), SparseBatch.stack([a, b]), alpha=0.5)
    assert torch.equal(state, torch.full((2, dim), 0.5))
    assert torch.equal(dense_indices(1, dim)[0], torch.arange(dim, dtype=torch.int32))
    two = dense_indices(2, dim)
    assert two.data_ptr() != a.indices.data_ptr()  # several rows get their own copy
