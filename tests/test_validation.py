"""Validation at the door: each malformed update gets the right gRPC code and reason; SeqLedger."""

from __future__ import annotations

import ast
import copy
from pathlib import Path
from typing import Any

import configs
import pytest
import torch

from byzps.common.codec import compressor_name, encode_sparse
from byzps.common.components import build_run_estimator
from byzps.common.compressors import randk_indices
from byzps.common.config import RunConfig
from byzps.common.server_rules import build_server_rule
from byzps.common.shards import ShardLayout
from byzps.common.sparse import INDEX_DTYPE, SparseBatch, SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.daemon import build_door
from byzps.server.engine import build_server_parts
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
from byzps.worker.session import encode_row

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
        later = next(r for r in range(1, 100) if not server_rule.is_full(r))
        for r in range(later):  # open `later` itself: the door refuses a coin the round lacks
            server_rule.close_round(server_rule.candidates[1].clone(), r)
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
def test_the_door_refuses_unknown_fields_inside_an_update(over: int) -> None:
    """Serialization keeps unknown fields, so the log would keep them too: a Byzantine worker
    padding each accepted update up to max_update_bytes made its records 64× an honest one's
    (scaled sign at d = 1e6), which every group commit and every resume then carried. Within
    the limit the padding is refused INVALID_ARGUMENT; one byte past it, RESOURCE_EXHAUSTED
    before anything is parsed."""
    from byzps.worker.byzantine.forge import unknown_field

    door = Door(DIM, "topk", lambda r: K, rounds=10)
    plain = encode_sparse(
        SparseVector(torch.arange(K, dtype=INDEX_DTYPE), torch.ones(K), DIM), compressor="topk"
    )
    door.receive(0, 0, 1, plain)
    extra = max_update_bytes(K) - plain.ByteSize() + over  # padding bytes, tag and length included
    padding = next(p for n in range(extra, -1, -1) if len(p := unknown_field(n)) == extra)
    padded = pb.SparseUpdate.FromString(plain.SerializeToString() + padding)
    assert len(padded.SerializeToString()) == max_update_bytes(K) + over
    with pytest.raises(Rejected, match="does not know" if not over else "limit") as info:
        door.receive(0, 0, 1, padded)
    expected = Refusal.RESOURCE_EXHAUSTED if over else Refusal.INVALID_ARGUMENT
    assert info.value.code == expected


def test_a_dense_update_spelling_out_its_indices_is_refused() -> None:
    """A dense row's indices are implied; spelled out, they would double what the log keeps of
    an identity row for nothing."""
    door = Door(DIM, "identity", lambda r: DIM, rounds=10)
    vec = SparseVector(torch.arange(DIM, dtype=INDEX_DTYPE), torch.ones(DIM), DIM)
    door.receive(0, 0, 1, encode_sparse(vec, compressor="identity"))
    explicit = encode_sparse(vec, compressor="identity", omit_dense_indices=False)
    with pytest.raises(Rejected, match="carries none, they are implied"):
        door.receive(0, 0, 1, explicit)


# ----------------------------------------------------------------------------------------------
# Byz-VR-MARINA: a dense 'identity' row in its full-gradient rounds, the run's compressor in the
# others (Door.admits), and a late update checked under the coin it is applied with
# ----------------------------------------------------------------------------------------------

#: With run seed 3 and p = 0.5, MARINA's shared coin makes these rounds (of 0 … 11) full.
MARINA_FULL = (0, 2, 3, 5, 11)


def marina_run(
    compressor: dict[str, object], algorithm: str = "byz-vr-marina", aggregator: str = "cm"
) -> tuple[RunConfig, Any, Any, Door]:
    """The config, task, engine and door of a small MARINA run, built as the daemon builds them."""
    run = configs.small_config(seed=3, rounds=12, k=4, aggregator=aggregator, pre=())
    run["algorithm"] = {"name": algorithm, "lr": 0.5, "params": {"p": 0.5}}
    run["compressor"] = compressor
    config = RunConfig.from_dict(run)
    task, engine, max_nnz = build_server_parts(config)
    return config, task, engine, build_door(config, task, max_nnz)


