"""`byzps server`: the parameter-server daemon of one run (see byzps.server.daemon)."""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from byzps.cli.options import config_options, downlink_option, load_config
from byzps.common.config import ConfigError, RunConfig

if TYPE_CHECKING:
    import grpc

    from byzps.common.tasks.base import Task
    from byzps.server.engine import RoundEngine


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
@click.option("--listen", required=True, metavar="HOST:PORT", help="Address; port 0 picks one.")
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
@click.option("--checkpoint-every", default=50, show_default=True, type=click.IntRange(min=0))
@click.option("--resume", is_flag=True, help="Continue from the checkpoint directory.")
@click.option("--round-deadline", default=10.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--quorum", type=int, help="Pushes that close a round at its deadline [n - f].")
@click.option("--startup-timeout", default=60.0, show_default=True, type=click.FloatRange(min=0))
@click.option("--linger", default=5.0, show_default=True, type=click.FloatRange(min=0))
@click.option(
    "--secret-file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="Shared secret for worker tokens (else $BYZPS_SECRET).",
)
@click.option("--no-auth", is_flag=True, help="Accept calls without tokens (tests only).")
@click.option("--fsync-wal", is_flag=True, help="fsync every log record (survives power loss).")
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
    help="Mutual TLS: accept only clients whose certificate this CA (PEM) signed.",
)
@downlink_option
def server(
    config_path: Path,
    overrides: tuple[str, ...],
    listen: str,
    out: Path | None,
    checkpoint_dir: Path | None,
    checkpoint_every: int,
    resume: bool,
    round_deadline: float,
    quorum: int | None,
    startup_timeout: float,
    linger: float,
    secret_file: Path | None,
    no_auth: bool,
    fsync_wal: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_client_ca: Path | None,
    downlink: str,
) -> None:
    """Serve one run to its last round: workers register, push updates and fetch the model."""
    from byzps.server.checkpoint import CheckpointError
    from byzps.server.coordinator import Settings
    from byzps.server.daemon import DaemonOptions, StartupError, install_signal_handlers, serve
    from byzps.server.wal import WalError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="byzps server: %(message)s")
    try:
        config = load_config(config_path, overrides)
    except click.ClickException as exc:
        raise ServerUsageError(exc.message) from None
    n = config.cluster.workers
    quorum = n - config.cluster.byzantine if quorum is None else quorum
    if not 1 <= quorum <= n:
        raise ServerUsageError(f"--quorum: {quorum} is outside [1, {n}]")
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ServerUsageError(f"--listen: expected HOST:PORT, got {listen!r}")
    if checkpoint_dir is None and out is not None:
        checkpoint_dir = out / "checkpoints"
    options = DaemonOptions(
        listen=listen,
        settings=Settings(quorum, round_deadline, startup_timeout, checkpoint_every),
        out=out,
        checkpoint_dir=checkpoint_dir,
        resume=resume,
        linger=linger,
        secret=_secret(secret_file, no_auth),
        fsync_wal=fsync_wal,
        tls=_tls(tls_cert, tls_key, tls_client_ca),
    )
    try:
        task, engine, max_nnz = _build(config, sparse_downlink=downlink == "sparse")
    except ConfigError as exc:
        raise ServerUsageError(f"{config_path}: {exc}") from None

    def ready(address: str) -> None:
        click.echo(f"byzps server listening on {address}")
        sys.stdout.flush()

    stop = threading.Event()
    install_signal_handlers(stop)
    try:
        code = serve(config, task, engine, max_nnz, options, ready=ready, stop=stop)
    except (StartupError, CheckpointError, WalError) as exc:
        raise ServerUsageError(str(exc)) from None
    sys.exit(code)


def _tls(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> grpc.ServerCredentials | None:
    """The port's TLS credentials, or None for plaintext; ServerUsageError names the option."""
    from byzps.common.credentials import server_tls

    try:
        return server_tls(cert, key, client_ca)
    except ValueError as exc:
        raise ServerUsageError(str(exc)) from None


def _build(
    config: RunConfig, *, sparse_downlink: bool
) -> tuple[Task, RoundEngine, Callable[[int], int]]:
    """Task, engine at x⁰ and the per-round k_max, built exactly as the simulator builds them."""
    from byzps.common.components import build_run_task, build_server_estimator
    from byzps.server.engine import build_engine

    task = build_run_task(config)
    estimator = build_server_estimator(config, task)
    engine = build_engine(config, task, estimator, sparse_downlink=sparse_downlink)
    return task, engine, estimator.max_nnz
