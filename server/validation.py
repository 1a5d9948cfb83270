"""Validation at the door: every check a pushed update must pass before it touches any state.

A Byzantine worker controls every byte it sends, so the server treats a PushUpdate as hostile
until proven well-formed: size first (cheap, bounds all later work), then the header fields
against the model (dim, nnz ≤ k_max, compressor), then the payload (lengths, index order and
range, finite values — byzps.common.codec), then the Rand-k seed. A refusal raises Rejected
with the gRPC status code a client should see and a precise reason; nothing is mutated, so the
server never crashes on input and never half-applies one.

SeqLedger is the exactly-once bookkeeping: a pure per-worker record of the last acknowledged
sequence number, checkpointed with the rest of the server state.

Transport-light on purpose: grpc.StatusCode is the only gRPC name used here, so the round engine
and the simulator can run these checks without a server.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from typing import Any, NoReturn

import grpc
import torch

from byzps.common.codec import WireFormatError, compressor_name, decode_sparse
from byzps.common.compressors import randk_indices
from byzps.common.sparse import SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb

#: Serialized bytes a SparseUpdate may use beyond its 8 bytes per float32 entry: dim, nnz, dtype,
#: compressor, seed and the two bytes-field headers take at most 39.
UPDATE_OVERHEAD_BYTES = 64


class Rejected(Exception):
    """An update or call the server refuses: `code` is the gRPC status, `reason` says why."""

    def __init__(self, code: grpc.StatusCode, reason: str) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason


def max_update_bytes(k_max: int) -> int:
    """The largest serialized SparseUpdate a server with this k_max needs to accept."""
    return 8 * k_max + UPDATE_OVERHEAD_BYTES


def validate_update(
    update: pb.SparseUpdate,
    *,
    dim: int,
    k_max: int,
    compressor: str | None = None,
    max_bytes: int | None = None,
) -> SparseVector:
    """Check `update` against a model of dimension `dim`; return it decoded (values float32).

    `compressor` is the run's compressor name; when given, the update must declare it. An update
    declaring Rand-k must carry a seed from which exactly its k_max indices regenerate.
    `max_bytes` defaults to max_update_bytes(k_max). Raises Rejected: RESOURCE_EXHAUSTED for an
    oversize message, INVALID_ARGUMENT for anything malformed.
    """
    limit = max_update_bytes(k_max) if max_bytes is None else max_bytes
    size = update.ByteSize()  # counts unknown fields too, so padding cannot sneak past
    if size > limit:
        raise Rejected(grpc.StatusCode.RESOURCE_EXHAUSTED, f"update is {size} bytes, limit {limit}")
    if update.dim != dim:
        _invalid(f"dim {update.dim} does not match the model's {dim}")
    if update.nnz > k_max:
        _invalid(f"nnz {update.nnz} exceeds k_max {k_max}")
    try:
        declared = compressor_name(update.compressor)
        if compressor is not None and declared != compressor:
            _invalid(f"compressor {declared!r} but this run uses {compressor!r}")
        vec = decode_sparse(update)
    except WireFormatError as exc:
        _invalid(str(exc))
    if declared == "randk":
        _check_randk(vec, k_max)
    return vec


def _check_randk(vec: SparseVector, k: int) -> None:
    """Rand-k picks exactly k coordinates from its seed; the message must show those."""
    if vec.seed is None:
        _invalid("Rand-k update without a seed")
    if vec.nnz != k:
        _invalid(f"Rand-k update with nnz {vec.nnz}, expected k = {k}")
    if not torch.equal(vec.indices, randk_indices(vec.dim, k, vec.seed)):
        _invalid(f"indices are not the Rand-k selection of seed {vec.seed}")


def check_round(round: int, *, server_round: int, max_lag: int | None = None) -> None:
    """An update must come from a round the server has reached; a late one still counts (it is
    a delta on its worker's own state) unless it lags more than `max_lag` rounds."""
    if round > server_round:
        raise Rejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"round {round} is ahead of the server's round {server_round}",
        )
    if max_lag is not None and server_round - round > max_lag:
        raise Rejected(
            grpc.StatusCode.FAILED_PRECONDITION,
            f"round {round} lags the server's round {server_round} by more than {max_lag}",
        )


def _invalid(reason: str) -> NoReturn:
    raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, reason)


# ----------------------------------------------------------------------------------------------
# Exactly-once sequence numbers
# ----------------------------------------------------------------------------------------------


class SeqDecision(enum.Enum):
    """What to do with a well-sequenced update."""

    APPLY = "apply"  # the next expected seq: validate, apply, then commit()
    DUPLICATE = "duplicate"  # already applied: acknowledge again, change nothing


class SeqLedger:
    """Per worker, the last acknowledged sequence number (0: none yet; seqs start at 1).

    Two steps so a failure in between changes nothing: `check` classifies a seq without touching
    the ledger, `commit` advances it once the update has been applied. Not thread-safe: the
    caller serializes check → apply → commit per worker (it must anyway, for the apply).
    """

    def __init__(self) -> None:
        self._last: dict[str, int] = {}

    def last(self, worker_id: str) -> int:
        """The last acknowledged seq of `worker_id` (0 for a worker never acknowledged)."""
        return self._last.get(worker_id, 0)

    def check(self, worker_id: str, seq: int) -> SeqDecision:
        """APPLY for last + 1, DUPLICATE for seq ≤ last; Rejected for seq < 1 (INVALID_ARGUMENT)
        or a gap, seq > last + 1 (FAILED_PRECONDITION: the worker must resync from last_seq)."""
        if seq < 1:
            _invalid(f"seq {seq}: sequence numbers start at 1")
        last = self.last(worker_id)
        if seq <= last:
            return SeqDecision.DUPLICATE
        if seq > last + 1:
            raise Rejected(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"seq {seq} leaves a gap: last acknowledged is {last}, expected {last + 1}",
            )
        return SeqDecision.APPLY

    def commit(self, worker_id: str, seq: int) -> None:
        """Record `seq` as applied; it must be the next expected one (else a caller bug)."""
        expected = self.last(worker_id) + 1
        if seq != expected:
            raise ValueError(f"commit of seq {seq} for {worker_id!r}, expected {expected}")
        self._last[worker_id] = seq

    def state_dict(self) -> dict[str, Any]:
        return {"last_seq": dict(self._last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the ledger with a checkpointed one (checked: str ids, non-negative int seqs)."""
        last = state["last_seq"]
        if not isinstance(last, Mapping) or not all(
            isinstance(w, str) and isinstance(s, int) and not isinstance(s, bool) and s >= 0
            for w, s in last.items()
        ):
            raise ValueError("last_seq must map worker ids (str) to non-negative ints")
        self._last = dict(last)