def dense_identity(dim: int, value: float = 0.5, nnz: int | None = None) -> pb.SparseUpdate:
    n = dim if nnz is None else nnz
    vec = SparseVector(torch.arange(n, dtype=INDEX_DTYPE), torch.full((n,), value), dim)
    return encode_sparse(vec, compressor="identity")


def randk_row(dim: int, k: int, seed: int, value: float = 0.5) -> pb.SparseUpdate:
    vec = SparseVector(randk_indices(dim, k, seed), torch.full((k,), value), dim, seed)
    return encode_sparse(vec, compressor="randk")


def test_the_marina_coin_is_the_door_s_and_the_rule_s() -> None:
    _, _, engine, door = marina_run({"name": "randk", "k": 4})
    full = tuple(r for r in range(12) if engine.rule.is_full(r))
    assert full == MARINA_FULL
    assert [door.admits(r) for r in range(12)] == [
        "uncompressed" if r in full else "compressed" for r in range(12)
    ]


@pytest.mark.parametrize("compressor", [{"name": "randk", "k": 4}, {"name": "permk"}])
def test_the_door_admits_every_message_of_an_honest_marina_worker(
    compressor: dict[str, object],
) -> None:
    """What byzps worker sends (ByzVRMarina's messages through session.encode_row): a dense row
    declared 'identity' in the full-gradient rounds, the run's compressor in the others."""
    config, task, engine, door = marina_run(compressor)
    estimator = build_run_estimator(config, task, door.spec, [0])  # type: ignore[arg-type]
    oracle = task.oracle([0], config.run.seed)
    x = task.init_params(config.run.seed)
    for r in range(7):
        message = estimator.message(x, oracle, r)
        wire = pb.SparseUpdate.FromString(encode_row(message.row(0), config, estimator.compressor))
        full = r in MARINA_FULL
        assert compressor_name(wire.compressor) == ("identity" if full else compressor["name"])
        update = door.receive(0, r, r + 1, wire)
        assert update.vector.nnz == (task.dim if full else door.spec.k)  # type: ignore[union-attr]
        door.admit(engine.rule, update)
        engine.absorb(torch.tensor([0]), _batch(update))
        engine.close_round()


def test_an_identity_row_is_refused_outside_a_full_gradient_round() -> None:
    """In a compressed round a dense row is over the round's size limit (k entries) before
    anything else is read; a short 'identity' row — a way round the Rand-k seed check — is
    refused by name."""
    _, task, _, door = marina_run({"name": "randk", "k": 4})
    d = task.dim
    door.receive(0, 2, 1, dense_identity(d))  # round 2 is full
    with pytest.raises(Rejected) as info:
        door.receive(0, 1, 1, dense_identity(d))  # round 1 is not
    size = dense_identity(d).ByteSize()
    assert info.value.code == Refusal.RESOURCE_EXHAUSTED
    assert info.value.reason == f"update is {size} bytes, limit {max_update_bytes(4)}"
    with pytest.raises(Rejected) as info:
        door.receive(0, 1, 1, dense_identity(d, nnz=4))
    assert info.value.code == INVALID
    assert info.value.reason == (
        "compressor 'identity' but this run uses 'randk': a dense uncompressed row is admitted "
        "only in a full-gradient round, and the update's round is not one"
    )
    door.receive(0, 1, 1, randk_row(d, 4, seed=9))  # the run's compressor is, seed checked
    with pytest.raises(Rejected, match="not the Rand-k selection of seed 10"):
        door.receive(0, 1, 1, changed(randk_row(d, 4, seed=9), seed=10))


