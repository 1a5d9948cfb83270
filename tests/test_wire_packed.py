"""Packed quantizer updates and the new sparsifiers on the wire: every compressor's message
decodes to exactly the values the worker's error feedback committed, the packed form has its
exact byte length, and the door refuses every malformed packed update with a precise reason."""

from __future__ import annotations

import pytest
import torch

from byzps.common.codec import WireFormatError, decode_sparse, encode_sparse, encode_update
from byzps.common.compressors import PermK, Quantizer, build_compressor, codes
from byzps.common.compressors.base import Compressor
from byzps.common.server_rules import build_server_rule
from byzps.common.sparse import SparseBatch, SparseVector
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.validation import Door, Refusal, Rejected, validate_update

N = 4
SPECS: list[tuple[str, dict]] = [
    ("qsgd", {"levels": 1}),
    ("qsgd", {"levels": 5}),
    ("natural", {}),
    ("natural-dithering", {"levels": 6}),
    ("sign", {}),
    ("permk", {}),
    ("topk", {"ratio": 0.1, "values": "float16"}),
    ("randk", {"ratio": 0.1, "values": "bfloat16"}),
    ("identity", {"values": "float16"}),
]


def compressor(name: str, dim: int, **params: object) -> Compressor:
    return build_compressor(name, dim, num_workers=N, **params)


def messages(comp: Compressor, z: torch.Tensor, round: int = 4) -> SparseBatch:
    seeds = comp.row_seeds(11, range(z.shape[0]), round) if comp.seeded else None
    return comp.compress(z, seeds, list(range(z.shape[0])))


def wire(msg: pb.SparseUpdate) -> pb.SparseUpdate:
    return pb.SparseUpdate.FromString(msg.SerializeToString())


