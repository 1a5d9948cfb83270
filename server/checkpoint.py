"""Checkpoints and the log that follows each one: the server's durable state on disk.

A directory holds numbered generations:  ckpt-000003.pt  +  wal-000003.log  is "the state at
checkpoint 3, then everything accepted since". Generation 0 is written at a fresh start, so a
crash before the first periodic checkpoint still recovers from the log. A checkpoint of state S
starts the next log exactly after the records S covers, and is written atomically (temp file,
fsync, rename, fsync of the directory) — on a background thread for the periodic ones, from a
snapshot — so at every instant the newest readable checkpoint plus the logs from its generation
on describe every acknowledged update exactly once: until the new checkpoint is renamed into
place, a resume starts from the previous one and replays the old log and the new one. The two
newest written checkpoints are kept, with the logs from the older one on; older generations are
deleted only after a newer checkpoint is on disk.

Checkpoints are torch.save'd dicts of tensors and plain values, loaded with weights_only=True, so
a tampered file can hold no code.

One more file, `opened.json`, belongs to the run rather than to a generation: written once, when
the run opens its first round (`record_open`), it holds the rows registered then. Registrations
are not logged, and round 0's pushes are accepted before it opens, so without it a resume at
round 0 could not tell a run that had started from one still waiting for its workers, nor
remember a worker that registered and never pushed (see Coordinator.start).
"""

from __future__ import annotations

import json
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byzps.common.fileio import replace_durably
from byzps.server.wal import (
    FsyncPolicy,
    LogWriter,
    Record,
    WalError,
    WriteAheadLog,
    read_wal,
)

FORMAT = 1
_CKPT = re.compile(r"ckpt-(\d{6})\.pt")
_WAL = re.compile(r"wal-(\d{6})\.log")
KEEP_GENERATIONS = 2
OPENED = "opened.json"


class CheckpointError(ValueError):
    """The directory cannot be resumed from (other run config, unreadable state)."""


def _ckpt_name(gen: int) -> str:
    return f"ckpt-{gen:06d}.pt"


