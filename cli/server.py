"""`byzps server`: the parameter-server daemon of one run (see byzps.server.daemon)."""

from __future__ import annotations

import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from byzps.cli.daemon_common import keep_freed_memory, server_heap_blocks, setup_logging
from byzps.cli.options import (
    Address,
    check_bindable,
    config_options,
    device_option,
    downlink_option,
    load_config,
)
from byzps.cli.rundir import claim_server_dirs
from byzps.common.config import ConfigError

if TYPE_CHECKING:
    import grpc


class ServerUsageError(click.ClickException):
    """A problem with what the server was asked to do: one line, exit code 2, no traceback."""

    exit_code = 2


def _secret(secret_file: Path | None, no_auth: bool) -> bytes | None:
    from byzps.common.credentials import SECRET_ENV, read_secret, secret_from_env

    if no_auth:
        if secret_file is not None:
            raise ServerUsageError("--no-auth and --secret-file exclude each other")
        return None
    if secret_file is not None:
        try:
            return read_secret(secret_file)
        except (OSError, ValueError) as exc:
            raise ServerUsageError(f"--secret-file: {exc}") from None
    secret = secret_from_env()
    if secret is None:
        raise ServerUsageError(f"no secret: pass --secret-file, set ${SECRET_ENV}, or --no-auth")
    return secret


