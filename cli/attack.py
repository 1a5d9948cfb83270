"""`byzps attack`: one process playing F colluding Byzantine workers (byzps.worker.byzantine)."""

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
)


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
    "--token-dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    envvar="BYZPS_TOKEN_DIR",
    show_envvar=True,
    default=None,
    help="Directory of the members' own tokens, TOKEN_DIR/worker-ID.token for each held id "
    "(`byzps credentials issue`); no other file in it is read.",
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
@click.option(
    "--protocol",
    "protocol_names",
    multiple=True,
    metavar="NAME",
    help="Also run this protocol-level attack beside the gradient attack, with the members' own "
    "credentials, until the run ends, against the server or every shard of a sharded one "
    "(repeatable): longpoll-flood, push-storm, slow-reader, slowloris, padded, register-storm, "
    "deadline (byzps.worker.byzantine.protocol).",
)
@click.option(
    "--protocol-param",
    "protocol_params",
    multiple=True,
    metavar="[NAME.]KEY=VALUE",
    help="A parameter of a --protocol attack (repeatable); NAME may be left out when only one "
    "is selected.",
)
def attack(
    address: str,
    secret_file: Path | None,
    client_options: dict[str, Any],
    log_level: str,
    attack_name: str | None,
    count: int,
    first_id: int,
    token_dir: Path | None,
    force_cohort: bool,
    ledger: Path | None,
    protocol_names: tuple[str, ...],
    protocol_params: tuple[str, ...],
) -> None:
    """Hold COUNT Byzantine identities and attack the run at --server until it ends."""
    from byzps.worker.byzantine.daemon import run_attack
    from byzps.worker.byzantine.protocol import ProtocolAttack, build_protocol_attacks

    def make_protocols() -> list[ProtocolAttack]:  # a fresh set per server (shard) attacked
        return build_protocol_attacks(protocol_names, protocol_params)

    try:
        make_protocols()  # bad names and parameters are refused before anything connects
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    setup_logging(log_level, "attack")
    ids = list(range(first_id, first_id + count))
    credential = client_credential(ids, secret_file, token_dir=token_dir)
    interrupt_on_sigterm()
    run_daemon(
        lambda: run_attack(
            address,
            credential,
            count=count,
            first_id=first_id,
            attack_name=attack_name,
            force_cohort=force_cohort,
            ledger_path=ledger,
            client_options=client_options,
            make_protocols=make_protocols,
        )
    )
