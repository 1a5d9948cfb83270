"""Write-ahead log: every accepted update and every round close, on disk before the Ack.

Why a log on top of checkpoints: a checkpoint every K rounds is cheap, but a crash between two of
them must not lose acknowledged updates — a worker commits g_i += c_i once it sees the Ack, so the
server must be able to redo every acknowledged message.

Group commit (`LogWriter`): the coordinator only queues a record under its lock and gets a
ticket; one writer thread takes everything queued so far, checksums it and writes it with one
os.writev on an unbuffered descriptor — or, where the filesystem allows it, with direct I/O
past the page cache (`_DirectAppender` says why) — fsyncing it too under the `group` policy, and
a push is acknowledged only once the write holding its record returned. So an acknowledged
record is in the kernel (and survives kill -9 of the process) under every policy, while pushes
that arrive while a write is in flight share the next one. What each `FsyncPolicy` adds for a
power loss is in docs/durability.md.

File layout: an 80-byte header (magic, start round, config digest), then records
    <u32 length of body> <u32 CRC-32C of body> <body>
with body = one kind byte and its fields (little-endian):
    UPDATE: <u64 seq> <u64 round> <u32 worker row> <serialized SparseUpdate as received>
    CLOSE:  <u64 round>   (the round that closed)
A torn or corrupt record (short read, bad CRC) ends the readable log: replay stops there with a
warning and the file is truncated before new records are appended. Zero bytes from the last record
to the end, fewer than a block, are a direct writer's padding and end the log cleanly (no record
is empty, so a record can never start with them). Logs of the previous version
("BYZPSWL2", CRC-32 from zlib) are still read, so a run can be resumed across the upgrade.
"""

from __future__ import annotations

import enum
import mmap
import os
import struct
import threading
import warnings
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import crc32c

from byzps.common.fileio import fsync_dir, write_all, writev_all

#: "3": records checksummed with CRC-32C ("2": CRC-32 of zlib; "1", "BYZPSWAL": rows by id string).
MAGIC = b"BYZPSWL3"
MAGIC_V2 = b"BYZPSWL2"
_HEADER = struct.Struct("<8sQ64s")  # magic, start round, config digest (hex sha256)
_RECORD = struct.Struct("<II")  # body length, CRC of body
_UPDATE = struct.Struct("<BQQI")  # kind, seq, round, worker row
_CLOSE = struct.Struct("<BQ")  # kind, round
#: No legal body comes near this (an update is bounded by the server's max_update_bytes); a
#: larger length can only be a torn or corrupt header, and must not make the reader allocate.
MAX_RECORD_BYTES = 1 << 31

Checksum = Callable[..., int]  # (data, running value) -> CRC
_CHECKSUMS: dict[bytes, Checksum] = {MAGIC: crc32c.crc32c, MAGIC_V2: zlib.crc32}


class WalError(ValueError):
    """A log that cannot be used at all (foreign file, other run config)."""


class Kind(enum.IntEnum):
    UPDATE = 1
    CLOSE = 2


class FsyncPolicy(enum.Enum):
    """When the log is fsynced (every policy writes a record to the kernel before its Ack)."""

    NONE = "none"  # only at checkpoints and shutdown
    ROUND = "round"  # also each round's close record, before the round's model is served
    GROUP = "group"  # also every group write, before the Acks of the pushes in it


@dataclass(frozen=True)
class UpdateRecord:
    row: int
    seq: int
    round: int
    update: bytes  # the SparseUpdate exactly as received, serialized


@dataclass(frozen=True)
class CloseRecord:
    round: int
    #: On a shard of a sharded server: the sums the close received from its peers
    #: (byzps.server.shard_peer.pack_arrays), so that replaying it needs no peers. Empty
    #: otherwise (and in logs written before shards existed).
    sums: bytes = b""


Record = UpdateRecord | CloseRecord


