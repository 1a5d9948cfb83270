"""The honest worker's own checkpoint, written ahead of every push.

Why write-ahead: the dangerous moment is between "the server applied seq s" and "the worker
committed g ← g + c". A checkpoint taken *after* the commit loses that window to a crash: the
restarted worker would not know c and its g would silently diverge from the server's. So the worker
saves its state together with the pending encoded update *before* pushing it. On restart the
server's last_seq decides, without guessing:

* last_seq == pending seq      → the server applied it: commit the saved update, go on;
* last_seq == pending seq − 1  → it never arrived: resend the identical bytes with the same seq;
* anything else                → the worker cannot know g; fail (session.check_resumable).

The checkpoint is written every round, on the round's critical path, so it is cheap: a byzps
tensor file (byzps.common.tensorfile: the tensors' own bytes after a checksummed header, exact,
no pickle) written over the older of two slot files in place (CheckpointStore). At d = 1e6 a
save costs ~2 ms of CPU plus the fsync, where torch.save into a new file cost ~27 ms.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from byzps.common import tensorfile

#: The two slots a worker alternates between, and the one-file checkpoint of earlier versions.
SLOT_NAMES = ("worker-a.ckpt", "worker-b.ckpt")
LEGACY_NAME = "worker.pt"


@dataclass
class Pending:
    """An update sent (or about to be sent) and not yet known to be committed."""

    seq: int
    round: int
    update: bytes  # the SparseUpdate's wire bytes, as sent (session.encode_row)


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
                "update": self.pending.update,
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
            update = bytes(data["pending"]["update"])
            pending = Pending(int(data["pending"]["seq"]), int(data["pending"]["round"]), update)
        return cls(
            worker_id=data["worker_id"],
            config_digest=data["config_digest"],
            estimator=data["estimator"],
            last_seq=int(data["last_seq"]),
            next_round=int(data["next_round"]),
            pending=pending,
        )


class CheckpointStore:
    """The checkpoint of one worker in `directory`: two slot files, overwritten in place in turn.

    Each save goes to the slot not holding the newest checkpoint, so a crash in mid-write tears
    only that slot (its checksum fails) and the other still holds the previous checkpoint. A
    generation number in each file says which is newer. Overwriting in place, rather than the
    temp-file-and-rename of a one-file checkpoint, reuses the page cache's pages: this write is on
    every round's critical path. With `fsync` a save is on disk when it returns (a power loss
    keeps it); without, a process crash (kill -9) still keeps it, a power loss may not — the
    restarted worker then finds the server ahead of its checkpoint and stops with an error
    (session.check_resumable) rather than diverge.
    """

    def __init__(self, directory: Path, *, fsync: bool = True) -> None:
        self.directory = directory
        self.fsync = fsync
        self._generation: int | None = None

    def _slot(self, generation: int) -> Path:
        return self.directory / SLOT_NAMES[generation % 2]

    def save(self, checkpoint: WorkerCheckpoint) -> None:
        if self._generation is None:
            self._generation = self._newest()[0]
        self._generation += 1
        self.directory.mkdir(parents=True, exist_ok=True)
        tree = {"generation": self._generation, **checkpoint.to_dict()}
        tensorfile.write_in_place(self._slot(self._generation), tree, fsync=self.fsync)

    def load(self) -> WorkerCheckpoint | None:
        """The newest intact checkpoint, or None when there is none yet. A one-file checkpoint
        (worker.pt, written by byzps before the slots, by torch.save) is still read."""
        tree = self._newest()[1]
        if tree is not None:
            return WorkerCheckpoint.from_dict(tree)
        legacy = self.directory / LEGACY_NAME
        if legacy.exists():
            return WorkerCheckpoint.from_dict(torch.load(legacy, weights_only=False))
        return None

    def _newest(self) -> tuple[int, dict[str, Any] | None]:
        """(generation, tree) of the newest intact slot; (0, None) without one."""
        best: tuple[int, dict[str, Any] | None] = (0, None)
        for name in SLOT_NAMES:
            path = self.directory / name
            if not path.exists():
                continue
            try:
                tree = tensorfile.read(path)
            except tensorfile.TensorFileError:
                continue  # torn by a crash in mid-write: the other slot holds the one before
            if int(tree["generation"]) > best[0]:
                best = (int(tree["generation"]), tree)
        return best


def load(directory: Path) -> WorkerCheckpoint | None:
    """The newest checkpoint in `directory` (see CheckpointStore.load)."""
    return CheckpointStore(directory).load()
