"""An advisory lock on OUT/NAME.lock: two processes never write one run or one sweep cell.

A `flock` on a lock file is released by the kernel however its holder ends, so it can never go
stale, and the holder writes its PID there, so the process refused can name it. `byzps simulate`,
`server` and `launch` lock their --out (cli/rundir.py), a sweep each cell it runs (sim/grid.py).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
from pathlib import Path
from typing import IO

#: The suffix of lock files, which never count as a run's results.
LOCK_SUFFIX = ".lock"


class RunLockError(RuntimeError):
    """The lock is held by another process (the message names its PID), or cannot be taken."""


class RunLock:
    """An exclusive advisory lock on OUT/NAME.lock, held until `release` (or process exit).

    RunLockError when another process holds it (naming its PID) or the directory is unwritable.
    """

    def __init__(self, out: Path, name: str) -> None:
        self.path = out / f"{name}{LOCK_SUFFIX}"
        #: The directory did not exist before: `release(tidy=True)` may remove it again.
        self.created = not out.exists()
        try:
            out.mkdir(parents=True, exist_ok=True)
            self._file: IO[str] | None = self.path.open("a+")
        except OSError as exc:
            raise RunLockError(f"--out {out}: cannot write there ({exc.strerror})") from None
        try:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            self._file.seek(0)
            holder = self._file.read().strip() or "?"
            self._file.close()
            self._file = None
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise RunLockError(
                    f"--out {out} is in use by another byzps process (PID {holder}); stop it "
                    "first or choose another --out"
                ) from None
            raise RunLockError(f"--out {out}: cannot lock {self.path} ({exc.strerror})") from None
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