def test_a_full_gradient_round_admits_the_dense_identity_row_only() -> None:
    """An honest worker's full-round message is dense_batch(∇f_i(x)): every coordinate, no
    seed, declared 'identity'. A Rand-k row is none of that — sparse or dense, it is refused,
    and so is an 'identity' row missing coordinates."""
    _, task, _, door = marina_run({"name": "randk", "k": 4})
    d = task.dim
    expected = (
        "compressor 'randk' in a full-gradient round, whose messages travel uncompressed: only a "
        "dense 'identity' row is admitted"
    )
    for update in (randk_row(d, 4, seed=9), randk_row(d, d, seed=9)):
        with pytest.raises(Rejected) as info:
            door.receive(0, 2, 1, update)
        assert (info.value.code, info.value.reason) == (INVALID, expected)
    with pytest.raises(Rejected) as info:
        door.receive(0, 2, 1, dense_identity(d, nnz=d - 1))
    assert info.value.reason == f"an uncompressed 'identity' update must carry all {d} " + (
        f"coordinates, not {d - 1}"
    )
    dense_topk = SparseVector(torch.arange(d, dtype=INDEX_DTYPE), torch.ones(d), d)
    with pytest.raises(Rejected, match="'topk' in a full-gradient round"):
        door.receive(0, 2, 1, encode_sparse(dense_topk, compressor="topk"))


def test_estimators_that_always_compress_admit_their_compressor_only() -> None:
    """Byz-DASHA-PAGE shares MARINA's kind of coin but compresses every message (its server
    rule is "state"), so no round of it admits an 'identity' row."""
    _, task, _, door = marina_run({"name": "randk", "k": 4}, algorithm="byz-dasha-page")
    assert {door.admits(r) for r in range(12)} == {"compressed"}
    with pytest.raises(Rejected, match="limit 96"):
        door.receive(0, 0, 1, dense_identity(task.dim))
    with pytest.raises(Rejected, match="compressor 'identity' but this run uses 'randk'"):
        door.receive(0, 0, 1, dense_identity(task.dim, nnz=4))


def test_marina_under_a_quantizer_admits_the_quantizer_only() -> None:
    """Every QSGD row is dense, so k_max cannot tell a full round from another: the worker
    sends its full gradient on QSGD's code (session.encode_row) and the door admits just that."""
    _, task, _, door = marina_run({"name": "qsgd", "params": {"levels": 4}})
    assert {door.admits(r) for r in range(12)} == {"compressed"}
    with pytest.raises(Rejected, match="compressor 'identity' but this run uses 'qsgd'"):
        door.receive(0, 0, 1, dense_identity(task.dim))


def test_a_sparsifier_keeping_every_coordinate_admits_both_dense_forms() -> None:
    """Rand-k with k = d: its own rows are dense, so k_max is d in every round and the door
    cannot (and need not) tell the full rounds apart: a dense 'identity' row carries nothing a
    Rand-d row could not, and both are admitted in every round."""
    _, task, _, door = marina_run({"name": "randk", "k": 123})
    d = task.dim
    assert {door.admits(r) for r in range(12)} == {"either"}
    for r in (1, 2):
        door.receive(0, r, 1, dense_identity(d))
        door.receive(0, r, 1, randk_row(d, d, seed=5))


def test_each_shard_admits_its_part_of_a_dense_full_round_row() -> None:
    config, task, _, _ = marina_run({"name": "randk", "k": 4})
    _, _, max_nnz = build_server_parts(config)
    layout = ShardLayout(task.dim, 2)
    doors = [build_door(config, task, max_nnz, layout.shard(s)) for s in range(2)]
    parts = layout.split(dense_identity(task.dim))
    for door, part in zip(doors, parts, strict=True):
        assert door.receive(0, 0, 1, part).vector.nnz == door.dim
        with pytest.raises(Rejected, match="limit 96"):  # round 1 is compressed
            door.receive(0, 1, 1, part)


