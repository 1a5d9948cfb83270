"""Hand-made PushUpdate bodies for the protocol attacks: well-formed ones that a server must not
apply (their seq says so), malformed ones it must refuse, and padding it must bound.

Why a module of its own: what makes a request refusable is a statement about the wire contract
(protos/byzps/v1/parameter_server.proto), not about any one attack, and several attacks send
these bodies. Everything here is pure message building — no sockets, no threads.

The one rule every body obeys: it can never be the member's next accepted update. Replays carry
an acknowledged seq (the server answers DUPLICATE whatever the body), everything else a seq far
beyond the next one (a gap, FAILED_PRECONDITION) or, while the member has no acknowledged seq to
replay, a gap as well. A server that *accepted* one of them would change the run's result.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from byzps.common.codec import field_prefix
from byzps.common.compressors import randk_indices
from byzps.proto.v1 import parameter_server_pb2 as pb

#: Added to a member's last acknowledged seq for a push that must leave a gap: larger than any
#: number of rounds a run has, so the member's own pushes never catch up with it.
GAP = 2**40
#: A protobuf field number the PushUpdateRequest does not use (unknown to every receiver).
UNKNOWN_FIELD = 4095
#: The seed a forged Rand-k update regenerates its indices from.
FORGED_SEED = 12345


def never_next(last_seq: int, *, replay: bool) -> int:
    """A seq the server cannot apply: `last_seq` itself for a replay (DUPLICATE, once there is
    one to replay), otherwise one far beyond the next (a gap)."""
    if replay and last_seq >= 1:
        return last_seq
    return last_seq + GAP


def plausible_update(registration: pb.RegisterReply) -> pb.SparseUpdate:
    """An update that passes every check at the door for this run (dim, k_max, compressor,
    Rand-k seed, finite float32 zeros), so only its seq decides its fate."""
    dim, k = int(registration.model.dim), int(registration.k_max)
    compressor = registration.compressor
    update = pb.SparseUpdate(dim=dim, dtype=pb.VALUE_DTYPE_FLOAT32, compressor=compressor)
    if compressor == pb.COMPRESSOR_IDENTITY or k >= dim:
        update.nnz = dim  # the dense convention: no indices
    else:
        if compressor == pb.COMPRESSOR_RANDK:
            indices = randk_indices(dim, k, FORGED_SEED).numpy()
            update.seed = FORGED_SEED
        else:
            indices = np.arange(k)
        update.nnz = k
        update.indices = indices.astype("<u4").tobytes()
    update.values = np.zeros(update.nnz, dtype="<f4").tobytes()
    return update


def _modified(
    registration: pb.RegisterReply, change: Callable[[pb.SparseUpdate], None]
) -> pb.SparseUpdate:
    update = plausible_update(registration)
    change(update)
    return update


def _nan_value(update: pb.SparseUpdate) -> None:
    values = np.frombuffer(update.values, dtype="<f4").copy()
    values[0] = np.nan
    update.values = values.tobytes()


def _unsorted(update: pb.SparseUpdate) -> None:
    if update.indices and update.nnz >= 2:
        indices = np.frombuffer(update.indices, dtype="<u4")[::-1].copy()
        update.indices = indices.tobytes()
    else:  # one entry (or dense): an index out of range instead
        update.nnz = 1
        update.indices = np.array([update.dim], dtype="<u4").tobytes()
        update.values = np.zeros(1, dtype="<f4").tobytes()
        update.ClearField("seed")


def _too_many(update: pb.SparseUpdate) -> None:
    nnz = update.nnz + 1  # over k_max, or over dim for a dense update
    update.nnz = nnz
    update.indices = np.arange(nnz, dtype="<u4").tobytes()
    update.values = np.zeros(nnz, dtype="<f4").tobytes()


def _forged_seed(update: pb.SparseUpdate) -> None:
    """A Rand-k update whose indices are not its seed's selection: the server must regenerate
    them to tell, which costs it O(k) (common/compressors/_permutation.py), not O(d). In a run of
    another compressor, an update that declares Rand-k (refused by its name)."""
    if update.HasField("seed"):
        update.seed = update.seed + 1
    else:
        update.compressor = pb.COMPRESSOR_RANDK
        update.seed = FORGED_SEED


#: Broken bodies, each violating one rule of the wire contract or of the run (name → change).
MALFORMATIONS: dict[str, Callable[[pb.SparseUpdate], None]] = {
    "wrong-dim": lambda u: setattr(u, "dim", u.dim + 1),
    "nan-value": _nan_value,
    "unsorted-indices": _unsorted,
    "nnz-over-k-max": _too_many,
    "short-values": lambda u: setattr(u, "values", u.values[:-1]),
    "dtype-unspecified": lambda u: setattr(u, "dtype", pb.VALUE_DTYPE_UNSPECIFIED),
    "compressor-unspecified": lambda u: setattr(u, "compressor", pb.COMPRESSOR_UNSPECIFIED),
    "forged-seed": _forged_seed,
}


def malformed_update(registration: pb.RegisterReply, kind: str) -> pb.SparseUpdate:
    """The run's plausible update broken in one way (a key of MALFORMATIONS)."""
    return _modified(registration, MALFORMATIONS[kind])


def oversized_update(registration: pb.RegisterReply, extra_bytes: int) -> pb.SparseUpdate:
    """A plausible update carrying `extra_bytes` of unknown fields inside it: over the server's
    max_update_bytes, which counts the unknown fields too."""
    update = plausible_update(registration)
    update.MergeFromString(unknown_field(extra_bytes))
    return update


def unknown_field(size: int, field: int = UNKNOWN_FIELD) -> bytes:
    """One length-delimited protobuf field of `size` zero bytes under an unused field number:
    appended to a serialized message (outside all its fields), every parser keeps it as an
    unknown field of that message."""
    return field_prefix(field, size) + bytes(size)