def _record_parts(record: Record, checksum: Checksum) -> list[bytes]:
    """The record's bytes as buffers for writev: header and fields, then the payload uncopied.
    ValueError for a record `read_wal` would not read back (over MAX_RECORD_BYTES): written,
    it and every record after it would be cut off as a torn tail at the next resume."""
    if isinstance(record, UpdateRecord):
        fields = _UPDATE.pack(Kind.UPDATE, record.seq, record.round, record.row)
        payload = record.update
    else:
        fields = _CLOSE.pack(Kind.CLOSE, record.round)
        payload = record.sums
    size = len(fields) + len(payload)
    if size > MAX_RECORD_BYTES:
        raise ValueError(f"a log record of {size} bytes, over the {MAX_RECORD_BYTES} readable")
    head = _RECORD.pack(size, checksum(payload, checksum(fields, 0))) + fields
    return [head, payload] if payload else [head]


def encode_record(record: Record) -> bytes:
    return b"".join(_record_parts(record, _CHECKSUMS[MAGIC]))


def _decode_body(body: bytes) -> Record:
    kind = body[0]
    if kind == Kind.UPDATE:
        _, seq, round, row = _UPDATE.unpack_from(body)
        return UpdateRecord(row, seq, round, body[_UPDATE.size :])
    if kind == Kind.CLOSE:
        _, round = _CLOSE.unpack_from(body)
        return CloseRecord(round, body[_CLOSE.size :])
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
    checksum = _CHECKSUMS.get(magic)
    if checksum is None:
        older = (
            " (an older byzps wrote it; resume with that version)" if magic == b"BYZPSWAL" else ""
        )
        raise WalError(f"{path}: not a byzps write-ahead log of this version{older}")
    records: list[Record] = []
    pos = _HEADER.size
    view = memoryview(data)
    while pos < len(data):
        problem = None
        rest = len(data) - pos
        if rest < DIRECT_BLOCK and data.count(0, pos) == rest:
            break  # a direct writer's zero padding to its block boundary: the clean end
        if len(data) - pos < _RECORD.size:
            problem = "incomplete record header"
        else:
            length, crc = _RECORD.unpack_from(data, pos)
            body = view[pos + _RECORD.size : pos + _RECORD.size + length]
            if length == 0 or length > MAX_RECORD_BYTES or len(body) < length:
                problem = (
                    f"a record length of {length} bytes, over the {MAX_RECORD_BYTES} a record "
                    "may have"
                    if length > MAX_RECORD_BYTES
                    else f"incomplete record ({len(body)} of {length} bytes)"
                )
            elif checksum(body, 0) != crc:
                problem = "CRC mismatch"
            else:
                try:
                    records.append(_decode_body(bytes(body)))
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


#: The unit of direct I/O: offsets, lengths and buffer addresses are multiples of it (4 KiB
#: covers devices with 512-byte and with 4-KiB logical blocks).
DIRECT_BLOCK = 4096
#: The staging buffer of direct writes; a longer group goes out in several writes of this size.
DIRECT_STAGING = 32 << 20
#: BYZPS_WAL_DIRECT=0 makes every log buffered (the fallback path, and a way to compare).
DIRECT_ENV = "BYZPS_WAL_DIRECT"


class _BufferedAppender:
    """Appends through the page cache (O_APPEND, one writev per group)."""

    direct = False

    def __init__(self, fd: int) -> None:
        self.fd = fd

    def append(self, parts: Sequence[bytes]) -> None:
        writev_all(self.fd, parts)

    def close(self) -> None:
        """Nothing to release: the log closes the descriptor."""