def marina_update(door: Door, round: int, update: pb.SparseUpdate, row: int = 4) -> Update:
    return door.receive(row, round, round + 1, update)


def test_a_late_marina_update_is_checked_under_the_coin_absorb_applies() -> None:
    """The door asked MarinaRule.admissible with the round an update claims while the engine
    absorbs it with the round open now. A dense +FLT_MAX claiming a past full round (base 0:
    finite) arriving in a compressed round (base ĝ ≈ 1e32) passed the check and made its
    sender's candidate +inf. The door now refuses an update whose round's coin is not the open
    round's (OUT_OF_RANGE, as an update after the run: an honest worker carries on), and checks
    the rest with the very base absorb uses; a refusal changes nothing."""
    _, task, engine, door = marina_run({"name": "randk", "k": 4}, aggregator="mean")
    rule, d = engine.rule, task.dim
    rows = torch.arange(5)
    # Round 0 (full): four small gradients and a 5e32 one: ĝ⁰ ≈ 1e32 under the mean.
    for row, value in enumerate([0.01] * 4 + [5e32]):
        update = marina_update(door, 0, dense_identity(d, value), row)
        door.admit(rule, update)
        engine.absorb(rows[row : row + 1], _batch(update))
    engine.close_round()
    assert engine.round == 1 and not rule.is_full(1)
    assert float(engine.last_aggregate.min()) > 9e31
    flt_max = float(torch.finfo(torch.float32).max)

    # A full-round update (claiming round 0) in compressed round 1.
    late = marina_update(door, 0, dense_identity(d, flt_max))
    assert bool(rule.admissible(rows[4:], _batch(late), 0).all())  # what the door used to ask
    applied = copy.deepcopy(rule)
    applied.absorb(rows[4:], _batch(late), engine.round)  # what absorb would then have done
    assert not bool(torch.isfinite(applied.candidates[4]).all())
    before = {k: v.clone() for k, v in rule.state_dict().items() if torch.is_tensor(v)}
    with pytest.raises(Rejected) as info:
        door.admit(rule, late)
    assert info.value.code == Refusal.OUT_OF_RANGE
    assert info.value.reason == (
        "round 0 is a full-gradient round and round 1, open now, is a compressed one: MARINA "
        "applies a message under its own round's coin, so this one can no longer be applied"
    )
    after = {k: v for k, v in rule.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(before[k], after[k]) for k in before)

    # A compressed-round update in round 1 itself: checked against ĝ⁰, the base absorb adds.
    with pytest.raises(Rejected, match="non-finite") as info:
        door.admit(rule, marina_update(door, 1, randk_row(d, 4, seed=9, value=flt_max)))
    assert info.value.code == INVALID
    after = {k: v for k, v in rule.state_dict().items() if torch.is_tensor(v)}
    assert all(torch.equal(before[k], after[k]) for k in before)

    # A late compressed-round update in a later compressed round: admitted, and absorbed onto
    # the open round's base, exactly the candidate the door checked.
    engine.close_round()  # round 1 closes: 2 (full) opens
    with pytest.raises(Rejected, match="round 1 is a compressed round and round 2") as info:
        door.admit(rule, marina_update(door, 1, randk_row(d, 4, seed=9)))
    assert info.value.code == Refusal.OUT_OF_RANGE
    engine.close_round()
    engine.close_round()  # 4 (compressed) opens
    assert engine.round == 4 and not rule.is_full(4)
    update = marina_update(door, 1, randk_row(d, 4, seed=9))
    door.admit(rule, update)
    engine.absorb(rows[4:], _batch(update))
    expected = engine.last_aggregate.clone()
    expected[update.vector.indices.long()] += update.vector.values
    assert torch.equal(rule.candidates[4], expected)


def _batch(update: Update) -> SparseBatch:
    vec = update.vector
    seeds = None if vec.seed is None else (vec.seed,)
    return SparseBatch(vec.indices[None], vec.values[None], vec.dim, seeds)
