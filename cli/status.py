"""`byzps status`: what a running server reports — round, workers, traffic."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import click

from byzps.cli.daemon_common import channel_security, tls_options


@click.command()
@click.option("--server", "address", required=True, metavar="HOST:PORT")
@click.option("--timeout", default=5.0, show_default=True, type=click.FloatRange(min=0.1))
@tls_options
def status(
    address: str,
    timeout: float,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_server_name: str | None,
) -> None:
    """Print the server's round, its registered workers and bytes in/out as a small table."""
    import grpc

    from byzps.proto.v1 import parameter_server_pb2 as pb
    from byzps.proto.v1 import parameter_server_pb2_grpc as pb_grpc
    from byzps.worker.client import open_channel

    security = channel_security(tls_ca, tls_cert, tls_key, tls_server_name)
    with open_channel(address, **security) as channel:
        try:
            reply = pb_grpc.ParameterServerStub(channel).Status(pb.StatusRequest(), timeout=timeout)
        except grpc.RpcError as exc:
            raise click.ClickException(
                f"{address}: {exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
            ) from None
    click.echo(f"round {reply.round}  bytes_in {reply.bytes_in}  bytes_out {reply.bytes_out}")
    click.echo(f"{'worker':>6}  {'last_seq':>8}  {'last_round':>10}  last_seen")
    now = dt.datetime.now(dt.timezone.utc)
    for w in reply.workers:
        seen = w.last_seen.ToDatetime(tzinfo=dt.timezone.utc)
        age = (now - seen).total_seconds()
        click.echo(
            f"{w.worker_id:>6}  {w.last_seq:>8}  {w.last_round:>10}  "
            f"{seen:%Y-%m-%d %H:%M:%S} ({age:.1f} s ago)"
        )
