"""The downlink: how a worker gets x_r — densely, or as the change of the aggregate (sparse).

Why the aggregate and not x: the step x ← x − γ ĝ moves every coordinate where ĝ ≠ 0, so the
change of x is dense as soon as ĝ is. ĝ itself changes only on the coordinates the round's
messages touched (for coordinate-wise aggregators; see byzps.server.engine). A worker that keeps
x and ĝ (`ModelMirror`) therefore needs only ĝ's changed entries and the step size: it replaces
those entries (replacement, not addition, so no rounding) and runs `apply_step`, the very op the
server ran, which gives the server's x bit for bit.

On the wire (GetModelUpdate, see protos/byzps/v1/parameter_server.proto) a dense answer is the
ModelChunks of x then, when the server is producing deltas, those of ĝ; a sparse answer is one or
more SparseModelDelta pieces, each within gRPC's 4 MiB message limit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from byzps.common._state_kernels import step_float32
from byzps.common.codec import (
    CHUNK_HEADER_BYTES,
    MAX_MESSAGE_BYTES,
    WireFormatError,
    decode_delta,
    decode_model,
    delta_wire_parts,
    length_delimited,
    model_chunk_wire_parts,
)
from byzps.common.sparse import SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb

#: Bytes per delta entry on the wire: a uint32 index and a float32 value.
DELTA_ENTRY_BYTES = 8
#: ModelUpdate's oneof body: field number per kind of answer.
_BODY_FIELDS = {f.name: f.number for f in pb.ModelUpdate.DESCRIPTOR.oneofs_by_name["body"].fields}


def apply_step(x: Tensor, aggregate: Tensor, lr: float) -> None:
    """x ← x − γ ĝ in place: the one float op the server and every mirroring worker share, so
    the same inputs give the same bits on both sides — on any machine, for a float32 model.

    Why not `x.sub_(ĝ, alpha=γ)`: torch fuses its multiply and subtract (one rounding) where the
    CPU has FMA (AVX2, AVX-512) and rounds twice where it has not, so a worker on an older CPU
    (or under ATEN_CPU_CAPABILITY=default) drifted from the server's x, unnoticed: 1,932 of
    20,000 entries differed after 200 rounds. Here γ is rounded to float32 and the difference
    taken in float64, where γ·ĝ is exact: the result no longer depends on fusing (on a GPU too).
    Other model dtypes keep torch's op."""
    if x.dtype != torch.float32 or aggregate.dtype != torch.float32:
        x.sub_(aggregate, alpha=lr)
        return
    lr32 = float(np.float32(lr))
    if x.is_cpu and x.is_contiguous() and aggregate.is_cpu and aggregate.is_contiguous():
        step_float32(x.numpy(), aggregate.numpy(), lr32)
    else:
        x.copy_(x.double().sub_(aggregate.double(), alpha=lr32))


@dataclass(frozen=True)
class DenseModel:
    """x_round in full, with ĝ_round when the receiver should keep it for later deltas."""

    round: int
    x: Tensor
    aggregate: Tensor | None = None


@dataclass(frozen=True)
class AggregateDelta:
    """ĝ_round differs from ĝ_(round−1) exactly at `indices` (int32, strictly increasing, < dim),
    where it now holds `values` (float32); x_round = x_(round−1) − lr · ĝ_round."""

    round: int
    dim: int
    indices: Tensor
    values: Tensor
    lr: float

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())


Downlink = DenseModel | AggregateDelta


def delta_piece_entries(max_message_bytes: int = MAX_MESSAGE_BYTES) -> int:
    """Entries per SparseModelDelta piece so that each serializes within `max_message_bytes`."""
    return (max_message_bytes - 2 * CHUNK_HEADER_BYTES) // DELTA_ENTRY_BYTES


