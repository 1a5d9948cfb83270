"""An output directory belongs to one run: claim it before writing, lock it while running.

Why: a second `byzps server` with the same --out used to delete a live server's checkpoints, a
`byzps launch` into an existing --out restarted it from round 0, and `byzps simulate` overwrote a
finished run — each silently. So every command that writes a run:

* claims its directory (`claim`): an empty or new one is fine; one holding files is refused unless
  the user said --resume (continue it, where the command can) or --overwrite (replace it);
* holds an advisory lock on it while it runs (`lock`, a `common.runlock.RunLock`: a `flock`
  released by the kernel however the process ends, so it can never go stale), and writes its
  PID there, so a second process is refused at once with the holder's PID.

`byzps launch` and the server it starts lock different files (launch.lock, server.lock) of the
same directory: the launcher guards the whole run, its server guards its own checkpoints.
"""

from __future__ import annotations

import shutil
from collections.abc import Collection
from pathlib import Path

import click

from byzps.common.runlock import LOCK_SUFFIX, RunLock, RunLockError


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


def lock(out: Path, name: str) -> RunLock:
    """Lock OUT/NAME.lock for this command's run; a refusal is a RunDirError (one line, exit 2)."""
    try:
        return RunLock(out, name)
    except RunLockError as exc:
        raise RunDirError(str(exc)) from None


def claim_server_dirs(
    out: Path | None, checkpoint_dir: Path | None, *, resume: bool, overwrite: bool
) -> list[RunLock]:
    """`byzps server`'s claim: lock --out and the checkpoint directory (each once) and refuse
    them when they hold a run that --resume or --overwrite does not cover. Only the server's own
    files count in --out (under `byzps launch` the launcher's files live there too)."""
    locks: list[RunLock] = []
    try:
        if out is not None:
            locks.append(lock(out, "server"))
            claim(out, resume=resume, overwrite=overwrite, can_resume=True,
                  owned=(*RESULT_FILES, "checkpoints"))  # fmt: skip
        if checkpoint_dir is not None and (out is None or checkpoint_dir != out / "checkpoints"):
            locks.append(lock(checkpoint_dir, "server"))
            claim(checkpoint_dir, resume=resume, overwrite=overwrite, can_resume=True)
    except RunDirError:
        for held in locks:
            held.release(tidy=True)
        raise
    return locks
