"""`byzps launch`: a whole cluster on this machine — server, honest workers, Byzantine cohort —
as separate OS processes talking gRPC over 127.0.0.1.

It writes the same DIR/metrics.jsonl, summary.json and params.npy as `byzps simulate` (the server
does), so the two can be compared file for file. Layout of DIR:

    secret              shared secret (mode 0600), handed to every process by file, never argv
    checkpoints/        the server's checkpoints (--resume restarts from them)
    ledgers/            every worker's acknowledged seqs, one JSON line each
    logs/               server.log, worker-K.log, attack.log

The exit code is the server's; an interrupted launch (Ctrl-C, SIGTERM) exits 128 + signal after
stopping every child (SIGTERM, then SIGKILL after a grace period).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from pathlib import Path
from typing import Any

import click

from byzps.cli.cluster import LISTENING, Child, Cluster, byzps_command
from byzps.cli.options import config_options, downlink_option, load_config


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def write_secret(path: Path) -> None:
    """A fresh 256-bit secret as hex text (no newline), readable by the owner only."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_hex(32))
    os.chmod(path, 0o600)


class MetricsTail:
    """Follows DIR/metrics.jsonl and prints each new record as one progress line."""

    def __init__(self, path: Path, rounds: int) -> None:
        self.path = path
        self.rounds = rounds
        self.offset = 0
        self.last: dict[str, Any] | None = None

    def poll(self) -> None:
        if not self.path.exists():
            return
        with self.path.open("rb") as fh:
            fh.seek(self.offset)
            data = fh.read()
        complete = data[: data.rfind(b"\n") + 1]
        self.offset += len(complete)
        for line in complete.splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            self.last = record
            click.echo(format_record(record, self.rounds))


def format_record(record: dict[str, Any], rounds: int) -> str:
    parts = [f"round {record.get('round', '?')}/{rounds}"]
    if "train_loss" in record:
        parts.append(f"loss {record['train_loss']:.6f}")
    if "test_accuracy" in record:
        parts.append(f"acc {record['test_accuracy']:.4f}")
    if "bytes_uplink" in record:
        parts.append(f"uplink {record['bytes_uplink']:,} B/worker")
    return " | ".join(parts)


@click.command()
@config_options
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (results, checkpoints, logs, secret).",
)
@click.option(
    "--round-deadline",
    type=float,
    default=None,
    help="Seconds a round waits for stragglers once quorum is reached (server default).",
)
@click.option(
    "--startup-timeout",
    type=float,
    default=120.0,
    show_default=True,
    help="Seconds to wait for the server to listen.",
)
@click.option(
    "--force-cohort",
    is_flag=True,
    help="Let an omniscient honest-statistics attack run on the cohort's own shadows.",
)
@click.option(
    "--grace",
    type=float,
    default=10.0,
    show_default=True,
    help="Seconds between SIGTERM and SIGKILL when stopping children.",
)
@downlink_option
def launch(
    config_path: Path,
    overrides: tuple[str, ...],
    out: Path,
    round_deadline: float | None,
    startup_timeout: float,
    force_cohort: bool,
    grace: float,
    downlink: str,
) -> None:
    """Run server, workers and attackers of CONFIG as local processes until the run ends."""
    config = load_config(config_path, overrides)
    out.mkdir(parents=True, exist_ok=True)
    secret = out / "secret"
    write_secret(secret)
    sets = [a for o in overrides for a in ("--set", o)]
    cluster = Cluster(out / "logs")
    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        caught.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    code = 1
    try:
        server_argv = byzps_command(
            "server", "--config", str(config_path), *sets,
            "--listen", "127.0.0.1:0", "--out", str(out),
            "--checkpoint-dir", str(out / "checkpoints"), "--secret-file", str(secret),
            "--downlink", downlink,
            *(["--round-deadline", str(round_deadline)] if round_deadline is not None else []),
        )  # fmt: skip
        server = cluster.start("server", server_argv, pipe_stdout=True)
        address = cluster.wait_for_line(server, LISTENING, startup_timeout)
        click.echo(f"server {address} (pid {server.pid}); logs in {cluster.log_dir}")
        _start_workers(cluster, config, address, secret, out, force_cohort)
        code = _supervise(cluster, server, MetricsTail(out / "metrics.jsonl", config.run.rounds))
    except Interrupted as exc:
        click.echo(f"launch: {exc}, stopping the cluster", err=True)
        code = 128 + exc.signum
    except (TimeoutError, RuntimeError) as exc:
        click.echo(f"launch: {exc}", err=True)
        code = 1
    finally:
        for s in (signal.SIGINT, signal.SIGTERM):
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not abort the cleanup
        cluster.stop(grace=grace)
        for s, handler in previous.items():
            signal.signal(s, handler)
    if code == 0:
        click.echo(f"done: results in {out}")
    raise SystemExit(code)


def threads_each(processes: int) -> int:
    """Each worker process's share of this machine's cores (at least one): wider pools only
    spin against each other (see byzps.cli.daemon_common.set_threads)."""
    return max(1, (os.cpu_count() or 1) // max(processes, 1))


def _start_workers(
    cluster: Cluster, config: Any, address: str, secret: Path, out: Path, force_cohort: bool
) -> None:
    h, n = config.honest_workers, config.cluster.workers
    cohort = n > h  # honest_workers is n under attack "na"
    common = [
        "--server",
        address,
        "--secret-file",
        str(secret),
        "--threads",
        str(threads_each(h + int(cohort))),
    ]
    for k in range(h):
        ledger = out / "ledgers" / f"worker-{k}.jsonl"
        cluster.start(f"worker-{k}", byzps_command(
            "worker", *common, "--id", str(k), "--ledger", str(ledger)))  # fmt: skip
    if cohort:
        argv = byzps_command(
            "attack", *common, "--count", str(n - h), "--first-id", str(h),
            "--ledger", str(out / "ledgers" / "attack.jsonl"),
            *(["--force-cohort"] if force_cohort else []),
        )  # fmt: skip
        cluster.start("attack", argv)
    click.echo(f"started {h} honest worker(s)" + (f" and {n - h} Byzantine" if cohort else ""))


def _supervise(cluster: Cluster, server: Child, tail: MetricsTail) -> int:
    """Print progress until the server exits; report workers that die on the way."""
    reported: set[str] = set()
    while server.process.poll() is None:
        tail.poll()
        for child in cluster.children:
            rc = child.process.poll()
            if child is not server and rc not in (None, 0) and child.name not in reported:
                reported.add(child.name)
                click.echo(
                    f"launch: {child.name} exited with code {rc}; see {child.log_path}", err=True
                )
        time.sleep(0.2)
    tail.poll()
    rc = int(server.process.returncode)
    return 128 - rc if rc < 0 else rc  # killed by signal s: the shell's 128 + s
