"""A local cluster of byzps processes: start them, watch them, stop every one of them.

Why each child gets its own session (and so its own process group): Ctrl-C in a terminal signals
the whole foreground group, and children that died on it at once would leave the server without
a clean SIGTERM checkpoint and the launcher unable to report. Isolated, only the launcher gets the
signal and stops children in order; `os.killpg` then reaches anything a child started itself,
so nothing outlives the launcher.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

#: Set by the launcher in every child's environment: the PID the child must not outlive.
PARENT_ENV = "BYZPS_PARENT_PID"
#: prctl(2) option: the signal the kernel sends this process when its parent dies (Linux).
_PR_SET_PDEATHSIG = 1

#: The line `byzps server` prints once it accepts connections.
LISTENING = re.compile(r"^byzps server listening on (\S+:\d+)\s*$")


def byzps_command(*args: str) -> list[str]:
    """argv running a byzps subcommand with this interpreter (no reliance on PATH)."""
    return [sys.executable, "-m", "byzps.cli.main", *args]


@dataclass
class Child:
    """One started process, its role and its log."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    def signal_group(self, signum: int) -> None:
        """Signal the child's whole process group (the child and anything it started)."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, signum)


@dataclass
class Cluster:
    """The children of one launch, in start order."""

    log_dir: Path
    children: list[Child] = field(default_factory=list)
    _copiers: list[threading.Thread] = field(default_factory=list)

    def start(self, name: str, argv: Sequence[str], *, pipe_stdout: bool = False) -> Child:
        """Start `argv` in its own session, stdout+stderr to LOG_DIR/NAME.log (or a pipe that the
        caller reads first; see `copy_rest_to_log`)."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_dir / f"{name}.log"
        log = log_path.open("ab")
        try:
            process = subprocess.Popen(
                list(argv),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipe_stdout else log,
                stderr=subprocess.STDOUT if pipe_stdout else log,
                start_new_session=True,
                env={**os.environ, PARENT_ENV: str(os.getpid())},
            )
        finally:
            log.close()  # the child holds its own descriptor
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def wait_for_line(self, child: Child, pattern: re.Pattern[str], timeout: float) -> str:
        """Read the child's piped output until a line matches; return group 1. Lines read are
        copied to its log. TimeoutError or RuntimeError (the child exited) otherwise."""
        assert child.process.stdout is not None
        stream = child.process.stdout
        found: list[str] = []
        done = threading.Event()

        def reader() -> None:
            with child.log_path.open("ab") as log:
                for raw in iter(stream.readline, b""):
                    log.write(raw)
                    log.flush()
                    match = pattern.match(raw.decode(errors="replace"))
                    if match:
                        found.append(match.group(1))
                        done.set()
                        break
            done.set()

        thread = threading.Thread(target=reader, daemon=True)
        thread.start()
        if not done.wait(timeout):
            raise TimeoutError(f"{child.name} printed no matching line within {timeout:.0f} s")
        if not found:
            child.process.wait(timeout=5)
            raise RuntimeError(
                f"{child.name} exited with code {child.process.returncode} before it was ready; "
                f"see {child.log_path}"
            )
        self._copy_rest_to_log(child, stream)
        return found[0]

    def _copy_rest_to_log(self, child: Child, stream: IO[bytes]) -> None:
        """Keep draining a piped child so it never blocks on a full pipe."""

        def copier() -> None:
            with child.log_path.open("ab") as log:
                for raw in iter(stream.readline, b""):
                    log.write(raw)
                    log.flush()

        thread = threading.Thread(target=copier, daemon=True)
        thread.start()
        self._copiers.append(thread)

    def running(self) -> list[Child]:
        return [c for c in self.children if c.process.poll() is None]

    def stop(self, children: Sequence[Child] | None = None, *, grace: float = 10.0) -> None:
        """SIGTERM the children's groups, wait up to `grace` seconds, then SIGKILL what is left
        (groups too, so no grandchild survives), and reap them all."""
        targets = list(self.children if children is None else children)
        for child in targets:
            if child.process.poll() is None:
                child.signal_group(signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in targets:
            remaining = max(0.0, deadline - time.monotonic())
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.process.wait(timeout=remaining)
        for child in targets:
            child.signal_group(signal.SIGKILL)  # also reaches leftovers of an exited leader
            if child.process.poll() is None:
                child.process.wait()
        for thread in self._copiers:
            thread.join(timeout=1.0)


def follow_parent() -> None:
    """In a child of `byzps launch` (PARENT_ENV set): ask the kernel for SIGTERM when the
    launcher dies, however it dies — SIGKILL and a closed terminal included, where it has no
    chance to stop its children itself — and exit at once if it is already gone.

    Why the child does it and not a preexec_fn: the launcher has threads, and code run between
    fork and exec in a threaded parent can deadlock. Linux only (prctl); elsewhere the launcher's
    own signal handling is all there is.
    """
    parent = os.environ.get(PARENT_ENV)
    if not parent or not sys.platform.startswith("linux"):
        return
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    if str(os.getppid()) != parent:  # the launcher died before the request took effect
        os.kill(os.getpid(), signal.SIGTERM)
