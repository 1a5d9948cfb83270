"""The door: every check a pushed update must pass before it touches any state, and the one error
type a refusal raises.

A Byzantine worker controls every byte it sends, so the server treats a PushUpdate as hostile
until proven well-formed and harmless:

1. the wire (`validate_update`): size first (cheap, bounds all later work), then the header
   fields against the model (dim, nnz ≤ k_max, compressor), then the payload (lengths, index
   order and range, finite values; for the packed quantizers the exact code length, zero
   padding, level range and a finite non-negative scale — byzps.common.codec), then what the
   run's compressor fixes: the Rand-k seed's indices, the Perm-K block of the sender, QSGD's
   level count — or, in a round whose messages travel uncompressed (MARINA's full-gradient
   rounds, `Door.admits`), a dense row declaring "identity" and nothing else;
2. the sender's own history (`check_round`, `SeqLedger`): a round the server has reached, later
   than the sender's last accepted one, the next sequence number;
3. the state (`Door.admit`): the rule must be able to apply the update now (a MARINA update
   whose round's coin differs from the open round's cannot be: OUT_OF_RANGE, dropped like an
   update that arrives after the run), and applying it must leave the sender's server-side
   state finite, checked with the very base `absorb` will use. Two finite pushes of 3e38 would
   otherwise turn g_j into +inf, and one non-finite row reaches every Gram-based rule and the
   model.

A refusal raises Rejected with a `Refusal` (the canonical status vocabulary — INVALID_ARGUMENT,
FAILED_PRECONDITION, … — as a plain enum, which the gRPC servicer maps to its status codes) and a
precise reason; nothing is mutated before every check has passed, so the server never crashes on
input and never half-applies one. Transport-free: no gRPC here, so the simulator runs the same
`Door` on its in-process messages.

Why no bound on a state's norm: the robust rules stay finite and within their guarantees for any
finite inputs (byzps.common.aggregators computes distances in float64 around a robust centre, and
their property tests throw ±FLT_MAX at them), so finiteness is the only property the state must
keep. A norm cap would be one more hyperparameter that either clips honest states or is too loose
to protect anything finiteness does not.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, NoReturn

import numpy as np
import torch
from google.protobuf import unknown_fields
from torch import Tensor

from byzps.common.codec import (
    LEVEL_COMPRESSORS,
    PACKED_COMPRESSORS,
    WireFormatError,
    compressor_name,
    decode_sparse,
)
from byzps.common.compressors import Compressor, PermK, Quantizer, is_permk_block, randk_indices
from byzps.common.server_rules import ServerRule
from byzps.common.shards import ShardRange
from byzps.common.sparse import SparseBatch, SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.results import message_bytes

#: Serialized bytes a SparseUpdate may use beyond its 8 bytes per float32 entry: dim, nnz, dtype,
#: compressor, seed and the two bytes-field headers take at most 39.
UPDATE_OVERHEAD_BYTES = 64
#: Bytes a PushUpdateRequest may use beyond its SparseUpdate: worker_id (≤ 10 digits), round and
#: seq varints and the field headers take at most 40.
PUSH_OVERHEAD_BYTES = 64
#: The largest legal request of every other RPC: a RegisterRequest carries a 64-character token,
#: a 64-character config digest and a worker id (≤ 150 bytes); the rest are smaller.
SMALL_REQUEST_BYTES = 512
#: What an update's round admits besides (or instead of) the run's compressor: "compressed",
#: the run's compressor only; "uncompressed", only a dense row declaring "identity" (MARINA's
#: full-gradient rounds under a sparsifier); "either" (a sparsifier keeping all d coordinates).
Admits = Literal["compressed", "uncompressed", "either"]
#: Serialized bytes of one value, by wire dtype.
VALUE_BYTES = {pb.VALUE_DTYPE_FLOAT32: 4, pb.VALUE_DTYPE_FLOAT16: 2, pb.VALUE_DTYPE_BFLOAT16: 2}


class Refusal(enum.Enum):
    """Why a call is refused, named after the canonical status codes a client will see."""

    INVALID_ARGUMENT = "malformed request"
    UNAUTHENTICATED = "caller not authenticated"
    PERMISSION_DENIED = "caller may not do this"
    FAILED_PRECONDITION = "not possible in the server's current state"
    RESOURCE_EXHAUSTED = "too large, or over the caller's share"
    UNAVAILABLE = "the server is shutting down"
    OUT_OF_RANGE = "the run has finished, or the update's round can no longer be applied"
    DEADLINE_EXCEEDED = "nothing new before the wait ended"


class Rejected(Exception):
    """A call the server refuses: `code` says what kind of refusal, `reason` says why, and
    `retry_after` (seconds), when set, that the same call may succeed later — the caller went
    over its share, not wrong (see byzps.server.limits)."""

    def __init__(self, code: Refusal, reason: str, *, retry_after: float | None = None) -> None:
        super().__init__(f"{code.name}: {reason}")
        self.code = code
        self.reason = reason
        self.retry_after = retry_after


def _invalid(reason: str) -> NoReturn:
    raise Rejected(Refusal.INVALID_ARGUMENT, reason)


def max_update_bytes(k_max: int) -> int:
    """The largest serialized SparseUpdate a server with this k_max needs to accept."""
    return 8 * k_max + UPDATE_OVERHEAD_BYTES


def max_push_bytes(k_max: int) -> int:
    """The largest serialized PushUpdateRequest: its update plus the request's own fields. The
    server refuses anything larger before parsing it, so padding outside the update (unknown
    fields) buys an attacker nothing."""
    return max_update_bytes(k_max) + PUSH_OVERHEAD_BYTES


def validate_update(
    update: pb.SparseUpdate,
    *,
    dim: int,
    k_max: int,
    compressor: str | None = None,
    max_bytes: int | None = None,
    spec: Compressor | None = None,
    row: int | None = None,
    size: int | None = None,
    shard: ShardRange | None = None,
    admits: Admits = "compressed",
    permk_seed: int | None = None,
) -> SparseVector:
    """Check `update` against a model of dimension `dim`; return it decoded (values float32).

    `compressor` is the run's compressor name; when given, the update must declare it — or,
    where `admits` says the update's round sends its messages uncompressed (`Door.admits`:
    MARINA's full-gradient rounds), "identity" with every one of the `dim` coordinates: with
    "uncompressed" only such a dense row, with "either" that or the run's compressor (whose
    rows are then dense too: k = d). An update declaring Rand-k must carry a seed from which
    exactly its k_max indices regenerate. `spec`, the run's compressor, fixes what the name
    does not: QSGD's level count, and with the sender's worker id `row` the Perm-K block its
    seed must regenerate (both required for Perm-K), and `permk_seed`, where the caller knows
    the run seed, the one seed a Perm-K update of its round may carry. On one shard of a
    sharded server (`shard`, with `dim` its width) a Rand-k update holds the part of its seed's
    selection that lies in the shard's range, with local indices.
    `max_bytes` defaults to max_update_bytes(k_max); `size` is the update's serialized length
    where the caller has it (default: update.ByteSize()). Raises Rejected:
    RESOURCE_EXHAUSTED for an oversize message, INVALID_ARGUMENT for anything malformed.
    """
    limit = max_update_bytes(k_max) if max_bytes is None else max_bytes
    if size is None:  # the caller may know it: ByteSize() serializes the message again
        size = update.ByteSize()  # counts unknown fields too, so padding cannot sneak past
    if size > limit:
        raise Rejected(Refusal.RESOURCE_EXHAUSTED, f"update is {size} bytes, limit {limit}")
    if unknown_fields.UnknownFieldSet(update):
        # Kept by SerializeToString, so they would be logged and replayed: padding of up to the
        # size limit on every accepted update (64× a scaled-sign record), for nothing.
        _invalid("fields this server does not know: an update carries only SparseUpdate's own")
    if update.dim != dim:
        _invalid(f"dim {update.dim} does not match the model's {dim}")
    if update.nnz > k_max:
        _invalid(f"nnz {update.nnz} exceeds k_max {k_max}")
    try:
        declared = compressor_name(update.compressor)
        if compressor is not None:
            _check_declared(declared, compressor, admits)
        _check_levels(update, declared, spec)
        vec = decode_sparse(update)
    except WireFormatError as exc:
        _invalid(str(exc))
    if vec.nnz == dim and update.indices:
        _invalid("indices: a dense update (nnz = dim) carries none, they are implied")
    if declared == "identity" and compressor not in (None, "identity") and vec.nnz != dim:
        # What an uncompressed round admits is the dense row an honest worker sends, no other.
        _invalid(
            f"an uncompressed 'identity' update must carry all {dim} coordinates, not {vec.nnz}"
        )
    if declared == "randk":
        _check_randk(vec, k_max, shard)
    elif declared == "permk":
        if not isinstance(spec, PermK) or row is None:
            _invalid("a Perm-K update needs the run's Perm-K compressor and the sender's row")
        _check_permk(vec, spec, row, permk_seed)
    return vec


def _check_levels(update: pb.SparseUpdate, declared: str, spec: Compressor | None) -> None:
    """A quantizer's level count must be the run's, checked before its codes are decoded: their
    decoding costs more the more levels a message claims (0.6 → 11 ms at d = 1,000 for
    s = 65,535), and a message with the wrong count is refused whatever its codes hold."""
    if (
        declared in LEVEL_COMPRESSORS
        and isinstance(spec, Quantizer)
        and update.levels != spec.levels
    ):
        _invalid(f"levels {update.levels} but this run's {declared} uses s = {spec.levels}")


def _check_declared(declared: str, compressor: str, admits: Admits) -> None:
    """The compressor an update declares against the run's `compressor` and what its round
    `admits` (see `Door.admits`)."""
    if declared == compressor and admits != "uncompressed":
        return
    if declared == "identity" and admits in ("uncompressed", "either"):
        return
    if admits == "uncompressed":
        _invalid(
            f"compressor {declared!r} in a full-gradient round, whose messages travel "
            "uncompressed: only a dense 'identity' row is admitted"
        )
    if declared == "identity" and compressor != "identity":
        _invalid(
            f"compressor 'identity' but this run uses {compressor!r}: a dense uncompressed row "
            "is admitted only in a full-gradient round, and the update's round is not one"
        )
    _invalid(f"compressor {declared!r} but this run uses {compressor!r}")


def _check_permk(vec: SparseVector, spec: PermK, row: int, round_seed: int | None) -> None:
    """Perm-K's worker `row` keeps block row mod n of its seed's permutation, exactly k entries;
    the seed is its round's (`round_seed`, where known), shared by every worker of the round, so
    the blocks of one round are disjoint as the compressor means them to be."""
    if vec.seed is None:
        _invalid("Perm-K update without a seed")
    if round_seed is not None and vec.seed != round_seed:
        _invalid(f"Perm-K seed {vec.seed} is not its round's shared seed {round_seed}")
    if vec.nnz != spec.k:
        _invalid(f"Perm-K update with nnz {vec.nnz}, expected k = {spec.k}")
    if not is_permk_block(vec.indices, vec.dim, spec.num_workers, vec.seed, row):
        _invalid(f"indices are not worker {row}'s Perm-K block of seed {vec.seed}")


def _check_randk(vec: SparseVector, k: int, shard: ShardRange | None = None) -> None:
    """Rand-k picks exactly k coordinates from its seed; the message must show those (on a
    shard: those in its range, shifted to local indices)."""
    if vec.seed is None:
        _invalid("Rand-k update without a seed")
    if shard is None or shard.whole:
        expected = randk_indices(vec.dim, k, vec.seed)
    else:
        chosen = randk_indices(shard.total, k, vec.seed)
        mine = chosen[(chosen >= shard.offset) & (chosen < shard.end)]
        expected = (mine - shard.offset).to(chosen.dtype)
    if vec.nnz != expected.numel():
        mine = "" if expected.numel() == k else f"{expected.numel()} of "
        _invalid(f"Rand-k update with nnz {vec.nnz}, expected {mine}k = {k}")
    if not torch.equal(vec.indices, expected):
        _invalid(f"indices are not the Rand-k selection of seed {vec.seed}")


def check_round(
    round: int,
    *,
    server_round: int,
    last_round: int = -1,
    max_lag: int | None = None,
    pushed_now: bool = False,
) -> None:
    """An update must come from a round the server has reached and be later than the sender's
    last accepted one (`last_round`); a late one still counts (it is a delta on its worker's own
    state) unless it lags more than `max_lag` rounds, or the sender already has an update
    accepted in the round open now (`pushed_now`).

    Why strictly later: an honest worker computes one update per round, so two different updates
    claiming the same round can only come from a Byzantine one — and without this rule it could
    push without limit, growing the write-ahead log and the server's work at will. With it, a
    worker's accepted updates over a run are at most the run's rounds.

    Why one late update per open round: an honest worker computes on the newest model it has,
    so in any one open round it has at most one update of an earlier round to send (the one it
    was computing when that round closed), and sends it before its next. Without the rule a
    worker silent for R rounds could bank them and spend them all in one round, R + 1 absorbs
    and log records under the coordinator's lock (measured: 41 accepted in one round at
    d = 1e6, an honest push in that round 10 ms instead of 3).
    """
    if round > server_round:
        raise Rejected(
            Refusal.FAILED_PRECONDITION,
            f"round {round} is ahead of the server's round {server_round}",
        )
    if round <= last_round:
        raise Rejected(
            Refusal.FAILED_PRECONDITION,
            f"round {round}: this worker's last accepted update already claimed round "
            f"{last_round} (one update per round)",
        )
    if round < server_round and pushed_now:
        raise Rejected(
            Refusal.FAILED_PRECONDITION,
            f"round {round} is late, and this worker already has an update accepted in the "
            f"open round {server_round} (one late update per open round)",
        )
    if max_lag is not None and server_round - round > max_lag:
        raise Rejected(
            Refusal.FAILED_PRECONDITION,
            f"round {round} lags the server's round {server_round} by more than {max_lag}",
        )


# ----------------------------------------------------------------------------------------------
# The door: wire checks for the server, state checks for the server and the simulator
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Update:
    """One update that passed the wire checks, in domain terms: what the coordinator applies."""

    row: int
    round: int
    seq: int
    vector: SparseVector
    #: Payload bytes on the wire (index + value per entry), counted for the uplink metric.
    wire_bytes: int
    #: The update as received, serialized: what the write-ahead log stores and replays.
    encoded: bytes


class Door:
    """The checks every update passes before it touches state, shared by the gRPC server and the
    simulator so both refuse exactly the same messages.

    `k_max(round)` is the largest nnz a message computed at `round` may carry (MARINA/PAGE send
    dense rounds); `rounds` bounds the round used to ask it, so absurd claimed rounds cost nothing.
    `spec` is the run's compressor object, needed for what its name does not fix (QSGD's levels;
    Perm-K's n, without which a Perm-K door cannot be built); `seed`, the run seed, fixes the
    one seed a Perm-K update of each round may carry (the gRPC server gives it; the simulator's
    messages never cross a wire).

    On one shard of a sharded server, `dim` is the shard's width and `shard` its place in the
    whole: `k_max` stays the whole message's bound (Rand-k's k is drawn over all d), while a
    request's size is bounded by what can fall in the shard's range, min(k_max, width) entries.
    """

    def __init__(
        self,
        dim: int,
        compressor: str,
        k_max: Callable[[int], int],
        rounds: int,
        spec: Compressor | None = None,
        shard: ShardRange | None = None,
        seed: int | None = None,
    ) -> None:
        if compressor == "permk" and not isinstance(spec, PermK):
            raise ValueError("spec: a Perm-K door needs the run's PermK compressor (its n)")
        if spec is not None and spec.name != compressor:
            raise ValueError(f"spec: a {spec.name!r} compressor for a {compressor!r} door")
        self.dim = dim
        self.compressor = compressor
        self.k_max = k_max
        self.rounds = rounds
        self.spec = spec
        self.shard = shard
        self.seed = seed

    @property
    def largest_k_max(self) -> int:
        """The largest k_max of the run: round 0's, which every estimator byzps has sends at
        least as densely as any later round (MARINA and PAGE send their full rounds dense, and
        round 0 is always one). Bounds request sizes; each update is still checked against its
        own round's k_max. At most the model's (on a shard: the slice's) dimension."""
        return min(self.dim, max(self.k_max(0), self.k_max(min(1, self.rounds))))

    def request_limits(self) -> dict[str, int]:
        """The largest serialized request each RPC of the service accepts."""
        small = SMALL_REQUEST_BYTES
        return {"Register": small, "GetModel": small, "GetModelUpdate": small,
                "PushUpdate": max_push_bytes(self.largest_k_max), "Status": small}  # fmt: skip

    def admits(self, round: int) -> Admits:
        """What an update computed at `round` may declare (validate_update's `admits`).

        An estimator that sends some rounds uncompressed says so by its k_max: Byz-VR-MARINA's
        full-gradient rounds (round 0, then its shared coin) carry the dense full gradient,
        k_max = d, which the worker declares "identity" since no compressor chose its support
        (byzps.worker.session.encode_row). Under a sparsifier whose k < d such a round admits
        exactly that dense row, and every other round the run's compressor only. A sparsifier
        keeping all d coordinates cannot tell the two kinds of round apart by k_max, and needs
        not: its own rows are dense too, so a dense "identity" row is admitted in every round.
        The quantizers (every row dense, values on a packed code) and the identity run admit
        their own compressor only; so does a door built without the run's compressor (`spec`).
        """
        name, spec = self.compressor, self.spec
        if spec is None or name == "identity" or name in PACKED_COMPRESSORS:
            return "compressed"
        total = self.dim if self.shard is None else self.shard.total
        if self.k_max(min(round, self.rounds)) < total:
            return "compressed"
        return "uncompressed" if spec.k < total else "either"

    def receive(self, row: int, round: int, seq: int, update: pb.SparseUpdate) -> Update:
        """The wire checks of one update claimed for `round`; Rejected if any fails."""
        k_max = self.k_max(min(round, self.rounds))
        encoded = update.SerializeToString()  # what the log keeps; its length is the size
        vec = validate_update(
            update,
            dim=self.dim,
            k_max=k_max,
            compressor=self.compressor,
            max_bytes=max_update_bytes(min(k_max, self.dim)),
            spec=self.spec,
            row=row,
            size=len(encoded),
            shard=self.shard,
            admits=self.admits(round),
            permk_seed=self._permk_seed(round),
        )
        if update.packed:  # the codes and the float32 scale
            wire_bytes = len(update.packed) + (4 if update.HasField("scale") else 0)
        else:
            wire_bytes = message_bytes(vec.nnz, VALUE_BYTES[update.dtype])
        return Update(row, round, seq, vec, wire_bytes, encoded)

    def _permk_seed(self, round: int) -> int | None:
        """The seed a Perm-K update of `round` must carry, where this door knows the run seed."""
        if self.seed is None or not isinstance(self.spec, PermK):
            return None
        return self.spec.round_seed(self.seed, round)

    def replayed(self, row: int, round: int, seq: int, encoded: bytes) -> Update:
        """An update read back from the write-ahead log, through the same wire checks as when
        it arrived (so replay refuses exactly what live traffic would have)."""
        update = pb.SparseUpdate.FromString(encoded)
        return self.receive(row, round, seq, update)

    def refused_rows(
        self, rule: ServerRule, rows: Tensor, messages: SparseBatch, round: int
    ) -> Tensor:
        """Positions i of `messages` (computed at `round`) the door refuses: more entries than
        the round's k_max, or whose absorption would leave worker row `rows[i]` with a
        non-finite value in its server state (or that hold one themselves). The simulator's
        whole door: its messages never cross a wire."""
        if messages.nnz > self.k_max(min(round, self.rounds)):
            return torch.arange(messages.num_rows)
        admissible = rule.admissible(rows, messages, round)
        if admissible.device.type == "cpu":  # numpy: a fraction of nonzero()'s per-call cost
            return torch.from_numpy(np.flatnonzero(~admissible.numpy()))
        return (~admissible).nonzero().flatten().cpu()  # positions, beside the CPU's batches

    def admit(self, rule: ServerRule, update: Update) -> None:
        """Rejected when the rule cannot apply `update` now, computed for a round whose kind has
        passed (OUT_OF_RANGE, `ServerRule.late_refusal`: a MARINA update whose round's coin is
        not the open round's), or when applying it would make its sender's state non-finite
        (INVALID_ARGUMENT); the state is not touched either way.

        The finiteness check asks the rule with the update's round; `absorb` runs with the
        round open now. The two compute the same thing because no rule's absorb depends on the
        round except through what `late_refusal` requires to agree (MARINA's coin)."""
        late = rule.late_refusal(update.round)
        if late is not None:
            raise Rejected(Refusal.OUT_OF_RANGE, late)
        vec = update.vector
        batch = SparseBatch(vec.indices[None], vec.values[None], vec.dim, _seeds(vec))
        if self.refused_rows(rule, torch.tensor([update.row]), batch, update.round).numel():
            _invalid(
                "applying this update would make the sender's server-side state non-finite "
                "(float32 overflow)"
            )


def _seeds(vec: SparseVector) -> tuple[int, ...] | None:
    return None if vec.seed is None else (vec.seed,)


# ----------------------------------------------------------------------------------------------
# Exactly-once sequence numbers
# ----------------------------------------------------------------------------------------------


class SeqDecision(enum.Enum):
    """What to do with a well-sequenced update."""

    APPLY = "apply"  # the next expected seq: validate, apply, then commit()
    DUPLICATE = "duplicate"  # already applied: acknowledge again, change nothing


class SeqLedger:
    """Per worker row, the last acknowledged sequence number (0: none yet; seqs start at 1).

    Two steps so a failure in between changes nothing: `check` classifies a seq without touching
    the ledger, `commit` advances it once the update has been applied. Not thread-safe: the
    caller serializes check → apply → commit per worker (it must anyway, for the apply).
    """

    def __init__(self) -> None:
        self._last: dict[int, int] = {}

    def last(self, row: int) -> int:
        """The last acknowledged seq of worker `row` (0 for a worker never acknowledged)."""
        return self._last.get(row, 0)

    def check(self, row: int, seq: int) -> SeqDecision:
        """APPLY for last + 1, DUPLICATE for seq ≤ last; Rejected for seq < 1 (INVALID_ARGUMENT)
        or a gap, seq > last + 1 (FAILED_PRECONDITION: the worker must resync from last_seq)."""
        if seq < 1:
            _invalid(f"seq {seq}: sequence numbers start at 1")
        last = self.last(row)
        if seq <= last:
            return SeqDecision.DUPLICATE
        if seq > last + 1:
            raise Rejected(
                Refusal.FAILED_PRECONDITION,
                f"seq {seq} leaves a gap: last acknowledged is {last}, expected {last + 1}",
            )
        return SeqDecision.APPLY

    def commit(self, row: int, seq: int) -> None:
        """Record `seq` as applied; it must be the next expected one (else a caller bug)."""
        expected = self.last(row) + 1
        if seq != expected:
            raise ValueError(f"commit of seq {seq} for worker {row}, expected {expected}")
        self._last[row] = seq

    def state_dict(self) -> dict[str, Any]:
        return {"last_seq": dict(self._last)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace the ledger with a checkpointed one (checked: int rows, non-negative int seqs)."""
        last = state["last_seq"]

        def whole(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if not isinstance(last, Mapping) or not all(whole(w) and whole(s) for w, s in last.items()):
            raise ValueError("last_seq must map worker rows to non-negative ints")
        self._last = dict(last)