def encode_downlink(
    downlink: Downlink, *, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> Iterator[pb.ModelUpdate]:
    """The GetModelUpdate stream of `downlink` as messages (lazy)."""
    for wire in encode_downlink_wire(downlink, max_message_bytes=max_message_bytes):
        yield pb.ModelUpdate.FromString(wire)


def encode_downlink_wire(
    downlink: Downlink, *, max_message_bytes: int = MAX_MESSAGE_BYTES
) -> Iterator[bytes]:
    """The GetModelUpdate stream of `downlink` as the wire bytes of its messages (lazy: one
    message's bytes at a time), the bulk data copied once, from the tensors into the result."""
    if isinstance(downlink, AggregateDelta):
        step = delta_piece_entries(max_message_bytes)
        for start in range(0, max(downlink.nnz, 1), step):  # an empty delta is one empty piece
            part = slice(start, start + step)
            vec = SparseVector(downlink.indices[part], downlink.values[part], downlink.dim)
            piece = delta_wire_parts(downlink.round, vec, lr=downlink.lr)
            yield b"".join(length_delimited(_BODY_FIELDS["delta"], piece))
        return
    for part, tensor in (("model", downlink.x), ("aggregate", downlink.aggregate)):
        if tensor is None:
            continue
        for chunk in model_chunk_wire_parts(
            tensor, downlink.round, max_chunk_bytes=max_message_bytes
        ):
            yield b"".join(length_delimited(_BODY_FIELDS[part], chunk))


def decode_downlink(stream: Iterable[pb.ModelUpdate], *, dim: int) -> Downlink:
    """Read a whole GetModelUpdate stream into one Downlink, checking every wire rule: one kind
    of answer, one round, x before ĝ, delta pieces in increasing index order with one lr."""
    parts: dict[str, list] = {"model": [], "aggregate": [], "delta": []}
    for i, msg in enumerate(stream):
        kind = msg.WhichOneof("body")
        if kind is None:
            raise WireFormatError(f"update {i}: empty")
        if kind == "model" and parts["aggregate"]:
            raise WireFormatError(f"update {i}: a model chunk after aggregate chunks")
        parts[kind].append(getattr(msg, kind))
    if parts["delta"]:
        if parts["model"] or parts["aggregate"]:
            raise WireFormatError("stream: mixes a delta with model chunks")
        return _join_pieces(parts["delta"], dim)
    if not parts["model"]:
        raise WireFormatError("stream: no model")
    round, x = decode_model(parts["model"], dim=dim)
    aggregate = None
    if parts["aggregate"]:
        agg_round, aggregate = decode_model(parts["aggregate"], dim=dim)
        if agg_round != round:
            raise WireFormatError(f"aggregate: round {agg_round} with a model of round {round}")
    return DenseModel(round, x, aggregate)


def _join_pieces(pieces: list[pb.SparseModelDelta], dim: int) -> AggregateDelta:
    decoded = [decode_delta(p) for p in pieces]
    round, lr = decoded[0][0], pieces[0].lr
    last = -1
    for i, ((r, vec), piece) in enumerate(zip(decoded, pieces, strict=True)):
        if r != round or piece.lr != lr:
            raise WireFormatError(f"delta piece {i}: round/lr differ from piece 0")
        if vec.dim != dim:
            raise WireFormatError(f"delta piece {i}: dim {vec.dim}, expected {dim}")
        if vec.nnz and int(vec.indices[0]) <= last:
            raise WireFormatError(f"delta piece {i}: indices do not continue increasing")
        last = int(vec.indices[-1]) if vec.nnz else last
    if not lr > 0:
        raise WireFormatError(f"lr: {lr} is not a positive step size")
    indices = torch.cat([vec.indices for _, vec in decoded])
    values = torch.cat([vec.values for _, vec in decoded])
    return AggregateDelta(round, dim, indices, values, lr)


class ModelMirror:
    """A worker's copy of (round, x, ĝ), advanced by whatever the server sends.

    `aggregate` is None until a dense answer carried ĝ; only then can deltas be applied.
    """

    def __init__(self) -> None:
        self.round: int | None = None
        self.x: Tensor | None = None
        self.aggregate: Tensor | None = None

    @property
    def has_aggregate(self) -> bool:
        return self.aggregate is not None

    def reset(self) -> None:
        """Forget everything: the next answer must be dense (after a reconnect, a gap, …)."""
        self.round = self.x = self.aggregate = None

    def apply(self, downlink: Downlink) -> None:
        """Advance to `downlink`; a delta that does not follow this mirror raises ValueError."""
        if isinstance(downlink, DenseModel):
            self.round, self.x, self.aggregate = downlink.round, downlink.x, downlink.aggregate
            return
        if self.x is None or self.aggregate is None or self.round != downlink.round - 1:
            raise ValueError(
                f"a delta to round {downlink.round} does not follow this mirror "
                f"(round {self.round}, aggregate {'held' if self.has_aggregate else 'missing'})"
            )
        self.aggregate[downlink.indices.long()] = downlink.values
        apply_step(self.x, self.aggregate, downlink.lr)
        self.round = downlink.round