class _DirectAppender:
    """Appends with O_DIRECT from an aligned staging buffer, bypassing the page cache.

    Why: every byte appended through the page cache needs a fresh cache page, and on the
    project's VMs that costs ~4 ms of kernel CPU per MB — 340 ms for a round of 20 dense pushes
    at d = 1e6, more than a whole Flower round — where direct writes cost ~5 ms of CPU and wait
    only for the device. The price is a copy into the staging buffer and the alignment rule:
    each write starts at a block boundary, so the last partial block of the log is kept in
    memory (`tail`) and written again, followed by the new records, at the next append; the
    file ends in zero padding up to a block boundary, which `read_wal` reads as the clean end.
    Rewriting that block is safe for what it already held: its first bytes are rewritten with
    the same bytes, so a crash mid-write leaves them intact whatever part of the block landed.
    """

    direct = True

    def __init__(self, fd: int, end: int, tail: bytes) -> None:
        self.fd = fd
        self.end = end  # the logical length: header and whole records, no padding
        self._staging = mmap.mmap(-1, DIRECT_STAGING)  # page-aligned, reused: no page faults
        self._view = memoryview(self._staging)
        self._tail = tail  # the bytes of the log's last, partial block

    def append(self, parts: Sequence[bytes]) -> None:
        start = self.end - len(self._tail)  # a block boundary
        fill = len(self._tail)
        self._view[:fill] = self._tail
        for part in parts:
            part = memoryview(part).cast("B")
            while part.nbytes:
                n = min(part.nbytes, DIRECT_STAGING - fill)
                self._view[fill : fill + n] = part[:n]
                fill += n
                part = part[n:]
                if fill == DIRECT_STAGING:  # full: write it all, start the next chunk
                    _pwrite_all(self.fd, self._view[:fill], start)
                    start += fill
                    fill = 0
        whole = fill - fill % DIRECT_BLOCK
        padded = whole + (DIRECT_BLOCK if fill > whole else 0)
        self._view[fill:padded] = bytes(padded - fill)
        if padded:
            _pwrite_all(self.fd, self._view[:padded], start)
        self._tail = bytes(self._view[whole:fill])
        self.end = start + fill

    def close(self) -> None:
        os.ftruncate(self.fd, self.end)  # drop the padding of a cleanly closed log
        try:
            self._view.release()
            self._staging.close()
        except BufferError:  # a slice is still held by a failed write's traceback: GC frees it
            pass


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while data.nbytes:
        written = os.pwrite(fd, data, offset)
        data, offset = data[written:], offset + written


def _direct_appender(path: Path, end: int, tail: bytes) -> _DirectAppender | None:
    """A direct appender for `path`, or None where direct I/O is off or unsupported (a
    filesystem without O_DIRECT, such as some tmpfs or FUSE mounts, refuses it with EINVAL)."""
    if not hasattr(os, "O_DIRECT") or os.environ.get(DIRECT_ENV, "1") == "0":
        return None
    try:
        fd = os.open(path, os.O_WRONLY | os.O_DIRECT)
    except OSError:
        return None
    appender = _DirectAppender(fd, end, tail)
    try:
        appender.append([])  # rewrites the tail block: proves the filesystem takes direct writes
    except OSError:
        appender.close()
        os.close(fd)
        return None
    return appender


class WriteAheadLog:
    """An append-only log file; `append` / `write` return once the records are in the kernel
    (with direct I/O: on the device; see _DirectAppender)."""

    def __init__(
        self, path: Path, appender: _BufferedAppender | _DirectAppender, fsync: bool, magic: bytes
    ) -> None:
        self.path = path
        self._appender: _BufferedAppender | _DirectAppender | None = appender
        self._fsync = fsync
        self._checksum = _CHECKSUMS[magic]

    @property
    def direct(self) -> bool:
        return self._appender is not None and self._appender.direct

    @classmethod
    def _open(cls, path: Path, end: int, fsync: bool, magic: bytes) -> WriteAheadLog:
        """Append after the first `end` bytes of `path` (durable already): directly where the
        filesystem allows it, else through the page cache."""
        block_start = end - end % DIRECT_BLOCK
        with path.open("rb") as fh:
            fh.seek(block_start)
            tail = fh.read(end - block_start)
        appender = _direct_appender(path, end, tail)
        if appender is None:
            appender = _BufferedAppender(os.open(path, os.O_WRONLY | os.O_APPEND))
        return cls(path, appender, fsync, magic)

    @classmethod
    def create(
        cls, path: Path, start_round: int, digest: str, *, fsync: bool = False
    ) -> WriteAheadLog:
        """A new, empty log (header written and fsynced with its directory entry)."""
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            write_all(fd, _HEADER.pack(MAGIC, start_round, digest.encode()))
            os.fsync(fd)
        finally:
            os.close(fd)
        fsync_dir(path.parent)
        return cls._open(path, _HEADER.size, fsync, MAGIC)

    @classmethod
    def reopen(cls, path: Path, valid_bytes: int, *, fsync: bool = False) -> WriteAheadLog:
        """Continue an existing log after its readable prefix (cutting off a torn tail or
        padding); records are checksummed the way its header says."""
        with path.open("rb") as fh:
            magic = fh.read(len(MAGIC))
        fd = os.open(path, os.O_WRONLY)
        try:
            os.ftruncate(fd, valid_bytes)
            os.fsync(fd)
        finally:
            os.close(fd)
        return cls._open(path, valid_bytes, fsync, magic if magic in _CHECKSUMS else MAGIC)

    def append(self, record: Record) -> None:
        self.write([record])
        if self._fsync:
            self.sync()

    def write(self, records: Sequence[Record]) -> None:
        """Append `records` (one writev, or a few staged direct writes); no fsync."""
        assert self._appender is not None, "the log is closed"
        parts = [part for record in records for part in _record_parts(record, self._checksum)]
        if parts:
            self._appender.append(parts)

    def sync(self) -> None:
        assert self._appender is not None, "the log is closed"
        os.fdatasync(self._appender.fd)

    def close(self) -> None:
        appender, self._appender = self._appender, None
        if appender is None:
            return
        appender.close()
        os.fsync(appender.fd)
        os.close(appender.fd)


