"""`byzps launch`: a whole cluster on this machine — server, honest workers, Byzantine cohort —
as separate OS processes talking gRPC over 127.0.0.1.

It writes the same DIR/metrics.jsonl, summary.json and params.npy as `byzps simulate` (the server
does), so the two can be compared file for file. Layout of DIR:

    secret              the master secret (mode 0600), handed to the server only, by file
    credentials/        worker-K.token for each honest worker K, each handed to its worker only;
                        operator.token for `byzps status --token-file`;
                        cohort/worker-K.token for the cohort's ids h … n−1, its --token-dir
    checkpoints/        the server's checkpoints (--resume restarts from them)
    workers/            each honest worker's checkpoint (--resume restarts them from it)
    ledgers/            every worker's acknowledged seqs, one JSON line each
    logs/               server.log, worker-K.log, attack.log
    launch.lock         held while this launch runs (its PID), so no second one can start here

A directory holding an earlier run is refused unless --resume (continue it from the checkpoints:
the same secret, the server and the workers pick up where they stopped) or --overwrite.

The exit code is the server's; an interrupted launch (Ctrl-C, SIGTERM, SIGHUP: a closed
terminal) exits 128 + signal after stopping every child (SIGTERM, then SIGKILL after a grace
period). A launch killed outright (SIGKILL) cannot do that: its children then stop themselves,
since each asks the kernel to signal it when its launcher dies (byzps.cli.cluster.follow_parent).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click

from byzps.cli.cluster import LISTENING, Child, Cluster, byzps_command
from byzps.cli.options import config_options, device_option, downlink_option, load_config
from byzps.cli.rundir import claim, lock
from byzps.common.config import RunConfig
from byzps.common.credentials import issue_tokens, read_secret, token_file_name, write_secret


class Interrupted(Exception):
    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


#: Signals that stop a launch cleanly.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class MetricsTail:
    """Follows DIR/metrics.jsonl and prints each new record as one progress line."""

    def __init__(self, path: Path, rounds: int) -> None:
        self.path = path
        self.rounds = rounds
        self.offset = 0
        self.last: dict[str, Any] | None = None

    def poll(self) -> None:
        from byzps.server.results import progress_line  # torch: not before the daemons' setup

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
            click.echo(progress_line(record, self.rounds))


@click.command()
@config_options
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Output directory (results, checkpoints, logs, secret, credentials).",
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
@click.option("--resume", is_flag=True, help="Continue the run in --out from its checkpoints.")
@click.option("--overwrite", is_flag=True, help="Replace the run in --out (its files are deleted).")
@downlink_option
@device_option
def launch(
    config_path: Path,
    overrides: tuple[str, ...],
    out: Path,
    round_deadline: float | None,
    startup_timeout: float,
    force_cohort: bool,
    grace: float,
    resume: bool,
    overwrite: bool,
    downlink: str,
    device: str | None,
) -> None:
    """Run server, workers and attackers of CONFIG as local processes until the run ends."""
    config = load_config(config_path, overrides, device)
    held = lock(out, "launch")
    claim(out, resume=resume, overwrite=overwrite, can_resume=True)
    secret = out / "secret"
    if not (resume and secret.exists()):
        write_secret(secret, overwrite=True)  # a fresh one for every new run
    credentials = issue_credentials(config, secret, out / "credentials")
    sets = [a for o in overrides for a in ("--set", o)]
    cluster = Cluster(out / "logs")
    caught: list[int] = []

    def on_signal(signum: int, frame: object) -> None:
        caught.append(signum)
        raise Interrupted(signum)

    previous = {s: signal.signal(s, on_signal) for s in STOP_SIGNALS}
    code = 1
    try:
        server_argv = byzps_command(
            "server", "--config", str(config_path), *sets,
            "--listen", "127.0.0.1:0", "--secret-file", str(secret),
            "--downlink", downlink, *(["--resume"] if resume else ["--overwrite"]),
            *(["--device", device] if device is not None else []),
            *(["--round-deadline", str(round_deadline)] if round_deadline is not None else []),
        )  # fmt: skip
        servers = start_servers(cluster, server_argv, config.cluster.shards, out, startup_timeout)
        address = ",".join(servers.addresses)
        for name, argv in client_commands(config, address, credentials, out, force_cohort):
            cluster.start(name, argv)
        h, f = config.honest_workers, config.cluster.workers - config.honest_workers
        click.echo(f"started {h} honest worker(s)" + (f" and {f} Byzantine" if f else ""))
        tail = MetricsTail(out / "metrics.jsonl", config.run.rounds)
        code = _supervise(cluster, servers.children, tail)
    except Interrupted as exc:
        click.echo(f"launch: {exc}, stopping the cluster", err=True)
        code = 128 + exc.signum
    except (TimeoutError, RuntimeError) as exc:
        click.echo(f"launch: {exc}", err=True)
        code = 1
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)  # a second Ctrl-C must not abort the cleanup
        cluster.stop(grace=grace)
        for s, handler in previous.items():
            signal.signal(s, handler)
        held.release()
    if code == 0:
        click.echo(f"done: results in {out}")
    raise SystemExit(code)


@dataclass(frozen=True)
class Servers:
    """The started server process(es): one, or the S shards in rank order."""

    children: list[Child]
    addresses: list[str]


def shard_dir(out: Path, rank: int) -> Path:
    """Where shard `rank` keeps its files: OUT itself for rank 0 (the run's metrics and results
    are its), OUT/shard-RANK for the others."""
    return out if rank == 0 else out / f"shard-{rank}"


def start_servers(
    cluster: Cluster, argv: list[str], shards: int, out: Path, timeout: float
) -> Servers:
    """Start the server, or its `shards` shards, each with its own --out and checkpoint
    directory; once every shard listens, write their addresses to OUT/shards.txt, which each
    shard reads (--peers-file) before its first round closes."""
    peers = out / "shards.txt"
    peers.unlink(missing_ok=True)
    children = []
    for rank in range(shards):
        where = shard_dir(out, rank)
        own = ["--out", str(where), "--checkpoint-dir", str(where / "checkpoints")]
        if shards > 1:
            own += ["--shard", str(rank), "--peers-file", str(peers)]
        name = "server" if shards == 1 else f"server-{rank}"
        children.append(cluster.start(name, [*argv, *own], pipe_stdout=True))
    addresses = [cluster.wait_for_line(child, LISTENING, timeout) for child in children]
    if shards > 1:
        staged = peers.with_suffix(".tmp")
        staged.write_text("".join(a + "\n" for a in addresses))
        staged.replace(peers)
    for child, address in zip(children, addresses, strict=True):
        click.echo(f"{child.name} {address} (pid {child.pid}); logs in {cluster.log_dir}")
    return Servers(children, addresses)


def threads_each(processes: int) -> int:
    """Each worker process's share of this machine's cores (at least one): wider pools only
    spin against each other (see byzps.cli.daemon_common.set_threads)."""
    return max(1, (os.cpu_count() or 1) // max(processes, 1))


@dataclass(frozen=True)
class Credentials:
    """Where each client process's tokens are: honest worker K's file, the cohort's directory."""

    directory: Path

    def worker(self, k: int) -> Path:
        return self.directory / token_file_name(k)

    @property
    def cohort(self) -> Path:
        return self.directory / "cohort"


