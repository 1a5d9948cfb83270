"""Checkpoints and the log that follows each one: the server's durable state on disk.

A directory holds numbered generations:  ckpt-000003.pt  +  wal-000003.log  is "the state at
checkpoint 3, then everything accepted since". Generation 0 is written at a fresh start, so a
crash before the first periodic checkpoint still recovers from the log. A checkpoint is written
atomically (temp file, fsync, rename, fsync of the directory) and then a new log is started, so
at every instant the newest readable checkpoint plus the logs from its generation on describe
every acknowledged update exactly once. The two newest generations are kept; older ones are
deleted after the new log exists.

Checkpoints are torch.save'd dicts of tensors and plain values, loaded with weights_only=True, so
a tampered file can hold no code.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byzps.server.wal import Record, WalError, WriteAheadLog, fsync_dir, read_wal

FORMAT = 1
_CKPT = re.compile(r"ckpt-(\d{6})\.pt")
_WAL = re.compile(r"wal-(\d{6})\.log")
KEEP_GENERATIONS = 2


class CheckpointError(ValueError):
    """The directory cannot be resumed from (other run config, unreadable state)."""


def _ckpt_name(gen: int) -> str:
    return f"ckpt-{gen:06d}.pt"


def _wal_name(gen: int) -> str:
    return f"wal-{gen:06d}.log"


def save_atomic(state: dict[str, Any], path: Path) -> None:
    """Write `state` to `path` so that a crash leaves either the old file or the whole new one."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("wb") as fh:
        torch.save(state, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


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


class CheckpointStore:
    """Generations of checkpoint + log in one directory, for one run config (`digest`)."""

    def __init__(self, directory: Path, digest: str, *, fsync_wal: bool = False) -> None:
        self.directory = directory
        self.digest = digest
        self.fsync_wal = fsync_wal
        self.generation = -1
        self.wal: WriteAheadLog | None = None
        directory.mkdir(parents=True, exist_ok=True)

    def _generations(self, pattern: re.Pattern[str]) -> list[int]:
        found = (pattern.fullmatch(p.name) for p in self.directory.iterdir())
        return sorted(int(m.group(1)) for m in found if m)

    def has_state(self) -> bool:
        return bool(self._generations(_CKPT) or self._generations(_WAL))

    def clear(self) -> None:
        """Delete every generation (a fresh run in a directory that held an old one)."""
        for p in self.directory.iterdir():
            if _CKPT.fullmatch(p.name) or _WAL.fullmatch(p.name) or p.name.endswith(".pt.tmp"):
                p.unlink()

    # --- resume ---------------------------------------------------------------------------

    def recover(self) -> Recovered:
        """The newest loadable checkpoint and every log record after it, in order.

        Raises CheckpointError for a checkpoint or log of another run config, and for a corrupt
        log that is not the last one (records after the damage could not be trusted)."""
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
            self.wal = WriteAheadLog.reopen(
                self.directory / _wal_name(logs[-1]), valid, fsync=self.fsync_wal
            )
        else:
            self.generation = generation
        return Recovered(generation, state, records)

    # --- running --------------------------------------------------------------------------

    def append(self, record: Record) -> None:
        """Log one record; OSError propagates (the caller must stop: state ran ahead of disk)."""
        if self.wal is None:
            raise RuntimeError("no open write-ahead log; checkpoint first")
        self.wal.append(record)

    def checkpoint(self, state: dict[str, Any], round: int) -> Path:
        """Write the next generation's checkpoint, start its log, drop old generations."""
        gen = self.generation + 1
        path = self.directory / _ckpt_name(gen)
        save_atomic({"format": FORMAT, "config_digest": self.digest, **state}, path)
        try:
            new_wal = WriteAheadLog.create(
                self.directory / _wal_name(gen), round, self.digest, fsync=self.fsync_wal
            )
        except OSError:
            # Without its log the new checkpoint would hide records still going to the old log.
            path.unlink(missing_ok=True)
            raise
        if self.wal is not None:
            self.wal.close()
        self.wal = new_wal
        self.generation = gen
        for old in self._generations(_CKPT):
            if old <= gen - KEEP_GENERATIONS:
                (self.directory / _ckpt_name(old)).unlink(missing_ok=True)
        for old in self._generations(_WAL):
            if old <= gen - KEEP_GENERATIONS:
                (self.directory / _wal_name(old)).unlink(missing_ok=True)
        return path

    def close(self) -> None:
        if self.wal is not None:
            self.wal.close()
            self.wal = None
