"""`byzps credentials`: a run's master secret, per-worker tokens and mutual-TLS certificates.

    byzps credentials secret --out SECRET                          # the server's, and only its
    byzps credentials issue --secret-file SECRET --ids 0-19 --out TOKENS
    byzps credentials ca --out PKI
    byzps credentials cert --ca PKI --server byzps-server --ip 10.0.0.5 --out PKI
    byzps credentials cert --ca PKI --worker 0-19 --out PKI
    byzps credentials cert --ca PKI --operator --out PKI

Why: the master secret derives every worker's token, so a process holding it can act as every
worker and f Byzantine workers would not be f. It stays with the server; each worker gets the
token of its own id (`byzps worker --token-file`), the cohort those of its ids (`byzps attack
--token-dir`), and under mutual TLS a certificate naming its id, which the server binds.

Private files are written 0600 in 0700 directories and never replaced without --force.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])

#: The most ids one --ids may name (a typo like 0-1000000 must not write a million files).
MAX_IDS = 100_000


def parse_ids(text: str) -> list[int]:
    """Sorted distinct worker ids from a list of ids and ranges: "0-11", "0,3,5-7". ValueError
    says which part is wrong."""
    ids: set[int] = set()
    for raw in text.split(","):
        part = raw.strip()
        first, dash, last = part.partition("-")
        if not _is_number(first) or (dash and not _is_number(last)):
            raise ValueError(f"{part!r} is not an id or a range FIRST-LAST (e.g. 0-11 or 0,3,5-7)")
        low, high = int(first), int(last if dash else first)
        if high < low:
            raise ValueError(f"the range {part!r} ends before it starts")
        if len(ids) + high - low + 1 > MAX_IDS:
            raise ValueError(f"more than {MAX_IDS} ids")
        ids.update(range(low, high + 1))
    return sorted(ids)


def _is_number(text: str) -> bool:
    return text.isascii() and text.isdigit()


class IdList(click.ParamType):
    """Click type of `parse_ids`; a bad value is refused naming the option."""

    name = "IDS"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, list):
            return value
        try:
            return parse_ids(str(value))
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _force(command: F) -> F:
    return click.option("--force", is_flag=True, help="Replace existing files.")(command)


def _written(what: Callable[[], Any]) -> Any:
    """Run a writer, turning its refusals into one-line CLI errors."""
    try:
        return what()
    except FileExistsError as exc:
        raise click.ClickException(f"{exc.filename}: exists; pass --force to replace") from None
    except (OSError, ValueError) as exc:
        raise click.ClickException(str(exc)) from None


@click.group()
def credentials() -> None:
    """Make a run's master secret, per-worker tokens and mutual-TLS certificates."""


@credentials.command()
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write it to this file (mode 0600) instead of stdout.",
)
@_force
def secret(out: Path | None, force: bool) -> None:
    """A fresh 256-bit master secret (hex) for `byzps server --secret-file`. Give it to the
    server only: it derives every worker's token."""
    from byzps.common.credentials import new_secret, write_secret

    if out is None:
        click.echo(new_secret())
        return
    _written(lambda: write_secret(out, overwrite=force))
    click.echo(f"wrote {out}", err=True)


@credentials.command()
@click.option(
    "--secret-file",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The run's master secret (the server's --secret-file).",
)
@click.option("--ids", "worker_ids", type=IdList(), help="Worker ids: 0-19 or 0,3,5-7.")
@click.option(
    "--operator",
    is_flag=True,
    help="Also OUT/operator.token, for `byzps status --token-file`: it shows every worker's "
    "line but can call no worker RPC.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the token files (made 0700).",
)
@_force
def issue(
    secret_file: Path, worker_ids: list[int] | None, operator: bool, out: Path, force: bool
) -> None:
    """One token file per worker id, OUT/worker-ID.token (0600): hand each worker its own
    (`byzps worker --token-file`) and the cohort a directory of its ids' (`byzps attack
    --token-dir`)."""
    from byzps.common.credentials import issue_tokens, read_secret

    if worker_ids is None and not operator:
        raise click.UsageError("give --ids, --operator or both")
    key = _written(lambda: read_secret(secret_file))
    paths = _written(
        lambda: issue_tokens(key, worker_ids or [], out, overwrite=force, operator=operator)
    )
    click.echo(f"wrote {len(paths)} token file(s) in {out}", err=True)


@credentials.command()
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of ca.pem and ca.key (made 0700).",
)
@click.option("--name", default="byzps-ca", show_default=True, help="The CA's common name.")
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=3650,
    show_default=True,
    help="How long the CA certificate is valid.",
)
@_force
def ca(out: Path, name: str, days: int, force: bool) -> None:
    """A certificate authority for mutual TLS: OUT/ca.pem goes to every peer (--tls-ca,
    --tls-client-ca); OUT/ca.key stays where certificates are made."""
    from byzps.common.pki import make_ca

    issued = _written(lambda: make_ca(out, name=name, days=days, overwrite=force))
    click.echo(f"wrote {issued.cert} and {issued.key}", err=True)


@credentials.command()
@click.option(
    "--ca",
    "ca_dir",
    required=True,
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="Directory of the CA (`byzps credentials ca --out`).",
)
@click.option(
    "--worker",
    "worker_ids",
    type=IdList(),
    default=None,
    help="Client certificates for these worker ids (3, 0-19 or 0,3,5-7): OUT/worker-ID.pem "
    "and .key, each naming its id (CN byzps-worker-ID, URI spiffe://byzps/worker/ID), the only "
    "id the server lets it call as.",
)
@click.option(
    "--server",
    "server_names",
    multiple=True,
    metavar="NAME",
    help="The server's certificate, OUT/server.pem and .key, for this DNS name (repeatable; "
    "the first is its CN). It is a client certificate too: the shards of a sharded server "
    "present it to each other.",
)
@click.option(
    "--ip",
    "ips",
    multiple=True,
    metavar="ADDR",
    help="With --server: an IP address the certificate is also valid for (repeatable).",
)
@click.option(
    "--operator",
    is_flag=True,
    help="A client certificate naming no worker, OUT/operator.pem and .key, for `byzps status`: "
    "the server refuses it every worker call.",
)
@click.option(
    "--out",
    required=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Directory of the certificates and keys (made 0700).",
)
@click.option(
    "--days",
    type=click.IntRange(min=1),
    default=365,
    show_default=True,
    help="How long the certificates are valid.",
)
@_force
def cert(
    ca_dir: Path,
    worker_ids: list[int] | None,
    server_names: tuple[str, ...],
    ips: tuple[str, ...],
    operator: bool,
    out: Path,
    days: int,
    force: bool,
) -> None:
    """A certificate signed by the CA: for workers (--worker), the server (--server) or an
    operator (--operator); exactly one of them."""
    from byzps.common import pki

    chosen = [worker_ids is not None, bool(server_names), operator]
    if sum(chosen) != 1:
        raise click.UsageError("give exactly one of --worker, --server, --operator")
    if ips and not server_names:
        raise click.UsageError("--ip: only with --server")
    if worker_ids is not None:
        issued = _written(
            lambda: pki.worker_certs(ca_dir, worker_ids, out, days=days, overwrite=force)
        )
    elif server_names:
        issued = [
            _written(
                lambda: pki.server_cert(ca_dir, server_names, ips, out, days=days, overwrite=force)
            )
        ]
    else:
        issued = [_written(lambda: pki.operator_cert(ca_dir, out, days=days, overwrite=force))]
    click.echo(f"wrote {len(issued)} certificate(s) and key(s) in {out}", err=True)
