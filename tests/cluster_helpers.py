"""Helpers for tests that run real byzps processes on 127.0.0.1.

Every process is started in its own session and registered with a `Processes` tracker whose
`kill_all` (called from fixture finalizers) SIGKILLs their groups, so a failing test leaves
nothing behind. `leftovers(marker)` finds processes whose command line mentions a test's
temporary directory — the check that nothing outlived a launch.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import configs

LISTENING = re.compile(r"byzps server listening on (\S+:\d+)")


def write_config(
    path: Path, rounds: int, eval_every: int | None = None, attack: str = "bf"
) -> Path:
    """The cluster tests' run: seed 7, 5 workers (1 Byzantine), Top-2."""
    return configs.write_config(
        path, seed=7, rounds=rounds, eval_every=eval_every or rounds, k=2, attack=attack
    )


def byzps(*args: str) -> list[str]:
    return [sys.executable, "-m", "byzps.cli.main", *args]


class Processes:
    """Tracks started processes; kill_all() SIGKILLs each one's process group."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []

    def start(self, argv: list[str], log: Path | None = None, **kwargs: Any) -> subprocess.Popen:
        out = log.open("ab") if log is not None else subprocess.DEVNULL
        kwargs.setdefault("stdout", out)
        kwargs.setdefault("stderr", subprocess.STDOUT if log is not None else subprocess.DEVNULL)
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, start_new_session=True, **kwargs)
        if log is not None:
            out.close()
        self.started.append(proc)
        return proc

    def kill_all(self) -> None:
        for proc in self.started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            if proc.poll() is None:
                proc.wait(timeout=10)


def wait_listening(proc: subprocess.Popen, timeout: float = 60.0) -> str:
    """Read a piped server's stdout until its listening line; return HOST:PORT."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline().decode(errors="replace")
        if not line and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening")
        match = LISTENING.search(line)
        if match:
            return match.group(1)
    raise TimeoutError("server did not print its listening line")


def wait_for(predicate: Any, timeout: float, what: str, interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def log_digest(logs: Path, tail: int = 8) -> str:
    """Every log in `logs`, named, as its warnings and errors and its last `tail` lines: what a
    failed multi-process test prints, so that CI's output names the process that failed and
    why (a list of raw log tails is cut in the middle by pytest, hiding both)."""
    parts = []
    for path in sorted(logs.iterdir()):
        lines = path.read_text(errors="replace").splitlines()
        notable = [line for line in lines[:-tail] if " WARNING " in line or " ERROR " in line]
        parts.append(f"--- {path.name} ---")
        parts.extend(notable[-20:])
        parts.append("...")
        parts.extend(lines[-tail:])
    return "\n".join(parts)


def metrics(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    if not path.exists():
        return []
    lines = path.read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip().endswith("}")]


def leftovers(marker: str) -> list[str]:
    """Command lines of live processes (not zombies) that mention `marker`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError, PermissionError):
            continue
        if marker in cmdline and state != "Z":
            found.append(f"{entry.name}: {cmdline}")
    return found


def pid_of(marker: str, *needles: str) -> int:
    """The pid of the live process whose command line has `marker` and every needle."""
    for line in leftovers(marker):
        if all(n in line for n in needles):
            return int(line.split(":", 1)[0])
    raise LookupError(f"no process with {needles} under {marker}")


def ledger_seqs(path: Path) -> dict[str, list[int]]:
    """Acknowledged seqs per worker id from a ledger file."""
    seqs: dict[str, list[int]] = {}
    for line in path.read_text().splitlines():
        entry = json.loads(line)
        seqs.setdefault(entry["worker"], []).append(int(entry["seq"]))
    return seqs


def protocol_tally(attack_log: str, name: str, label: str = "") -> dict[str, int]:
    """How a protocol attack's calls ended, by status, as `byzps attack` logs it when it stops
    ("protocol attack NAME[ on shard K]: N calls: STATUS count, …"); `label` is " on shard K"
    for one shard of a sharded run. Fails naming the attack when the log holds no such line."""
    match = re.search(rf"protocol attack {re.escape(name + label)}: \d+ calls: (.*)", attack_log)
    assert match, f"no summary of {name}{label} in the attack log:\n{attack_log[-3000:]}"
    return {k: int(v) for k, v in (part.rsplit(" ", 1) for part in match.group(1).split(", "))}
