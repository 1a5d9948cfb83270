"""`byzps worker`: one honest worker daemon (byzps.worker.daemon) against a remote server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from byzps.cli.daemon_common import (
    client_credential,
    daemon_options,
    interrupt_on_sigterm,
    run_daemon,
    setup_logging,
    token_file_option,
)


@click.command()
@daemon_options
@click.option(
    "--id",
    "worker_id",
    required=True,
    type=click.IntRange(min=0),
    envvar="BYZPS_WORKER_ID",
    show_envvar=True,
    help="This worker's id (0 … n−1; honest workers are 0 … h−1).",
)
@token_file_option(
    "This worker's own token (`byzps credentials issue`): the only credential a worker needs, "
    "and one that lets it act as no other worker."
)
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep this worker's state here (written ahead of every push) so a restarted "
    "worker resumes exactly.",
)
@click.option(
    "--checkpoint-fsync",
    type=click.Choice(["every", "none"]),
    default="every",
    show_default=True,
    envvar="BYZPS_CHECKPOINT_FSYNC",
    show_envvar=True,
    help="every: each checkpoint is on disk before its update is sent, so the worker resumes "
    "after a power loss too; none: it is in the page cache, which a crash of the process keeps "
    "but a power loss may not (the worker then stops with an error instead of diverging). "
    "docs/durability.md, 'The worker's checkpoint'.",
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
    token_file: Path | None,
    checkpoint_dir: Path | None,
    checkpoint_fsync: str,
    ledger: Path | None,
) -> None:
    """Run honest worker ID: fetch each round's model, send its compressed update, until the
    server publishes the final model."""
    from byzps.worker.daemon import run_worker

    setup_logging(log_level, f"worker-{worker_id}")
    credential = client_credential([worker_id], secret_file, token_file=token_file)
    interrupt_on_sigterm()
    run_daemon(
        lambda: run_worker(
            address,
            worker_id,
            credential,
            checkpoint_dir=checkpoint_dir,
            checkpoint_fsync=checkpoint_fsync == "every",
            ledger_path=ledger,
            client_options=client_options,
        )
    )
