"""An output directory belongs to one run: claim it before writing, lock it while running.

Why: a second `byzps server` with the same --out used to delete a live server's checkpoints, a
`byzps launch` into an existing --out restarted it from round 0, and `byzps simulate` overwrote a
finished run — each silently. So every command that writes a run:

* claims its directory (`claim`): an empty or new one is fine; one holding files is refused unless
  the user said --resume (continue it, where the command can) or --overwrite (replace it);
* holds an advisory lock on it while it runs (`RunLock`, a `flock` on a lock file, released by
  the kernel however the process ends, so it can never go stale), and writes its PID there, so a
  second process is refused at once with the holder's PID.

`byzps launch` and the server it starts lock different files (launch.lock, server.lock) of the
same directory: the launcher guards the whole run, its server guards its own checkpoints.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from collections.abc import Collection
from pathlib import Path
from typing import IO

import click

#: Files a run directory may hold that are not a run's results (the locks themselves).
LOCK_SUFFIX = ".lock"


class RunDirError(click.ClickException):
    """The directory cannot be used as asked: one line naming the option that would fix it."""

    exit_code = 2


#: What `byzps simulate` and `byzps server` write into --out (the server also its checkpoints).
RESULT_FILES = ("metrics.jsonl", "summary.json", "params.npy", "rounds.jsonl")


def run_files(out: Path, owned: Collection[str] | None = None) -> list[str]:
    """Names in `out` that make it hold a run (sorted): the `owned` ones present, or every name
    but lock files when `owned` is None; [] when `out` does not exist."""
    if not out.is_dir():
        return []
    names = (p.name for p in out.iterdir() if not p.name.endswith(LOCK_SUFFIX))
    return sorted(n for n in names if owned is None or n in owned)


def claim(
    out: Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    can_resume: bool,
    owned: Collection[str] | None = None,
) -> None:
    """Refuse a directory that holds a run unless `resume` or `overwrite` say what to do with
    it; with `overwrite`, remove the run first. `owned` names the files this command writes
    (None: the whole directory is its): others are left alone, so `byzps server` under
    `byzps launch` neither counts nor deletes the launcher's files. Lock files always stay."""
    if resume and overwrite:
        raise RunDirError("--resume and --overwrite exclude each other")
    if out.exists() and not out.is_dir():
        raise RunDirError(f"--out {out}: not a directory")
    existing = run_files(out, owned)
    if not existing or resume:
        return
    if not overwrite:
        how = "--resume to continue it or --overwrite" if can_resume else "--overwrite"
        shown = ", ".join(existing[:4]) + (", …" if len(existing) > 4 else "")
        raise RunDirError(f"--out {out} already holds a run ({shown}); pass {how} to replace it")
    for name in existing:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()


class RunLock:
    """An exclusive advisory lock on OUT/NAME.lock, held until `release` (or process exit).

    RunDirError when another process holds it (naming its PID) or the directory is unwritable.
    """

    def __init__(self, out: Path, name: str) -> None:
        self.path = out / f"{name}{LOCK_SUFFIX}"
        #: The directory did not exist before: `release(tidy=True)` may remove it again.
        self.created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] | None = self.path.open("a+")
        except OSError as exc:
            raise RunDirError(f"--out {out}: cannot write there ({exc.strerror})") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            self._file = None
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunDirError(
                    f"--out {out} is in use by another byzps process (PID {holder}); stop it "
                    "first or choose another --out"
                ) from None
            raise RunDirError(f"--out {out}: cannot lock {self.path} ({exc.strerror})") from None
        self._file.seek(0)
        self._file.truncate()
        self._file.write(f"{os.getpid()}\n")
        self._file.flush()

    def release(self, *, tidy: bool = False) -> None:
        """Unlock. With `tidy` (the command wrote nothing, e.g. its port was taken) also remove
        the lock file, and the directory when this lock created it and it is empty — unlinked
        while still locked, so no other process can take a lock on the old file meanwhile."""
        if self._file is None:
            return
        if tidy:
            with contextlib.suppress(OSError):
                self.path.unlink()
            if self.created:
                with contextlib.suppress(OSError):
                    self.path.parent.rmdir()
        with contextlib.suppress(OSError):
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
        self._file.close()
        self._file = None


def claim_server_dirs(
    out: Path | None, checkpoint_dir: Path | None, *, resume: bool, overwrite: bool
) -> list[RunLock]:
    """`byzps server`'s claim: lock --out and the checkpoint directory (each once) and refuse
    them when they hold a run that --resume or --overwrite does not cover. Only the server's own
    files count in --out (under `byzps launch` the launcher's files live there too)."""
    locks: list[RunLock] = []
    try:
        if out is not None:
            locks.append(RunLock(out, "server"))
            claim(out, resume=resume, overwrite=overwrite, can_resume=True,
                  owned=(*RESULT_FILES, "checkpoints"))  # fmt: skip
        if checkpoint_dir is not None and (out is None or checkpoint_dir != out / "checkpoints"):
            locks.append(RunLock(checkpoint_dir, "server"))
            claim(checkpoint_dir, resume=resume, overwrite=overwrite, can_resume=True)
    except RunDirError:
        for lock in locks:
            lock.release(tidy=True)
        raise
    return locks
