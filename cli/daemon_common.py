"""What `byzps worker` and `byzps attack` share: logging, the shared options, exit codes.

Exit codes say who is to blame, so a supervisor (or `byzps launch`) can tell them apart:
0 done, 2 the worker cannot go on without diverging (WorkerError), 3 the server stayed
unreachable past the retry budget, 4 the server refused a call (a non-retryable gRPC status).
"""

from __future__ import annotations

import functools
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from byzps.cli.options import Address

EXIT_DIVERGED = 2
EXIT_UNREACHABLE = 3
EXIT_REFUSED = 4


def quiet_idle_threads() -> None:
    """Let idle OpenMP threads sleep instead of spinning (OMP_WAIT_POLICY=PASSIVE, unless the
    environment says otherwise); children of `byzps launch` inherit it.

    Why: a daemon alternates short tensor ops with gRPC work on the same cores, and torch's
    OpenMP threads spin for a while after every parallel op, taking the CPU from gRPC's threads.
    Measured on 2 cores (d = 1e6, torch with 2 threads): 20 sparse-downlink fetches 57 → 30 ms,
    cm and mean unchanged; a 20-worker cluster at d = 1e5 went from 65 to 48 ms per round. Only
    effective before torch is first imported (libgomp reads it once).
    """
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


#: glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
#: The largest block a daemon takes from its heap unless told otherwise: what every glibc accepts
#: (its manual gives half the 64 MiB heap size as the limit; glibc 2.36 takes more).
HEAP_BLOCKS = 32 << 20
_TRIM_THRESHOLD = 1 << 30


