"""The server process: recover or start the coordinator, serve gRPC, tick deadlines, shut down.

Lifecycle:
1. persistence — with --resume, load the newest checkpoint and replay the write-ahead log after
   it; otherwise start at x⁰ (an old run's files in the checkpoint directory are removed);
   either way write a checkpoint generation to resume from;
2. serve — ParameterServer, grpc.health.v1 (SERVING once listening) and server reflection; print
   the one "listening" line; the main thread ticks round deadlines;
3. end — after the last round closed and the results were written, linger so workers can fetch
   the final model; on SIGTERM/SIGINT stop earlier. Both: refuse new calls, let in-flight ones
   finish, write a final checkpoint, exit 0. A failed write-ahead log exits 1 without a
   checkpoint (the engine ran ahead of the disk; the last checkpoint + log are the truth).
"""

from __future__ import annotations

import logging
import signal
import threading
import warnings
from collections.abc import Callable
from concurrent import futures
from dataclasses import dataclass
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from byzps.common.codec import MAX_MESSAGE_BYTES
from byzps.common.config import RunConfig
from byzps.common.tasks.base import Task
from byzps.server.auth import Authenticator
from byzps.server.checkpoint import CheckpointStore, Recovered
from byzps.server.coordinator import Coordinator, Settings
from byzps.server.engine import RoundEngine
from byzps.server.results import MetricsRecorder, RoundLog
from byzps.server.service import SERVICE_NAME, ParameterServerServicer, add_to_server
from byzps.server.validation import max_update_bytes

log = logging.getLogger("byzps.server")

TICK_SECONDS = 0.05
SHUTDOWN_GRACE_SECONDS = 5.0


class StartupError(Exception):
    """The server cannot start as asked (bad address, unusable checkpoint directory)."""


@dataclass(frozen=True)
class DaemonOptions:
    listen: str
    settings: Settings
    out: Path | None = None
    checkpoint_dir: Path | None = None
    resume: bool = False
    linger: float = 5.0
    secret: bytes | None = None
    fsync_wal: bool = False
    #: TLS for the port (byzps.common.credentials.server_tls); None: plaintext.
    tls: grpc.ServerCredentials | None = None


def recover(options: DaemonOptions, store: CheckpointStore | None) -> Recovered | None:
    """What the run starts from; StartupError when --resume cannot be honoured."""
    if store is None:
        if options.resume:
            raise StartupError("--resume needs --checkpoint-dir (or --out)")
        return None
    if options.resume:
        recovered = store.recover()
        if recovered.state is None and not recovered.records:
            warnings.warn(f"{store.directory}: nothing to resume, starting fresh", stacklevel=2)
        return recovered
    if store.has_state():
        warnings.warn(
            f"{store.directory}: removing a previous run's checkpoints (no --resume)", stacklevel=2
        )
        store.clear()
    return None


def build_grpc_server(
    coordinator: Coordinator,
    servicer: ParameterServerServicer,
    listen: str,
    tls: grpc.ServerCredentials | None = None,
) -> tuple[grpc.Server, health.HealthServicer, int]:
    """The gRPC server with our service, health and reflection, bound (with TLS when `tls` is
    given) but not started."""
    n = coordinator.num_workers
    peak = max(coordinator.k_max(0), coordinator.k_max(coordinator.round))
    limit = max(MAX_MESSAGE_BYTES, max_update_bytes(peak) + 1024)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max(16, 4 * n + 8), thread_name_prefix="rpc"),
        options=[("grpc.max_receive_message_length", limit), ("grpc.so_reuseport", 0)],
    )
    add_to_server(servicer, server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        SERVICE_NAME,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection.enable_server_reflection(names, server)
    try:
        port = (
            server.add_insecure_port(listen) if tls is None else server.add_secure_port(listen, tls)
        )
    except RuntimeError as exc:
        raise StartupError(f"--listen {listen}: cannot bind ({exc})") from None
    if port == 0:
        raise StartupError(f"--listen {listen}: cannot bind")
    return server, health_servicer, port


def serve(
    config: RunConfig,
    task: Task,
    engine: RoundEngine,
    max_nnz: Callable[[int], int],
    options: DaemonOptions,
    *,
    ready: Callable[[str], None],
    stop: threading.Event | None = None,
) -> int:
    """Run the server to the end of the run (or a signal); returns the process exit code."""
    stop = stop if stop is not None else threading.Event()
    store = None
    if options.checkpoint_dir is not None:
        store = CheckpointStore(
            options.checkpoint_dir, config.digest(), fsync_wal=options.fsync_wal
        )
    recovered = recover(options, store)
    elapsed = 0.0
    if recovered is not None and recovered.state is not None:
        elapsed = float(recovered.state.get("elapsed", 0.0))
    metrics = MetricsRecorder(
        options.out, config, task, resume=recovered is not None, elapsed=elapsed
    )
    coordinator = Coordinator(
        config,
        engine,
        max_nnz,
        options.settings,
        metrics=metrics,
        rounds_log=RoundLog(options.out),
        store=store,
    )
    try:
        coordinator.start(recovered)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        if recovered is None:
            raise
        raise StartupError(f"checkpoint: cannot restore the saved state ({exc})") from None
    servicer = ParameterServerServicer(
        coordinator, Authenticator(options.secret, config.cluster.workers), config, task
    )
    server, health_servicer, port = build_grpc_server(
        coordinator, servicer, options.listen, options.tls
    )
    server.start()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
    host = options.listen.rsplit(":", 1)[0]
    ready(f"{host}:{port}")
    code = _run(coordinator, stop, options.linger)
    health_servicer.enter_graceful_shutdown()
    coordinator.stop()
    server.stop(SHUTDOWN_GRACE_SECONDS).wait()
    coordinator.close(checkpoint=code == 0)
    return code


def _run(coordinator: Coordinator, stop: threading.Event, linger: float) -> int:
    """Tick until the run finished (then linger), a signal arrives, or storage failed."""
    while not stop.wait(TICK_SECONDS):
        if coordinator.failure is not None:
            log.error("stopping after a storage failure: %s", coordinator.failure)
            return 1
        if coordinator.finished:
            stop.wait(linger)
            return 0 if coordinator.failure is None else 1
        coordinator.tick()
    return 0 if coordinator.failure is None else 1


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT request a graceful shutdown (from the main thread only)."""

    def handle(signum: int, frame: object) -> None:
        del frame
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