def _wal_name(gen: int) -> str:
    return f"wal-{gen:06d}.log"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that a crash leaves either the old file or the whole new one."""
    replace_durably(path, lambda fh: torch.save(state, fh))


def load_checkpoint(path: Path) -> dict[str, Any]:
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ValueError(f"{path}: not a byzps checkpoint of format {FORMAT}")
    return state


@dataclass
class Recovered:
    """What a resume starts from: a checkpoint (None: the initial state) and the log after it."""

    generation: int
    state: dict[str, Any] | None
    records: list[Record]
    #: The rows registered when the run opened its first round, each with its last-seen time
    #: then (`CheckpointStore.record_open`); None when no open is on record (the run had not
    #: opened it yet, or predates the record).
    opened: dict[int, float] | None = None


class CheckpointStore:
    """Generations of checkpoint + log in one directory, for one run config (`digest`).

    Records go to the log through a `LogWriter` (group commit, see byzps.server.wal): `append`
    queues one and returns its ticket, `wait(ticket)` returns once it is on disk."""

    def __init__(
        self,
        directory: Path,
        digest: str,
        *,
        fsync: FsyncPolicy = FsyncPolicy.GROUP,
    ) -> None:
        self.directory = directory
        self.digest = digest
        self.fsync = fsync
        self.generation = -1
        self._writer: LogWriter | None = None
        self._background: threading.Thread | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def _generations(self, pattern: re.Pattern[str]) -> list[int]:
        found = (pattern.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def has_state(self) -> bool:
        return bool(self._generations(_CKPT) or self._generations(_WAL))

    def clear(self) -> None:
        """Delete every generation and the record of the open (a fresh run in a directory that
        held an old one)."""
        for p in self.directory.iterdir():
            if _CKPT.fullmatch(p.name) or _WAL.fullmatch(p.name) or p.name == OPENED:
                p.unlink()
        for leftover in self._unfinished():
            leftover.unlink()

    def _unfinished(self) -> list[Path]:
        """Temporary files of checkpoints and of the record of the open that a crash left
        behind (`replace_durably` renames them once written): a checkpoint's is named after
        its generation, so each crash during one left another, about a checkpoint in size,
        until a fresh start; nothing writes them while the store starts."""
        return [
            p
            for p in self.directory.iterdir()
            if p.name.endswith(".pt.tmp") or p.name == OPENED + ".tmp"
        ]

    def record_open(self, registered: dict[int, float]) -> None:
        """Record, durably (temp file, fsync, rename, fsync of the directory), that the run
        opened its first round with the rows of `registered` (row: last-seen wall time)
        registered. OSError if it could not be written."""
        rows = {str(row): seen for row, seen in sorted(registered.items())}
        body = {"format": FORMAT, "config_digest": self.digest, "registered": rows}
        replace_durably(self.directory / OPENED, lambda fh: fh.write(json.dumps(body).encode()))

    def _recorded_open(self) -> dict[int, float] | None:
        """The rows of `record_open`, or None (none recorded; an unreadable or foreign record is
        ignored with a warning: the resume then waits for registrations as a first start does)."""
        path = self.directory / OPENED
        if not path.exists():
            return None
        try:
            body = json.loads(path.read_text())
            if body.get("config_digest") != self.digest:
                raise ValueError(f"it belongs to run config {body.get('config_digest')}")
            return {int(row): float(seen) for row, seen in body["registered"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"{path}: ignored ({exc})", stacklevel=2)
            return None

    # --- resume ---------------------------------------------------------------------------

    def recover(self) -> Recovered:
        """The newest loadable checkpoint and every log record after it, in order.

        Raises CheckpointError for a checkpoint or log of another run config, and for a corrupt
        log that is not the last one (records after the damage could not be trusted). Deletes
        the temporary files of writes a crash cut short (`_unfinished`)."""
        for leftover in self._unfinished():
            leftover.unlink()
        state: dict[str, Any] | None = None
        generation = 0
        for gen in reversed(self._generations(_CKPT)):
            path = self.directory / _ckpt_name(gen)
            try:
                state = load_checkpoint(path)
            except Exception as exc:  # a torn checkpoint: fall back to the previous generation
                warnings.warn(f"{path}: unreadable ({exc}); trying an older one", stacklevel=2)
                continue
            generation = gen
            break
        if state is not None and state.get("config_digest") != self.digest:
            raise CheckpointError(
                f"config digest: checkpoint {_ckpt_name(generation)} belongs to run config "
                f"{state.get('config_digest')}, this config is {self.digest}; refusing to resume"
            )
        logs = [g for g in self._generations(_WAL) if g >= generation]
        if state is None and logs and logs[0] != 0:
            raise CheckpointError(
                f"checkpoint: no readable checkpoint for {_wal_name(logs[0])} to replay onto"
            )
        records: list[Record] = []
        valid = 0
        for i, gen in enumerate(logs):
            path = self.directory / _wal_name(gen)
            try:
                contents = read_wal(path)
            except WalError as exc:
                raise CheckpointError(f"write-ahead log: {exc}") from None
            if contents.digest != self.digest:
                raise CheckpointError(
                    f"config digest: {path.name} belongs to run config {contents.digest}, "
                    f"this config is {self.digest}; refusing to resume"
                )
            if contents.torn and i < len(logs) - 1:
                raise CheckpointError(f"write-ahead log: {path.name} is corrupt before its end")
            records.extend(contents.records)
            valid = contents.valid_bytes
        if logs:
            self.generation = logs[-1]
            wal = WriteAheadLog.reopen(self.directory / _wal_name(logs[-1]), valid)
            self._writer = LogWriter(wal, self.fsync)
        else:
            self.generation = generation
        return Recovered(generation, state, records, self._recorded_open())

    # --- running --------------------------------------------------------------------------

    def append(self, record: Record) -> int:
        """Queue one record for the log; its ticket for `wait`. Raises the OSError that stopped
        the writer (the caller must stop: state ran ahead of disk)."""
        if self._writer is None:
            raise RuntimeError("no open write-ahead log; checkpoint first")
        return self._writer.submit(record)

    @property
    def last_ticket(self) -> int:
        return 0 if self._writer is None else self._writer.last_ticket

    def wait(self, ticket: int) -> None:
        """Return once record `ticket` is on disk (per the fsync policy); OSError if it never
        will be."""
        if self._writer is not None and ticket > 0:
            self._writer.wait(ticket)

    def done(self, ticket: int) -> bool:
        return self._writer is None or self._writer.done(ticket)

    def _rotate(self, round: int) -> int:
        """Start the next generation's log after every record queued so far; its number."""
        gen = self.generation + 1
        path = self.directory / _wal_name(gen)

        def open_next() -> WriteAheadLog:
            return WriteAheadLog.create(path, round, self.digest)

        if self._writer is None:
            self._writer = LogWriter(open_next(), self.fsync)
        else:
            self._writer.rotate(open_next)
        self.generation = gen
        return gen

    def _write_checkpoint(self, gen: int, state: dict[str, Any]) -> Path:
        path = self.directory / _ckpt_name(gen)
        save_atomic({"format": FORMAT, "config_digest": self.digest, **state}, path)
        self._drop_old()
        return path

    def _drop_old(self) -> None:
        """Delete the checkpoints older than the KEEP_GENERATIONS newest written ones, and the
        logs older than the oldest checkpoint kept (a resume from it replays them all)."""
        written = self._generations(_CKPT)
        if len(written) <= KEEP_GENERATIONS:
            return
        oldest = written[-KEEP_GENERATIONS]
        for old in written:
            if old < oldest:
                (self.directory / _ckpt_name(old)).unlink(missing_ok=True)
        for old in self._generations(_WAL):
            if old < oldest:
                (self.directory / _wal_name(old)).unlink(missing_ok=True)

    def checkpoint(self, state: dict[str, Any], round: int) -> Path:
        """Write the next generation's checkpoint now and start its log (waits for a checkpoint
        still being written in the background first)."""
        self.wait_background()
        gen = self._rotate(round)
        assert self._writer is not None
        self._writer.flush()  # the new log exists: records after `state` can only go there
        return self._write_checkpoint(gen, state)

    def checkpoint_in_background(
        self,
        state: dict[str, Any],
        round: int,
        done: Callable[[Path | None, BaseException | None], None],
    ) -> bool:
        """Start the next generation's log now and write `state` (a snapshot: nothing else may
        hold its tensors) as its checkpoint on a thread; `done(path, error)` is called there.

        False, and nothing happens, while the previous one is still being written: that round's
        checkpoint is skipped rather than waited for, since waiting would stall the round, and
        skipping loses nothing (the log goes on growing in the current generation, and the next
        due checkpoint covers it). Until the new checkpoint is on disk a resume starts from the
        previous one and replays both logs; the older generations are deleted only after it."""
        if self._background is not None and self._background.is_alive():
            return False
        gen = self._rotate(round)

        def write() -> None:
            try:
                path = self._write_checkpoint(gen, state)
            except BaseException as exc:  # reported to `done`; the previous checkpoint stays
                done(None, exc)
            else:
                done(path, None)

        self._background = threading.Thread(target=write, name="byzps-checkpoint", daemon=True)
        self._background.start()
        return True

    def wait_background(self) -> None:
        if self._background is not None:
            self._background.join()
            self._background = None

    def close(self) -> None:
        self.wait_background()
        if self._writer is not None:
            writer, self._writer = self._writer, None
            writer.close()