def keep_freed_memory(largest_block: int = HEAP_BLOCKS) -> bool:
    """Let glibc serve blocks up to `largest_block` from its heap and keep up to 1 GiB freed
    there, instead of mapping fresh zeroed pages for every large block and unmapping them on
    free. Where glibc refuses `largest_block`, HEAP_BLOCKS. Callable again to raise the limit.

    Why: a round allocates and frees many d-sized buffers (received messages, parsed protobufs,
    encoded replies, the new ĝ, checkpoint data). By default glibc maps blocks this large anew
    each time, and the kernel zero-fills every 4 KiB page at first touch: at d = 1e6, 20 dense
    workers and a server on 2 cores spent about a third of their CPU on it (0.95 → 0.57 s per
    round measured with these settings). The price is that a daemon's resident memory stays at
    its peak, which is why only the server goes past HEAP_BLOCKS (`server_heap_blocks`).
    Returns False where the C library has no mallopt (musl, macOS): nothing changes there.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        mallopt = ctypes.CDLL(name).mallopt
    except (OSError, AttributeError, TypeError):
        return False
    ok = any(
        mallopt(_M_MMAP_THRESHOLD, threshold) == 1
        for threshold in dict.fromkeys((largest_block, HEAP_BLOCKS))
    )
    return mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD) == 1 and ok


def server_heap_blocks(dim: int) -> int:
    """The largest block a server of dimension `dim` takes from its heap: one d-sized vector of
    8-byte entries (int64 indices, float64 sums) and 1 MiB more, at least HEAP_BLOCKS and at
    most the 1 GiB kept freed (mallopt takes a C int).

    Why: at d = 1e7 ĝ alone is 40 MB, above HEAP_BLOCKS, so every full close mapped and zeroed
    it anew: the sparse-downlink close of the mean took 70-110 ms, and 53-59 ms with ĝ's block
    reused (medians of 10 rounds, docs/performance.md). Only the server, one process, goes this
    far (twenty workers on one machine each holding their peak raised a d = 1e7 cluster past the
    machine's memory), and only up to a vector: its n × d states and their checkpoint snapshots
    are still mapped apart, and their memory returned when freed.
    """
    return min(_TRIM_THRESHOLD, max(HEAP_BLOCKS, 8 * dim + (1 << 20)))


def set_threads(ctx: click.Context, param: click.Parameter, threads: int | None) -> None:
    """Cap this process's compute threads (torch's and numba's pools).

    Why: n worker daemons on one machine each start pools as wide as the machine, and their
    idle threads spin for the cores the others need. Measured with 20 workers on 2 cores
    (d = 1e5): ~530 ms per round with default pools, ~65 ms with one thread each.
    """
    del ctx, param
    if threads is None:
        return
    import numba
    import torch

    torch.set_num_threads(threads)
    numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))


def client_options(
    retry_timeout: float,
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_server_name: str | None,
) -> dict[str, Any]:
    """ParameterServerClient keyword arguments from the shared options: the retry budget and
    the channel's security (`channel_security`)."""
    from byzps.worker.client import RetryPolicy

    return {
        "retry": RetryPolicy(give_up_after=retry_timeout),
        **channel_security(tls_ca, tls_cert, tls_key, tls_server_name),
    }


def channel_security(
    tls_ca: Path | None,
    tls_cert: Path | None,
    tls_key: Path | None,
    tls_server_name: str | None,
) -> dict[str, Any]:
    """`credentials` and `tls_server_name` for a client channel (byzps.worker.client.open_channel)
    when any TLS option is given; empty for plaintext."""
    if not (tls_ca or tls_cert or tls_key or tls_server_name):
        return {}
    from byzps.common.credentials import channel_tls

    try:
        credentials = channel_tls(tls_ca, tls_cert, tls_key)
    except ValueError as exc:
        raise click.UsageError(str(exc)) from None
    return {"credentials": credentials, "tls_server_name": tls_server_name}


def tls_client_options() -> list[Callable[[Any], Any]]:
    """--tls-ca, --tls-cert, --tls-key, --tls-server-name: a client's side of TLS (see
    `client_options`), shared by the daemons and `byzps status`."""
    return [
        click.option(
            "--tls-ca",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Connect with TLS, trusting this CA (PEM) for the server's certificate.",
        ),
        click.option(
            "--tls-cert",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Mutual TLS: this client's certificate (PEM); needs --tls-key.",
        ),
        click.option(
            "--tls-key",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="The private key (PEM) of --tls-cert.",
        ),
        click.option(
            "--tls-server-name",
            default=None,
            help="The name the server's certificate carries, when not the --server host.",
        ),
    ]


def tls_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """Add the client-side TLS options to a command (which receives them as keywords)."""
    for option in reversed(tls_client_options()):
        func = option(func)
    return func


def daemon_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--server, --secret-file (legacy), --retry-timeout, --tls-*, --log-level, --threads, shared
    by the worker daemons (each adds its own token option: --token-file, --token-dir). The
    decorated command receives `client_options` (see above) in place of the retry and TLS
    options."""
    options = [
        click.option(
            "--server",
            "address",
            required=True,
            type=Address(many=True),
            help="Address of the parameter server; of a sharded one (cluster.shards > 1), every "
            "shard's, comma-separated in rank order.",
        ),
        click.option(
            "--secret-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            default=None,
            help="Legacy: the run's master secret (default: $BYZPS_SECRET), from which this "
            "process derives its token(s). It hands the holder every worker's identity: give "
            "workers their own token files instead.",
        ),
        click.option(
            "--retry-timeout",
            type=float,
            default=120.0,
            show_default=True,
            help="Seconds of consecutive server failure before giving up.",
        ),
        *tls_client_options(),
        click.option(
            "--threads",
            type=click.IntRange(min=1),
            default=None,
            expose_value=False,
            callback=set_threads,
            help="Compute threads of this process [torch's default]; `byzps launch` gives "
            "each worker process its share of the cores.",
        ),
        click.option(
            "--log-level",
            default="INFO",
            show_default=True,
            type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"]),
            help="Least severe log messages shown (on stderr, timestamped).",
        ),
    ]

    @functools.wraps(func)
    def command(
        *,
        retry_timeout: float,
        tls_ca: Path | None,
        tls_cert: Path | None,
        tls_key: Path | None,
        tls_server_name: str | None,
        **kwargs: Any,
    ) -> Any:
        security = client_options(retry_timeout, tls_ca, tls_cert, tls_key, tls_server_name)
        return func(client_options=security, **kwargs)

    for option in reversed(options):
        command = option(command)
    return command


def client_credential(
    worker_ids: list[int],
    secret_file: Path | None,
    *,
    token_file: Path | None = None,
    token_dir: Path | None = None,
) -> dict[str, str] | None:
    """The tokens of exactly `worker_ids`, by wire id, from this process's credential: its
    token file (a worker: one id), its token directory (the cohort: DIR/worker-ID.token for each
    id) or — legacy, with a warning — derived from the master secret (--secret-file, else
    $BYZPS_SECRET). None when there is none of them (a server run with --no-auth).

    Why derive here: even on the legacy path the daemon is handed its own ids' tokens only, so
    nothing below the command line holds the master secret."""
    from byzps.common.credentials import (
        SECRET_ENV,
        load_secret,
        read_token,
        read_tokens,
        token_for,
    )

    option = "--token-file" if token_file is not None else "--token-dir"
    if (token_file is not None or token_dir is not None) and secret_file is not None:
        raise click.UsageError(f"{option} and --secret-file exclude each other")
    try:
        if token_file is not None:
            (worker_id,) = worker_ids
            return {str(worker_id): read_token(token_file)}
        if token_dir is not None:
            return read_tokens(token_dir, worker_ids)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint=option) from None
    try:
        secret = load_secret(secret_file)
    except (OSError, ValueError) as exc:
        raise click.BadParameter(str(exc), param_hint="--secret-file") from None
    if secret is None:
        return None
    logging.getLogger("byzps").warning(
        "%s is the master secret, which derives every worker's token: whoever holds it can act "
        "as any worker. Give each worker only its own (`byzps credentials issue`, then "
        "--token-file or --token-dir).",
        "--secret-file" if secret_file is not None else f"${SECRET_ENV}",
    )
    return {str(w): token_for(secret, str(w)) for w in worker_ids}


def token_file_option(help: str) -> Callable[[Any], Any]:
    """`--token-file` (or $BYZPS_TOKEN_FILE): one credential, a token file of `byzps credentials
    issue`; what it is for is the command's to say."""
    return click.option(
        "--token-file",
        type=click.Path(exists=True, dir_okay=False, path_type=Path),
        envvar="BYZPS_TOKEN_FILE",
        show_envvar=True,
        default=None,
        help=help,
    )


def interrupt_on_sigterm() -> None:
    """SIGTERM ends a daemon like Ctrl-C: through its finally blocks (ledger and channel
    closed), so `byzps launch` and container runtimes stop it cleanly."""

    def interrupt(signum: int, frame: object) -> None:
        del signum, frame
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def setup_logging(level: str, name: str) -> None:
    logging.basicConfig(
        level=level,
        stream=sys.stderr,
        format=f"%(asctime)s {name} %(levelname)s %(message)s",
    )


def run_daemon(body: Callable[[], None]) -> None:
    """Run a daemon body, turning its known failures into one log line and an exit code."""
    from byzps.common.config import ConfigError
    from byzps.worker.client import ServerError, ServerUnreachable
    from byzps.worker.session import WorkerError

    log = logging.getLogger("byzps")
    try:
        body()
    except (WorkerError, ConfigError) as exc:
        log.error("%s", exc)
        sys.exit(EXIT_DIVERGED)
    except ServerUnreachable as exc:
        log.error("%s", exc)
        sys.exit(EXIT_UNREACHABLE)
    except ServerError as exc:
        log.error("%s", exc)
        sys.exit(EXIT_REFUSED)
    except KeyboardInterrupt:
        log.info("interrupted")
        sys.exit(130)