class LogWriter:
    """Group commit: records queued by `submit` are appended, in order, by one writer thread.

    `submit` returns a ticket (1, 2, …); `wait(t)` returns once every record up to ticket t is in
    the kernel (and fsynced where the policy says so), or raises the OSError that stopped the
    writer — after which nothing more is written, since the caller's state ran ahead of the disk.
    Everything queued while one write is in flight goes out in the next, so the log costs one
    writev per burst of pushes instead of one write per push under the coordinator's lock; the
    checksums are computed on the writer thread too (crc32c and os.writev release the GIL).
    `rotate` queues a switch to a new log file: records queued before it go to the old file
    (which is then fsynced and closed), records after it to the new one.
    """

    def __init__(self, wal: WriteAheadLog, policy: FsyncPolicy) -> None:
        self._wal = wal
        self._policy = policy
        self._cond = threading.Condition()
        self._queue: list[Record | Callable[[], WriteAheadLog]] = []
        self._queued = 0
        self._written = 0
        self._error: OSError | None = None
        self._stopping = False
        self._thread = threading.Thread(target=self._run, name="byzps-wal", daemon=True)
        self._thread.start()

    @property
    def last_ticket(self) -> int:
        """The ticket of the newest queued record (0: none yet)."""
        return self._queued

    def submit(self, record: Record) -> int:
        return self._put(record)

    def rotate(self, open_next: Callable[[], WriteAheadLog]) -> int:
        """Switch to the log `open_next()` creates, after every record queued so far."""
        return self._put(open_next)

    def _put(self, item: Record | Callable[[], WriteAheadLog]) -> int:
        with self._cond:
            if self._error is not None:
                raise self._error
            if self._stopping:
                raise RuntimeError("the write-ahead log is closed")
            self._queue.append(item)
            self._queued += 1
            self._cond.notify_all()
            return self._queued

    def done(self, ticket: int) -> bool:
        with self._cond:
            return self._written >= ticket

    def wait(self, ticket: int) -> None:
        with self._cond:
            while self._written < ticket and self._error is None:
                self._cond.wait()
            if self._written < ticket:
                assert self._error is not None
                raise self._error

    def flush(self) -> None:
        self.wait(self._queued)

    def close(self) -> None:
        """Write what is queued, stop the thread, fsync and close the file."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._thread.join()
        self._wal.close()
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                batch, self._queue = self._queue, []
                last = self._written + len(batch)
            try:
                self._write(batch)
            except OSError as exc:
                with self._cond:
                    self._error = exc
                    self._cond.notify_all()
                return
            with self._cond:
                self._written = last
                self._cond.notify_all()

    def _write(self, batch: list[Record | Callable[[], WriteAheadLog]]) -> None:
        pending: list[Record] = []
        closes = False
        for item in batch:
            if callable(item):
                self._wal.write(pending)
                pending = []
                self._wal.close()  # fsyncs the old file: the new one must never get ahead of it
                self._wal = item()
                continue
            pending.append(item)
            closes = closes or isinstance(item, CloseRecord)
        if pending:
            self._wal.write(pending)
        if self._policy is FsyncPolicy.GROUP or (self._policy is FsyncPolicy.ROUND and closes):
            self._wal.sync()