@click.command()
@config_options
@click.option(
    "--listen",
    required=True,
    type=Address(listen=True),
    help="Address to serve on, HOST:PORT or [IPV6]:PORT; port 0 picks a free one.",
)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write metrics.jsonl, summary.json, params.npy here.",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Checkpoints and write-ahead log (default: OUT/checkpoints when --out is given).",
)
@click.option(
    "--checkpoint-every",
    default=50,
    show_default=True,
    type=click.IntRange(min=0),
    help="Write a checkpoint every this many rounds (0: only at start and shutdown); the "
    "write-ahead log covers the rounds in between.",
)
@click.option("--resume", is_flag=True, help="Continue the run in the checkpoint directory.")
@click.option(
    "--overwrite", is_flag=True, help="Replace the run in --out and the checkpoint directory."
)
@click.option(
    "--round-deadline",
    default=10.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds after a round opens when it may close without the workers that have not "
    "pushed, once the quorum has (cluster.quorum, default n − f).",
)
@click.option(
    "--startup-timeout",
    default=60.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to wait for all n workers to register before round 0 opens with those there.",
)
@click.option(
    "--linger",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0),
    help="Seconds to keep serving the final model after the last round before exiting.",
)
@click.option(
    "--log-level",
    default="INFO",
    show_default=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
    help="Least severe log messages shown (on stderr, timestamped).",
)
@click.option(
    "--secret-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The run's master secret, from which every worker's token is derived (else "
    "$BYZPS_SECRET). The server's alone: workers get their own token files "
    "(`byzps credentials issue`).",
)
@click.option("--no-auth", is_flag=True, help="Accept calls without tokens (tests only).")
@click.option(
    "--wal-fsync",
    type=click.Choice(["none", "round", "group"]),
    default="group",
    show_default=True,
    envvar="BYZPS_WAL_FSYNC",
    help="When the write-ahead log is fsynced. Every policy has an update in the kernel before "
    "its Ack (nothing acknowledged is lost if the process dies); for a power loss: group (each "
    "group commit, before its Acks) loses nothing acknowledged, round (each round close) loses "
    "at most the open round's, none (checkpoints only) everything since the last checkpoint "
    "(docs/durability.md).",
)
@click.option("--fsync-wal", is_flag=True, hidden=True, help="Old spelling of --wal-fsync group.")
@click.option(
    "--tls-cert",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Serve TLS with this certificate chain (PEM); needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The private key (PEM) of --tls-cert.",
)
@click.option(
    "--tls-client-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Mutual TLS: accept only clients whose certificate this CA (PEM) signed, and bind "
    "worker ids to certificates: one naming worker K (`byzps credentials cert --worker K`) may "
    "call as K only; one naming no worker (--operator) may call Status only.",
)
@click.option(
    "--tls-peer-ca",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="With cluster.shards > 1 and TLS: the CA (PEM) that signed the other shards' "
    "certificates (default: --tls-client-ca). A shard presents its own --tls-cert when it "
    "calls them (`byzps credentials cert --server` makes it a client certificate too).",
)
@click.option(
    "--tls-bind-ids/--no-tls-bind-ids",
    default=True,
    show_default=True,
    help="Under mutual TLS, let a client certificate call only as the worker it names (off: "
    "certificates from a PKI that names no byzps worker; the tokens still bind the ids).",
)
@click.option(
    "--metrics",
    "metrics_address",
    type=Address(listen=True),
    help="Serve Prometheus metrics at http://HOST:PORT/metrics (docs/metrics.md); off unless "
    "given. Read-only; bind it where only your monitoring can reach it.",
)
@click.option(
    "--shard",
    default=0,
    show_default=True,
    type=click.IntRange(min=0),
    help="With cluster.shards = S > 1: this server's rank, 0 … S − 1; it owns the rank-th of "
    "S contiguous coordinate ranges. Rank 0 writes the run's metrics.",
)
@click.option(
    "--peers",
    help="With cluster.shards > 1: every shard's address, in rank order, comma-separated "
    "(this one's included).",
)
@click.option(
    "--peers-file",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Like --peers, one address per line, read when the first round closes (a launcher "
    "writes it once every shard listens).",
)
@click.option(
    "--peer-timeout",
    default=120.0,
    show_default=True,
    type=click.FloatRange(min=1),
    help="Seconds a round's close waits for a peer shard, beyond --round-deadline (a peer "
    "short of pushes closes only then), before this shard stops (exit 1; --resume continues "
    "it).",
)
@downlink_option
@device_option
def server(
    config_path: Path,
    overrides: tuple[str, ...],
    listen: str,
    out: Path | None,
    checkpoint_dir: Path | None,
    checkpoint_every: int,
    resume: bool,
    overwrite: bool,
    round_deadline: float,
    startup_timeout: float,
    linger: float,
    log_level: str,
    secret_file: Path | None,
    no_auth: bool,
    wal_fsync: str,
    fsync_wal: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    tls_peer_ca: Path | None,
    tls_bind_ids: bool,
    metrics_address: str | None,
    shard: int,
    peers: str | None,
    peers_file: Path | None,
    peer_timeout: float,
    downlink: str,
    device: str | None,
) -> None:
    """Serve one run to its last round: workers register, push updates and fetch the model."""
    from byzps.server.checkpoint import CheckpointError
    from byzps.server.coordinator import Settings
    from byzps.server.daemon import DaemonOptions, StartupError, install_signal_handlers, serve
    from byzps.server.engine import build_server_parts
    from byzps.server.wal import FsyncPolicy, WalError

    setup_logging(log_level, "server")
    check_bindable(listen)
    if metrics_address is not None:
        check_bindable(metrics_address, "--metrics")
    try:
        config = load_config(config_path, overrides, device)
    except click.ClickException as exc:
        raise ServerUsageError(exc.message) from None
    if checkpoint_dir is None and out is not None:
        checkpoint_dir = out / "checkpoints"
    options = DaemonOptions(
        listen=listen,
        settings=Settings(config.quorum, round_deadline, startup_timeout, checkpoint_every),
        out=out,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        linger=linger,
        secret=_secret(secret_file, no_auth),
        wal_fsync=FsyncPolicy.GROUP if fsync_wal else FsyncPolicy(wal_fsync),
        tls=_tls(tls_cert, tls_key, tls_client_ca),
        bind_certificates=tls_bind_ids,
        metrics=metrics_address,
        shard=shard,
        peers=_peers(config.cluster.shards, shard, peers, peers_file),
        peer_timeout=peer_timeout,
        peer_tls=_peer_tls(config.cluster.shards, tls_cert, tls_key, tls_peer_ca or tls_client_ca),
    )
    try:
        task, engine, max_nnz = build_server_parts(
            config, sparse_downlink=downlink == "sparse", shard=shard
        )
    except ConfigError as exc:
        raise ServerUsageError(f"{config_path}: {exc}") from None
    keep_freed_memory(server_heap_blocks(task.dim))  # after the states are made: mapped apart
    locks = claim_server_dirs(out, checkpoint_dir, resume=resume, overwrite=overwrite)

    def ready(address: str) -> None:
        click.echo(f"byzps server listening on {address}")
        sys.stdout.flush()

    stop = threading.Event()
    install_signal_handlers(stop)
    started = False

    def ready_once(address: str) -> None:
        nonlocal started
        started = True
        ready(address)

    try:
        code = serve(config, task, engine, max_nnz, options, ready=ready_once, stop=stop)
    except (StartupError, CheckpointError, WalError) as exc:
        raise ServerUsageError(str(exc)) from None
    finally:
        for lock in locks:
            lock.release(tidy=not started and not resume)
    sys.exit(code)


def _peers(
    shards: int, rank: int, peers: str | None, peers_file: Path | None
) -> tuple[str, ...] | Path:
    """The shards' addresses as DaemonOptions takes them, checked against cluster.shards."""
    if rank >= shards:
        raise ServerUsageError(f"--shard: rank {rank} of cluster.shards = {shards}")
    if peers is not None and peers_file is not None:
        raise ServerUsageError("--peers and --peers-file exclude each other")
    if shards == 1:
        if peers is not None or peers_file is not None:
            raise ServerUsageError("--peers: cluster.shards is 1, this server has no peers")
        return ()
    if peers_file is not None:
        return peers_file
    if peers is None:
        raise ServerUsageError(f"cluster.shards = {shards}: pass --peers or --peers-file")
    addresses = tuple(a.strip() for a in peers.split(",") if a.strip())
    if len(addresses) != shards:
        raise ServerUsageError(f"--peers: {len(addresses)} addresses for cluster.shards = {shards}")
    return addresses


def _peer_tls(
    shards: int, cert: Path | None, key: Path | None, ca: Path | None
) -> grpc.ChannelCredentials | None:
    """How a shard serving TLS calls its peers (None: unsharded, or plaintext)."""
    from byzps.common.credentials import channel_tls

    if shards == 1 or cert is None or ca is None:
        return None
    try:
        return channel_tls(ca, cert, key)
    except ValueError as exc:
        raise ServerUsageError(str(exc)) from None


def _tls(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """The port's TLS credentials, or None for plaintext; ServerUsageError names the option."""
    from byzps.common.credentials import server_tls

    try:
        return server_tls(cert, key, client_ca)
    except ValueError as exc:
        raise ServerUsageError(str(exc)) from None