def issue_credentials(config: RunConfig, secret: Path, directory: Path) -> Credentials:
    """Fresh token files from the master secret: one per honest worker, and the cohort's in a
    directory of their own, so that no process is handed a token of an id it does not hold.
    A previous launch's tokens are removed first (they belong to another secret)."""
    h, n = config.honest_workers, config.cluster.workers
    shutil.rmtree(directory, ignore_errors=True)
    credentials = Credentials(directory)
    key = read_secret(secret)
    issue_tokens(key, list(range(h)), directory, operator=True)
    if n > h:
        issue_tokens(key, list(range(h, n)), credentials.cohort)
    return credentials


def client_commands(
    config: RunConfig, address: str, credentials: Credentials, out: Path, force_cohort: bool
) -> list[tuple[str, list[str]]]:
    """(name, argv) of every client process: honest worker K with --token-file of its own
    token, and the cohort (unless the run has none) with --token-dir of its ids' tokens."""
    h, n = config.honest_workers, config.cluster.workers
    cohort = n > h  # honest_workers is n under attack "na"
    common = ["--server", address, "--threads", str(threads_each(h + int(cohort)))]
    commands = [
        (f"worker-{k}", byzps_command(
            "worker", *common, "--token-file", str(credentials.worker(k)), "--id", str(k),
            "--ledger", str(out / "ledgers" / f"worker-{k}.jsonl"),
            "--checkpoint-dir", str(out / "workers" / f"worker-{k}")))
        for k in range(h)
    ]  # fmt: skip
    if cohort:
        commands.append(("attack", byzps_command(
            "attack", *common, "--token-dir", str(credentials.cohort),
            "--count", str(n - h), "--first-id", str(h),
            "--ledger", str(out / "ledgers" / "attack.jsonl"),
            *(["--force-cohort"] if force_cohort else []),
        )))  # fmt: skip
    return commands


def _supervise(cluster: Cluster, servers: list[Child], tail: MetricsTail) -> int:
    """Print progress until every server process (shard) exits; report workers that die on
    the way. The exit code is the first non-zero of the servers' (in rank order)."""
    reported: set[str] = set()
    while any(server.process.poll() is None for server in servers):
        tail.poll()
        for child in cluster.children:
            rc = child.process.poll()
            if rc not in (None, 0) and child.name not in reported:
                reported.add(child.name)
                click.echo(
                    f"launch: {child.name} exited with code {rc}; see {child.log_path}", err=True
                )
        time.sleep(0.2)
    tail.poll()
    codes = [int(server.process.returncode) for server in servers]
    rc = next((c for c in codes if c != 0), 0)
    return 128 - rc if rc < 0 else rc  # killed by signal s: the shell's 128 + s
