"""The tensor file (byzps.common.tensorfile) and the worker's two-slot checkpoint built on it.

A checkpoint file is read after crashes and may be torn or tampered with: every damage must be
refused with TensorFileError (never a wrong tensor, never an allocation the file dictates), and a
torn newest slot must leave the previous checkpoint readable.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import crc32c
import pytest
import torch

from byzps.common import tensorfile
from byzps.common.tensorfile import TensorFileError
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.worker import checkpoint as ckpt

PREFIX = struct.Struct("<8sQI")


def sample_tree() -> dict:
    special = torch.tensor([float("nan"), float("inf"), -float("inf"), -0.0, 0.0, 1e-45])
    return {
        "estimator": {
            "v": torch.randn(1, 1000),
            "g": torch.randn(3, 5, dtype=torch.float64),
            "special": special,
            "steps": 7,
            "x_prev": None,
        },
        "ints": torch.arange(-5, 5, dtype=torch.int32),
        "mask": torch.tensor([True, False, True]),
        "bf16": torch.randn(17).to(torch.bfloat16),
        "scalar": torch.tensor(2.5),
        "empty": torch.empty(0, 4),
        "blob": b"\x00\x01wire bytes",
        "meta": {"name": "w", "ratio": 0.25, "flags": [1, "two", None, True]},
    }


def assert_same(a: object, b: object) -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64, 1: torch.uint8}[a.element_size()]
        assert torch.equal(a.view(bits), b.view(bits))  # bit for bit, NaN included
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys()
        for k in a:
            assert_same(a[k], b[k])
    elif isinstance(a, list):
        assert isinstance(b, list) and len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same(x, y)
    else:
        assert a == b and type(a) is type(b)


def test_a_tree_round_trips_bit_for_bit(tmp_path: Path) -> None:
    tree = sample_tree()
    path = tmp_path / "t.bin"
    tensorfile.write_in_place(path, tree)
    back = tensorfile.read(path)
    assert_same(tree, back)  # NaN, ±inf, −0.0 and subnormals keep their bits
    assert path.read_bytes().startswith(tensorfile.MAGIC)


def test_overwriting_in_place_with_less_shrinks_the_file(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    tensorfile.write_in_place(path, {"x": torch.randn(100_000)})
    big = path.stat().st_size
    tensorfile.write_in_place(path, {"x": torch.ones(10)})
    assert path.stat().st_size < big // 100
    assert torch.equal(tensorfile.read(path)["x"], torch.ones(10))


def test_unstorable_values_are_refused_before_writing(tmp_path: Path) -> None:
    path = tmp_path / "t.bin"
    with pytest.raises(TypeError, match="cannot store a set"):
        tensorfile.write_in_place(path, {"bad": {1, 2}})
    with pytest.raises(TypeError, match="keys must be strings"):
        tensorfile.write_in_place(path, {"bad": {1: 2}})
    with pytest.raises(TypeError, match="complex64"):
        tensorfile.write_in_place(path, {"bad": torch.zeros(2, dtype=torch.complex64)})
    assert not path.exists()


def raw(tree: dict) -> bytes:
    return b"".join(bytes(b) for b in tensorfile.encode(tree))


def with_header(data: bytes, edit) -> bytes:
    """`data` with its JSON header changed by `edit` and every checksum made valid again: what
    a deliberate forger, not a torn write, would produce."""
    magic, length, _ = PREFIX.unpack_from(data)
    header = json.loads(data[PREFIX.size : PREFIX.size + length])
    payload = bytearray(data[PREFIX.size + length :])
    edit(header, payload)
    header["payload_bytes"] = len(payload)
    header["crc32c"] = crc32c.crc32c(bytes(payload))
    body = json.dumps(header).encode()
    return PREFIX.pack(magic, len(body), crc32c.crc32c(body)) + body + bytes(payload)


def set_entry(i: int, **fields):
    def edit(header: dict, payload: bytearray) -> None:
        header["table"][i].update(fields)

    return edit


@pytest.mark.parametrize(
    ("damage", "match"),
    [
        (lambda d: d[:-1], "payload damaged or cut short"),
        (lambda d: d[:100], "cut short"),
        (lambda d: d[:10], "not a byzps tensor file|cut short"),
        (lambda d: b"PK\x03\x04" + d[4:], "not a byzps tensor file"),
        (lambda d: d[:-3] + bytes([d[-3] ^ 1]) + d[-2:], "payload damaged"),
        (lambda d: d[:30] + bytes([d[30] ^ 1]) + d[31:], "header damaged"),
        (lambda d: with_header(d, set_entry(0, shape=[10**9])), "does not fit"),
        (lambda d: with_header(d, set_entry(0, shape=[-1, -1000])), "does not fit"),
        (lambda d: with_header(d, set_entry(0, dtype="object")), "unknown dtype"),
        (lambda d: with_header(d, set_entry(0, offset=10**12)), "outside the payload"),
        (lambda d: with_header(d, set_entry(0, nbytes=10**12)), "outside the payload"),
        (
            lambda d: with_header(d, lambda h, p: h.update(tree={"x": {"__tensor__": 99}})),
            "bad payload reference",
        ),
    ],
    ids=[
        "last byte cut",
        "cut to 100 bytes",
        "cut to 10 bytes",
        "zip magic",
        "payload bit flipped",
        "header bit flipped",
        "huge shape",
        "negative shape",
        "foreign dtype",
        "offset past the end",
        "length past the end",
        "dangling reference",
    ],
)
def test_damaged_or_forged_files_are_refused(tmp_path: Path, damage, match: str) -> None:
    data = raw({"x": torch.arange(16, dtype=torch.float32), "n": 3})
    path = tmp_path / "t.bin"
    path.write_bytes(damage(data))
    with pytest.raises(TensorFileError, match=match):
        tensorfile.read(path)


# --- the worker's checkpoint slots ----------------------------------------------------------


def worker_checkpoint(step: int) -> ckpt.WorkerCheckpoint:
    values = struct.pack("<4f", step, 0, 0, 1)
    update = pb.SparseUpdate(dim=4, nnz=4, values=values).SerializeToString()
    return ckpt.WorkerCheckpoint(
        worker_id="3",
        config_digest="d" * 64,
        estimator={"g": torch.full((1, 4), float(step)), "steps": step},
        last_seq=step,
        next_round=step + 1,
        pending=ckpt.Pending(step + 1, step, update),
    )


def test_saves_alternate_between_two_slots_and_load_takes_the_newest(tmp_path: Path) -> None:
    store = ckpt.CheckpointStore(tmp_path)
    assert store.load() is None
    for step in range(1, 6):
        store.save(worker_checkpoint(step))
        assert len(list(tmp_path.iterdir())) == min(step, 2)  # two slots, nothing else
        saved = ckpt.load(tmp_path)  # a fresh reader, as after a restart
        assert saved is not None and saved.last_seq == step
        assert (
            saved.pending is not None
            and saved.pending.update == worker_checkpoint(step).pending.update
        )  # type: ignore[union-attr]
        assert torch.equal(saved.estimator["g"], torch.full((1, 4), float(step)))
    # a restarted worker's store goes on from the newest generation, never back
    ckpt.CheckpointStore(tmp_path).save(worker_checkpoint(6))
    assert ckpt.load(tmp_path).last_seq == 6  # type: ignore[union-attr]


def test_a_torn_newest_slot_leaves_the_previous_checkpoint(tmp_path: Path) -> None:
    store = ckpt.CheckpointStore(tmp_path)
    for step in (1, 2, 3):
        store.save(worker_checkpoint(step))
    newest = max(
        (tmp_path / n for n in ckpt.SLOT_NAMES),
        key=lambda p: tensorfile.read(p)["generation"],
    )
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])  # a crash in mid-write
    saved = ckpt.load(tmp_path)
    assert saved is not None and saved.last_seq == 2
    # the next save overwrites the torn slot, not the intact one
    ckpt.CheckpointStore(tmp_path).save(worker_checkpoint(4))
    assert ckpt.load(tmp_path).last_seq == 4  # type: ignore[union-attr]
    for p in tmp_path.iterdir():
        tensorfile.read(p)  # both intact again


def test_a_checkpoint_written_by_torch_save_is_still_read(tmp_path: Path) -> None:
    old = worker_checkpoint(9)
    torch.save(old.to_dict(), tmp_path / ckpt.LEGACY_NAME)
    saved = ckpt.load(tmp_path)
    assert saved is not None and saved.last_seq == 9 and saved.pending is not None
    assert saved.pending.update == old.pending.update  # type: ignore[union-attr]
    ckpt.CheckpointStore(tmp_path).save(worker_checkpoint(10))  # the slots take over
    assert ckpt.load(tmp_path).last_seq == 10  # type: ignore[union-attr]


@pytest.mark.parametrize("policy", ["every", "none"])
def test_the_worker_checkpoint_fsync_policy_reaches_the_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, policy: str
) -> None:
    """`byzps worker --checkpoint-fsync` decides whether each save waits for the disk: `every`
    fdatasyncs every save, `none` never does (the page cache still survives a process crash), and
    either way the newest save is what load returns."""
    from click.testing import CliRunner

    from byzps.cli.main import main as cli

    synced: list[int] = []
    real = tensorfile.os.fdatasync
    monkeypatch.setattr(tensorfile.os, "fdatasync", lambda fd: (synced.append(fd), real(fd)))
    store = ckpt.CheckpointStore(tmp_path, fsync=policy == "every")
    for step in range(3):
        store.save(worker_checkpoint(step))
    assert len(synced) == (3 if policy == "every" else 0)
    assert ckpt.load(tmp_path).last_seq == 2  # type: ignore[union-attr]
    bad = CliRunner().invoke(cli, ["worker", "--id", "0", "--checkpoint-fsync", "sometimes"])
    assert bad.exit_code == 2 and "--checkpoint-fsync" in bad.output
