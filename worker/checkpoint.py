"""The honest worker's own checkpoint, written ahead of every push.

Why write-ahead: the dangerous moment is between "the server applied seq s" and "the worker
committed g ← g + c". A checkpoint taken *after* the commit loses that window to a crash: the
restarted worker would not know c and its g would silently diverge from the server's. So the worker
saves its state together with the pending encoded update *before* pushing it. On restart the
server's last_seq decides, without guessing:

* last_seq == pending seq      → the server applied it: commit the saved update, go on;
* last_seq == pending seq − 1  → it never arrived: resend the identical bytes with the same seq;
* anything else                → the worker cannot know g; fail (session.check_resumable).

One atomic file (temp, fsync, rename), replaced every round; torch.save keeps tensors exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byzps.proto.v1 import parameter_server_pb2 as pb

FILE_NAME = "worker.pt"


@dataclass
class Pending:
    """An update sent (or about to be sent) and not yet known to be committed."""

    seq: int
    round: int
    update: pb.SparseUpdate


@dataclass
class WorkerCheckpoint:
    """Everything a restarted worker needs: the run it belongs to, its estimator state (after
    message(), before commit of `pending`), its last acknowledged seq and the next round."""

    worker_id: str
    config_digest: str
    estimator: dict[str, Any]
    last_seq: int
    next_round: int
    pending: Pending | None = None

    def to_dict(self) -> dict[str, Any]:
        pending = None
        if self.pending is not None:
            pending = {
                "seq": self.pending.seq,
                "round": self.pending.round,
                "update": self.pending.update.SerializeToString(),
            }
        return {
            "worker_id": self.worker_id,
            "config_digest": self.config_digest,
            "estimator": self.estimator,
            "last_seq": self.last_seq,
            "next_round": self.next_round,
            "pending": pending,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> WorkerCheckpoint:
        pending = None
        if data["pending"] is not None:
            update = pb.SparseUpdate.FromString(data["pending"]["update"])
            pending = Pending(int(data["pending"]["seq"]), int(data["pending"]["round"]), update)
        return cls(
            worker_id=data["worker_id"],
            config_digest=data["config_digest"],
            estimator=data["estimator"],
            last_seq=int(data["last_seq"]),
            next_round=int(data["next_round"]),
            pending=pending,
        )


def save(directory: Path, checkpoint: WorkerCheckpoint) -> None:
    """Atomically replace DIRECTORY/worker.pt (write temp, fsync, rename, fsync the folder)."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / FILE_NAME
    tmp = directory / (FILE_NAME + ".tmp")
    with tmp.open("wb") as fh:
        torch.save(checkpoint.to_dict(), fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load(directory: Path) -> WorkerCheckpoint | None:
    """The checkpoint in `directory`, or None when there is none yet."""
    path = directory / FILE_NAME
    if not path.exists():
        return None
    return WorkerCheckpoint.from_dict(torch.load(path, weights_only=False))