@pytest.mark.parametrize("dim", [1, 123, 4097])
@pytest.mark.parametrize(("name", "params"), SPECS)
def test_every_row_decodes_to_the_bits_it_was_committed_with(
    name: str, params: dict, dim: int
) -> None:
    comp = compressor(name, dim, **params)
    z = torch.randn(N, dim, generator=torch.Generator().manual_seed(dim)) * 10.0
    z[0, : dim // 2] = 0.0
    batch = messages(comp, z)
    if comp.ef_factor != 1.0:  # what the error-feedback estimators send: still on the code
        batch = comp.scaled(batch, comp.ef_factor)
    for row, vec in enumerate(batch.rows()):
        msg = wire(encode_update(vec, comp))
        got = validate_update(msg, dim=dim, k_max=comp.k, compressor=name, spec=comp, row=row)
        assert torch.equal(got.indices, vec.indices)
        assert torch.equal(got.values, vec.values), name  # bit for bit, −0.0 included
        if isinstance(comp, Quantizer):
            bits = codes.NATURAL_BITS if name == "natural" else 1
            if comp.levels:
                bits = codes.level_bits(comp.levels)
            assert len(msg.packed) == codes.packed_bytes(dim, bits)
            assert not msg.indices and not msg.values
        elif comp.values != "float32":
            assert len(msg.values) == 2 * vec.nnz


@pytest.mark.parametrize("name", ["qsgd", "natural", "natural-dithering", "sign"])
def test_a_rescaled_row_is_rounded_onto_the_code(name: str) -> None:
    """The Byzantine cohort rescales its messages (dropping the scale): still encodable."""
    comp = compressor(name, 50, **({"levels": 4} if "qsgd" in name else {}))
    vec = messages(comp, torch.randn(1, 50)).row(0)
    off = SparseVector(vec.indices, vec.values * (8 / 9), 50)
    got = decode_sparse(wire(encode_update(off, comp)))
    assert bool(torch.isfinite(got.values).all())
    assert torch.equal(torch.signbit(got.values[got.values != 0]),
                       torch.signbit(off.values[got.values != 0]))  # fmt: skip
    assert float((got.values - off.values).norm()) <= 0.5 * float(off.values.norm())


def packed(name: str = "qsgd", dim: int = 10, levels: int = 3) -> pb.SparseUpdate:
    comp = compressor(name, dim, **({"levels": levels} if name == "qsgd" else {}))
    return encode_update(messages(comp, torch.randn(1, dim)).row(0), comp)


def changed(msg: pb.SparseUpdate, clear: tuple[str, ...] = (), **fields: object) -> pb.SparseUpdate:
    out = pb.SparseUpdate()
    out.CopyFrom(msg)
    for name in clear:
        out.ClearField(name)
    for name, value in fields.items():
        setattr(out, name, value)
    return out


def level_over_s() -> pb.SparseUpdate:
    msg = packed(levels=2)  # codes of 2 level bits + 1 sign bit: the field holds 3 > s = 2
    raw = bytearray(msg.packed)
    raw[0] = (raw[0] & ~0b111) | 0b011
    return changed(msg, packed=bytes(raw))


def nonzero_padding() -> pb.SparseUpdate:
    msg = packed(levels=3)  # 10 codes · 3 bits = 30 bits: 2 padding bits in the last byte
    raw = bytearray(msg.packed)
    raw[-1] |= 0x80
    return changed(msg, packed=bytes(raw))


def natural_inf() -> pb.SparseUpdate:
    return changed(packed("natural"), packed=codes.pack_codes(torch.full((10,), 0xFF).numpy(), 9))


BAD = {
    "short packed": (lambda: changed(packed(), packed=packed().packed[:-1]), "packed: 3 bytes"),
    "long packed": (lambda: changed(packed(), packed=packed().packed + b"\0"), "expected"),
    "padding": (nonzero_padding, "padding"),
    "level > s": (level_over_s, "exceeds levels"),
    "inf scale": (lambda: changed(packed(), scale=float("inf")), "scale"),
    "negative scale": (lambda: changed(packed(), scale=-1.0), "scale"),
    "no scale": (lambda: changed(packed(), clear=("scale",)), "scale: required"),
    "natural with scale": (lambda: changed(packed("natural"), scale=1.0), "not allowed"),
    "natural inf": (natural_inf, "exponent 255"),
    "sign with levels": (lambda: changed(packed("sign"), levels=2), "levels"),
    "qsgd zero levels": (lambda: changed(packed(), levels=0), "levels"),
    "sparse qsgd": (lambda: changed(packed(), nnz=9), "dense"),
    "pairs in qsgd": (lambda: changed(packed(), values=b"\0" * 40), "pairs"),
    "seed in qsgd": (lambda: changed(packed(), seed=3), "seed"),
    "float16 qsgd": (lambda: changed(packed(), dtype=pb.VALUE_DTYPE_FLOAT16), "dtype"),
    "packed topk": (lambda: changed(topk(), packed=b"\1"), "only"),
    "scaled topk": (lambda: changed(topk(), scale=2.0), "only"),
}


def topk() -> pb.SparseUpdate:
    vec = SparseVector(torch.tensor([1, 4], dtype=torch.int32), torch.tensor([1.0, 2.0]), 10)
    return encode_sparse(vec, compressor="topk")


@pytest.mark.parametrize("case", list(BAD))
def test_malformed_packed_updates_are_refused(case: str) -> None:
    build, match = BAD[case]
    msg = build()
    with pytest.raises(WireFormatError, match=match):
        decode_sparse(msg)
    with pytest.raises(Rejected, match=match) as info:
        validate_update(msg, dim=10, k_max=10)
    assert info.value.code is Refusal.INVALID_ARGUMENT


def test_the_door_holds_qsgd_to_the_runs_levels_and_permk_to_the_senders_block() -> None:
    dim = 12
    spec = compressor("qsgd", dim, levels=3)
    door = Door(dim, "qsgd", lambda r: dim, rounds=5, spec=spec)
    door.receive(0, 0, 1, packed(dim=dim, levels=3))
    with pytest.raises(Rejected, match="s = 3"):
        door.receive(0, 0, 1, packed(dim=dim, levels=4))
    # Judged by its count before its codes are decoded (which cost more the more levels):
    # codes that do not even fit their count get the levels refusal too.
    with pytest.raises(Rejected, match="levels 65535 but this run's qsgd uses s = 3"):
        door.receive(0, 0, 1, changed(packed(dim=dim, levels=3), levels=65535))
    dither = compressor("natural-dithering", dim, levels=5)
    door = Door(dim, "natural-dithering", lambda r: dim, rounds=5, spec=dither)
    msg = encode_update(messages(dither, torch.randn(1, dim)).row(0), dither)
    door.receive(0, 0, 1, msg)
    with pytest.raises(Rejected, match="s = 5"):
        door.receive(0, 0, 1, changed(msg, levels=7))
    perm = compressor("permk", dim)
    assert isinstance(perm, PermK)
    door = Door(dim, "permk", lambda r: perm.k, rounds=5, spec=perm)
    batch = messages(perm, torch.randn(N, dim))
    updates = [encode_update(v, perm) for v in batch.rows()]
    door.receive(2, 0, 1, updates[2])
    with pytest.raises(Rejected, match="worker 1's Perm-K block"):
        door.receive(1, 0, 1, updates[2])  # another worker's block
    with pytest.raises(Rejected, match="without a seed"):
        door.receive(2, 0, 1, changed(updates[2], clear=("seed",)))
    # A door that knows the run seed (11, `messages`) admits only each round's shared seed.
    door = Door(dim, "permk", lambda r: perm.k, rounds=5, spec=perm, seed=11)
    door.receive(2, 4, 1, updates[2])
    with pytest.raises(Rejected, match="is not its round's shared seed"):
        door.receive(2, 3, 1, updates[2])
    with pytest.raises(ValueError, match="spec"):
        Door(dim, "permk", lambda r: 3, rounds=5)


def test_packed_update_counts_its_packed_bytes_and_admits_into_state() -> None:
    dim = 123
    door = Door(dim, "sign", lambda r: dim, rounds=5, spec=compressor("sign", dim))
    upd = door.receive(0, 0, 1, packed("sign", dim))
    assert upd.wire_bytes == 16 + 4  # ⌈123/8⌉ bits of signs + the float32 scale
    door.admit(build_server_rule("state", 2, dim), upd)


def test_every_compressor_has_a_wire_id_and_workers_send_its_form() -> None:
    from configs import small_config

    from byzps.common.codec import COMPRESSOR_IDS
    from byzps.common.compressors import COMPRESSORS
    from byzps.common.config import RunConfig
    from byzps.worker.session import encode_row

    assert set(COMPRESSOR_IDS) == set(COMPRESSORS.names())
    config = RunConfig.from_dict(small_config())
    qsgd = compressor("qsgd", 123, levels=2)
    msg = pb.SparseUpdate.FromString(
        encode_row(messages(qsgd, torch.randn(1, 123)).row(0), config, qsgd)
    )
    assert msg.compressor == pb.COMPRESSOR_QSGD and msg.packed and msg.levels == 2
    half = compressor("topk", 123, k=3, values="float16")
    msg = pb.SparseUpdate.FromString(
        encode_row(messages(half, torch.randn(1, 123)).row(0), config, half)
    )
    assert msg.dtype == pb.VALUE_DTYPE_FLOAT16 and len(msg.values) == 6
