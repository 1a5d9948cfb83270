"""`byzps status`: what a running server reports — progress, workers, traffic.

Anyone may ask; the reply shows every worker's line only to a caller with a credential (an
operator token from `byzps credentials issue --operator`, which `byzps launch` writes to
OUT/credentials/operator.token, any worker's token, or an operator certificate under mutual TLS).
"""

from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path
from typing import Any

import click

from byzps.cli.daemon_common import channel_security, tls_options, token_file_option
from byzps.cli.options import Address


def status_record(reply: Any) -> dict[str, Any]:
    """The reply as plain data (what --json prints): progress, traffic, and the workers."""
    return {
        "round": reply.round,
        "rounds": reply.rounds,
        "phase": reply.phase,
        "finished": reply.finished,
        "num_workers": reply.num_workers,
        "registered": reply.registered,
        "bytes_in": reply.bytes_in,
        "bytes_out": reply.bytes_out,
        "workers": [
            {
                "worker_id": w.worker_id,
                "last_seq": w.last_seq,
                "last_round": w.last_round,
                "last_seen": w.last_seen.ToDatetime(tzinfo=dt.timezone.utc).isoformat(),
            }
            for w in reply.workers
        ],
        # By worker id; empty unless the caller holds the operator's credential (or --no-auth).
        "suspicion": [round(v, 6) for v in reply.suspicion],
    }


def status_table(record: dict[str, Any]) -> str:
    """The record as a few human lines."""
    state = "finished" if record["finished"] else record["phase"]
    lines = [
        f"round {record['round']}/{record['rounds']} ({state})  workers "
        f"{record['registered']}/{record['num_workers']} registered  "
        f"bytes_in {record['bytes_in']:,}  bytes_out {record['bytes_out']:,}"
    ]
    scores = record.get("suspicion") or []
    if scores:
        ranked = sorted(range(len(scores)), key=lambda row: (-scores[row], row))[:5]
        top = ", ".join(f"{row} ({scores[row]:.3f})" for row in ranked)
        lines.append(f"most discounted by the rule (suspicion): {top}")
    if record["workers"]:
        column = f"  {'suspicion':>9}" if scores else ""
        lines.append(f"{'worker':>6}  {'last_seq':>8}  {'last_round':>10}{column}  last_seen")
        now = dt.datetime.now(dt.timezone.utc)
        for w in record["workers"]:
            seen = dt.datetime.fromisoformat(w["last_seen"])
            age = (now - seen).total_seconds()
            row = int(w["worker_id"])
            score = f"  {scores[row]:>9.3f}" if row < len(scores) else ""
            lines.append(
                f"{w['worker_id']:>6}  {w['last_seq']:>8}  {w['last_round']:>10}{score}  "
                f"{seen:%Y-%m-%d %H:%M:%S} ({age:.1f} s ago)"
            )
    elif record["registered"]:
        lines.append("(per-worker lines need a credential: --token-file)")
    return "\n".join(lines)


@click.command()
@click.option("--server", "address", required=True, type=Address(), help="Address of the server.")
@click.option(
    "--timeout",
    default=5.0,
    show_default=True,
    type=click.FloatRange(min=0.1),
    help="Seconds to wait for each answer.",
)
@token_file_option("A credential (operator or worker token) that adds every worker's line.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per answer.")
@click.option(
    "--watch",
    type=click.FloatRange(min=0.1),
    default=None,
    metavar="SECONDS",
    help="Ask again every SECONDS until the run has finished.",
)
@tls_options
def status(
    address: str,
    timeout: float,
    token_file: Path | None,
    as_json: bool,
    watch: float | None,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_server_name: str | None,
) -> None:
    """Print the server's round, whether the run finished, its workers and bytes in/out, and (to
    the operator) each worker's suspicion score."""
    import grpc

    from byzps.common.credentials import TOKEN_METADATA_KEY, read_token
    from byzps.proto.v1 import parameter_server_pb2 as pb
    from byzps.proto.v1 import parameter_server_pb2_grpc as pb_grpc
    from byzps.worker.client import open_channel

    metadata: tuple[tuple[str, str], ...] = ()
    if token_file is not None:
        try:
            metadata = ((TOKEN_METADATA_KEY, read_token(token_file)),)
        except ValueError as exc:
            raise click.BadParameter(str(exc), param_hint="--token-file") from None
    security = channel_security(tls_ca, tls_cert, tls_key, tls_server_name)
    with open_channel(address, **security) as channel:
        stub = pb_grpc.ParameterServerStub(channel)
        while True:
            try:
                reply = stub.Status(pb.StatusRequest(), timeout=timeout, metadata=metadata)
            except grpc.RpcError as exc:
                raise click.ClickException(
                    f"{address}: {exc.code().name}: {exc.details()}"  # type: ignore[attr-defined]
                ) from None
            record = status_record(reply)
            click.echo(json.dumps(record) if as_json else status_table(record))
            if watch is None or record["finished"]:
                return
            time.sleep(watch)
