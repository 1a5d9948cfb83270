"""`byzps worker`: one honest worker daemon (byzps.worker.daemon) against a remote server."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import click

from byzps.cli.daemon_common import daemon_options, run_daemon, setup_logging


@click.command()
@daemon_options
@click.option(
    "--id",
    "worker_id",
    required=True,
    type=click.IntRange(min=0),
    envvar="BYZPS_WORKER_ID",
    show_envvar=True,
    help="This worker's id (0 … n−1; honest workers are 0 … h−1). From the environment in "
    "replicated deployments (a Kubernetes Indexed Job's completion index, see deploy/).",
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep this worker's state here (written ahead of every push) so a restarted "
    "worker resumes exactly.",
)
@click.option(
    "--ledger",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append every acknowledged seq as a JSON line (for audits and tests).",
)
def worker(
    address: str,
    secret_file: Path | None,
    client_options: dict[str, Any],
    log_level: str,
    worker_id: int,
    checkpoint_dir: Path | None,
    ledger: Path | None,
) -> None:
    """Run honest worker ID: fetch each round's model, send its compressed update, until the
    server publishes the final model."""
    from byzps.common.credentials import load_secret
    from byzps.worker.daemon import run_worker

    setup_logging(log_level, f"worker-{worker_id}")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    run_daemon(
        lambda: run_worker(
            address,
            worker_id,
            load_secret(secret_file),
            checkpoint_dir=checkpoint_dir,
            ledger_path=ledger,
            client_options=client_options,
        )
    )


def _raise_interrupt(signum: int, frame: object) -> None:
    """SIGTERM ends a daemon like Ctrl-C: through its finally blocks (ledger and channel closed)."""
    raise KeyboardInterrupt
