"""The write-ahead log's direct-I/O path (server.wal._DirectAppender) against the buffered one.

Direct writes must start on block boundaries, so the log's last partial block is rewritten with
every append and the file ends in zero padding until it is closed. These tests hold the two
paths to the same bytes and the same records, across chunked groups, reopening after a crash,
and torn writes.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

import byzps.server.wal as wal_module
from byzps.server.wal import (
    DIRECT_BLOCK,
    CloseRecord,
    UpdateRecord,
    WriteAheadLog,
    read_wal,
)

DIGEST = "e" * 64


def records(count: int, seed: int = 0) -> list[UpdateRecord | CloseRecord]:
    out: list[UpdateRecord | CloseRecord] = []
    for i in range(count):
        size = [1, 5, 4095, 4096, 4097, 20_000, 70_001][(i + seed) % 7]
        out.append(UpdateRecord(i % 5, i + 1, i // 5, os.urandom(size)))
        if i % 5 == 4:
            out.append(CloseRecord(i // 5))
    return out


@pytest.fixture
def small_staging(monkeypatch: pytest.MonkeyPatch) -> None:
    """A staging buffer of 3 blocks, so that groups go out in several chunked writes."""
    monkeypatch.setattr(wal_module, "DIRECT_STAGING", 3 * DIRECT_BLOCK)


def create(path: Path, direct: bool, monkeypatch: pytest.MonkeyPatch) -> WriteAheadLog:
    monkeypatch.setenv(wal_module.DIRECT_ENV, "1" if direct else "0")
    log = WriteAheadLog.create(path, 3, DIGEST)
    if direct and not log.direct:
        log.close()
        pytest.skip("this filesystem refuses O_DIRECT: the buffered path is the one in use")
    assert log.direct == direct
    return log


@pytest.mark.usefixtures("small_staging")
def test_direct_and_buffered_logs_hold_the_same_bytes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    written = records(60)
    paths = {}
    for direct in (True, False):
        paths[direct] = tmp_path / f"{direct}.log"
        log = create(paths[direct], direct, monkeypatch)
        for start in range(0, len(written), 9):  # groups of several records, some over 3 blocks
            log.write(written[start : start + 9])
            log.sync()
        if direct:  # before the close: whole blocks on disk, zero padding after the last record
            assert paths[direct].stat().st_size % DIRECT_BLOCK == 0
            contents = read_wal(paths[direct])
            assert contents.records == written and not contents.torn
        log.close()
    assert paths[True].read_bytes() == paths[False].read_bytes()  # close drops the padding
    assert read_wal(paths[True]).records == written


@pytest.mark.usefixtures("small_staging")
def test_a_direct_log_reopened_after_a_crash_goes_on_after_its_last_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wal.log"
    first, second = records(23), records(17, seed=3)
    log = create(path, True, monkeypatch)
    log.write(first)
    os.close(log._appender.fd)  # type: ignore[union-attr]  # killed: no close, padding stays
    contents = read_wal(path)
    assert contents.records == first and not contents.torn
    again = WriteAheadLog.reopen(path, contents.valid_bytes)
    assert again.direct
    again.write(second)
    again.close()
    assert read_wal(path).records == first + second


def test_a_torn_direct_write_ends_the_log_at_the_last_whole_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "wal.log"
    acknowledged, lost = records(10), records(10, seed=5)
    log = create(path, True, monkeypatch)
    log.write(acknowledged)
    log.sync()
    end = log._appender.end  # type: ignore[union-attr]
    log.write(lost)
    os.close(log._appender.fd)  # type: ignore[union-attr]
    # the crash tore the second group: a block in its middle never reached the disk
    data = bytearray(path.read_bytes())
    hole = (end // DIRECT_BLOCK + 2) * DIRECT_BLOCK
    data[hole : hole + DIRECT_BLOCK] = bytes(DIRECT_BLOCK)
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="ignoring"):
        contents = read_wal(path)
    assert contents.torn
    assert contents.records[: len(acknowledged)] == acknowledged  # nothing acknowledged lost
    assert len(contents.records) < len(acknowledged) + len(lost)


def test_zeros_past_one_block_are_a_torn_tail_not_padding(tmp_path: Path) -> None:
    path = tmp_path / "wal.log"
    log = WriteAheadLog.create(path, 0, DIGEST)
    log.write(records(3))
    log.close()
    clean = path.read_bytes()
    path.write_bytes(clean + bytes(DIRECT_BLOCK - 1))
    contents = read_wal(path)
    assert not contents.torn and contents.valid_bytes == len(clean)
    path.write_bytes(clean + bytes(DIRECT_BLOCK))
    with pytest.warns(UserWarning, match="ignoring 4096 bytes"):
        assert read_wal(path).torn
