"""`byzps attack`: one process playing F colluding Byzantine workers (byzps.worker.byzantine)."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import click

from byzps.cli.daemon_common import daemon_options, run_daemon, setup_logging
from byzps.cli.worker import _raise_interrupt


@click.command()
@daemon_options
@click.option(
    "--attack",
    "attack_name",
    default=None,
    help="Attack to run (default: the run config's attack.name). A different name "
    "overrides the config's (with that attack's default parameters) and is logged.",
)
@click.option(
    "--count",
    required=True,
    type=click.IntRange(min=1),
    help="F: how many Byzantine identities this process holds.",
)
@click.option(
    "--first-id",
    type=click.IntRange(min=0),
    required=True,
    help="First member id: this process holds ids FIRST-ID … FIRST-ID + COUNT − 1 and registers "
    "under no other (byzps launch passes h = n − f, the first Byzantine id).",
)
@click.option(
    "--force-cohort",
    is_flag=True,
    help="Run an omniscient attack that uses honest statistics on the cohort's own "
    "shadows instead of refusing it (a deployment cannot see honest states).",
)
@click.option(
    "--ledger",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append every acknowledged (worker, seq) as a JSON line.",
)
def attack(
    address: str,
    secret_file: Path | None,
    client_options: dict[str, Any],
    log_level: str,
    attack_name: str | None,
    count: int,
    first_id: int,
    force_cohort: bool,
    ledger: Path | None,
) -> None:
    """Hold COUNT Byzantine identities and attack the run at --server until it ends."""
    from byzps.common.credentials import load_secret
    from byzps.worker.byzantine.daemon import run_attack

    setup_logging(log_level, "attack")
    signal.signal(signal.SIGTERM, _raise_interrupt)
    run_daemon(
        lambda: run_attack(
            address,
            load_secret(secret_file),
            count=count,
            first_id=first_id,
            attack_name=attack_name,
            force_cohort=force_cohort,
            ledger_path=ledger,
            client_options=client_options,
        )
    )
