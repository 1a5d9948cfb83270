"""Write-ahead log: every accepted update and every round close, on disk before the Ack.

Why a log on top of checkpoints: a checkpoint every K rounds is cheap, but a crash between two of
them must not lose acknowledged updates — a worker commits g_i += c_i once it sees the Ack, so the
server must be able to redo every acknowledged message. Each record is appended with one
os.write on an unbuffered descriptor, so it is in the kernel (and survives kill -9 of the process)
before the Ack leaves; `fsync=True` also makes it survive a power loss.

File layout: an 80-byte header (magic, start round, config digest), then records
    <u32 length of body> <u32 CRC-32 of body> <body>
with body = one kind byte and its fields (little-endian):
    UPDATE: <u64 seq> <u64 round> <u32 worker row> <serialized SparseUpdate as received>
    CLOSE:  <u64 round>   (the round that closed)
A torn or corrupt record (short read, bad CRC) ends the readable log: replay stops there with a
warning and the file is truncated before new records are appended.
"""

from __future__ import annotations

import enum
import os
import struct
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path

#: "2": records name the worker by its row (version 1, "BYZPSWAL", by its id string).
MAGIC = b"BYZPSWL2"
_HEADER = struct.Struct("<8sQ64s")  # magic, start round, config digest (hex sha256)
_RECORD = struct.Struct("<II")  # body length, CRC-32 of body
_UPDATE = struct.Struct("<BQQI")  # kind, seq, round, worker row
_CLOSE = struct.Struct("<BQ")  # kind, round
#: No legal body comes near this (an update is bounded by the server's max_update_bytes); a
#: larger length can only be a torn or corrupt header, and must not make the reader allocate.
MAX_RECORD_BYTES = 1 << 31


class WalError(ValueError):
    """A log that cannot be used at all (foreign file, other run config)."""


class Kind(enum.IntEnum):
    UPDATE = 1
    CLOSE = 2


@dataclass(frozen=True)
class UpdateRecord:
    row: int
    seq: int
    round: int
    update: bytes  # the SparseUpdate exactly as received, serialized


@dataclass(frozen=True)
class CloseRecord:
    round: int


Record = UpdateRecord | CloseRecord


def encode_record(record: Record) -> bytes:
    if isinstance(record, UpdateRecord):
        body = _UPDATE.pack(Kind.UPDATE, record.seq, record.round, record.row) + record.update
    else:
        body = _CLOSE.pack(Kind.CLOSE, record.round)
    return _RECORD.pack(len(body), zlib.crc32(body)) + body


def _decode_body(body: bytes) -> Record:
    kind = body[0]
    if kind == Kind.UPDATE:
        _, seq, round, row = _UPDATE.unpack_from(body)
        return UpdateRecord(row, seq, round, body[_UPDATE.size :])
    if kind == Kind.CLOSE:
        _, round = _CLOSE.unpack(body)
        return CloseRecord(round)
    raise ValueError(f"unknown record kind {kind}")


@dataclass
class WalContents:
    start_round: int
    digest: str
    records: list[Record]
    valid_bytes: int  # length of the readable prefix (header + whole records)
    torn: bool  # something unreadable followed the readable prefix


def read_wal(path: Path) -> WalContents:
    """Every whole, CRC-checked record of `path`; stops with a warning at a torn or corrupt one."""
    data = path.read_bytes()
    if len(data) < _HEADER.size:
        raise WalError(f"{path}: {len(data)} bytes, shorter than the log header")
    magic, start_round, digest = _HEADER.unpack_from(data)
    if magic != MAGIC:
        older = (
            " (an older byzps wrote it; resume with that version)" if magic == b"BYZPSWAL" else ""
        )
        raise WalError(f"{path}: not a byzps write-ahead log of this version{older}")
    records: list[Record] = []
    pos = _HEADER.size
    while pos < len(data):
        problem = None
        if len(data) - pos < _RECORD.size:
            problem = "incomplete record header"
        else:
            length, crc = _RECORD.unpack_from(data, pos)
            body = data[pos + _RECORD.size : pos + _RECORD.size + length]
            if length == 0 or length > MAX_RECORD_BYTES or len(body) < length:
                problem = f"incomplete record ({len(body)} of {length} bytes)"
            elif zlib.crc32(body) != crc:
                problem = "CRC mismatch"
            else:
                try:
                    records.append(_decode_body(body))
                except (ValueError, struct.error) as exc:
                    problem = f"undecodable record: {exc}"
        if problem is not None:
            warnings.warn(
                f"{path}: ignoring {len(data) - pos} bytes from offset {pos}: {problem}",
                stacklevel=2,
            )
            return WalContents(start_round, digest.decode(), records, pos, True)
        pos += _RECORD.size + length
    return WalContents(start_round, digest.decode(), records, pos, False)


class WriteAheadLog:
    """An append-only log file; `append` returns once the record is in the kernel."""

    def __init__(self, path: Path, fd: int, fsync: bool) -> None:
        self.path = path
        self._fd = fd
        self._fsync = fsync

    @classmethod
    def create(
        cls, path: Path, start_round: int, digest: str, *, fsync: bool = False
    ) -> WriteAheadLog:
        """A new, empty log (header written and fsynced with its directory entry)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        _write_all(fd, _HEADER.pack(MAGIC, start_round, digest.encode()))
        os.fsync(fd)
        fsync_dir(path.parent)
        return cls(path, fd, fsync)

    @classmethod
    def reopen(cls, path: Path, valid_bytes: int, *, fsync: bool = False) -> WriteAheadLog:
        """Continue an existing log after its readable prefix (cutting off a torn tail)."""
        fd = os.open(path, os.O_WRONLY | os.O_APPEND)
        os.ftruncate(fd, valid_bytes)
        os.fsync(fd)
        return cls(path, fd, fsync)

    def append(self, record: Record) -> None:
        _write_all(self._fd, encode_record(record))
        if self._fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.fsync(self._fd)
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def fsync_dir(path: Path) -> None:
    """Make a rename or a new file in `path` durable (a no-op where directories can't be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
