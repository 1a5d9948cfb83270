"""The server process: recover or start the coordinator, serve gRPC, tick deadlines, shut down.

Lifecycle:
1. persistence — with --resume, load the newest checkpoint and replay the write-ahead log after
   it; otherwise start at x⁰ (an old run's files in the checkpoint directory are removed);
   either way write a checkpoint generation to resume from;
2. serve — ParameterServer, grpc.health.v1 (SERVING once listening) and server reflection, all
   on one asyncio event loop (grpc.aio: a waiting call costs no thread, see
   byzps.server.service); print the one "listening" line; tick round deadlines on the loop;
3. end — after the last round closed and the results were written, linger so workers can fetch
   the final model; on SIGTERM/SIGINT stop earlier. Both: refuse new calls, let in-flight ones
   finish, write a final checkpoint, exit 0. A failed write-ahead log exits 1 without a
   checkpoint (the engine ran ahead of the disk; the last checkpoint + log are the truth).

`ServerThread` runs the same server on a background thread's event loop, for tests and for
embedding a server in another program.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import torch
from grpc_health.v1 import health, health_pb2

from byzps.common.components import build_run_compressor
from byzps.common.config import RunConfig
from byzps.common.shards import ShardLayout, ShardRange
from byzps.common.tasks.base import Task
from byzps.server import wal
from byzps.server.auth import Authenticator
from byzps.server.checkpoint import CheckpointStore, Recovered
from byzps.server.coordinator import Coordinator, Settings
from byzps.server.engine import RoundEngine
from byzps.server.limits import Limits
from byzps.server.metrics import MetricsEndpoint, PrometheusMetrics, ServerMetrics
from byzps.server.results import MetricsRecorder, RoundLog
from byzps.server.service import SERVICE_NAME, ParameterServerServicer, add_to_server
from byzps.server.shard_peer import (
    Outbox,
    PeerError,
    Peers,
    ShardContext,
    ShardPeerServicer,
    add_peer_service,
)
from byzps.server.side_services import add_side_services
from byzps.server.validation import Door
from byzps.server.wal import FsyncPolicy

log = logging.getLogger("byzps.server")

TICK_SECONDS = 0.05
SHUTDOWN_GRACE_SECONDS = 5.0
#: gRPC's own ceiling on a request, above every per-method limit of the servicer (which refuses
#: by exact size): small requests, health and reflection fit; only PushUpdate may be larger.
BASE_RECEIVE_BYTES = 64 * 1024
#: HTTP/2 streams one connection may hold open at once: a worker needs two or three.
MAX_STREAMS_PER_CONNECTION = 32


#: File descriptors a server needs besides its workers' connections: the write-ahead log and
#: checkpoints, result files, the metrics socket, gRPC's epoll and wakeup pipes, the listening
#: sockets, with room for reconnects (a reconnecting worker briefly holds two). Kept out of the
#: connection cap (`connection_cap`), so connections can never take them.
BASE_DESCRIPTORS = 256
#: A connection without a call for this long is closed (HTTP/2 GOAWAY; a worker's channel
#: reconnects at its next call): idle connections cost a caller nothing to hold.
CONNECTION_IDLE_SECONDS = 120.0
#: Longest a new connection may take to finish its TLS and HTTP/2 handshake.
HANDSHAKE_SECONDS = 10.0
#: Bytes a write-ahead log record holds besides the update itself (header, kind, seq, round,
#: row: 29), rounded up.
RECORD_FIELD_ROOM = 64
#: The least connection cap a server has, open-file limit permitting (`connection_cap`).
MIN_CONNECTIONS = 4096


def raise_descriptor_limit(num_workers: int) -> int:
    """Raise this process's soft limit on open files to the hard limit (to what n workers need
    where the hard one is unlimited); returns the soft limit now in force.

    Why: every worker holds a connection, one descriptor each, and many systems start processes
    with a soft limit of 1,024 (the hard one is usually far higher). Past it, the gRPC core
    fails to accept and the workers beyond it only see UNAVAILABLE until their retry budget
    runs out; at n = 1,000 that is most of the run's margin gone. Raising the soft limit up to
    the hard one is what the hard limit is for; a hard limit too low is logged once, naming the
    fix, rather than failing later one connection at a time."""
    try:
        import resource
    except ImportError:  # not on POSIX: nothing to raise
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * num_workers + BASE_DESCRIPTORS
    target = max(soft, needed) if hard == resource.RLIM_INFINITY else hard
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as exc:
            log.warning("cannot raise the open-file limit from %d to %d: %s", soft, target, exc)
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning(
            "open-file limit %d is below the %d that %d workers need; raise it (ulimit -n) "
            "or workers past it will not be able to connect",
            soft,
            needed,
            num_workers,
        )
    return soft


def peak_rss_mb() -> float:
    """This process's peak resident set so far, in MB (Linux reports ru_maxrss in KiB); NaN
    where the resource module does not exist. Logged at exit, read by benchmarks/bench_shards.py."""
    try:
        import resource
    except ImportError:
        return float("nan")
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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
    #: When the write-ahead log is fsynced (byzps.server.wal.FsyncPolicy, docs/durability.md).
    wal_fsync: FsyncPolicy = FsyncPolicy.GROUP
    #: TLS for the port (byzps.common.credentials.server_tls); None: plaintext.
    tls: grpc.ServerCredentials | None = None
    #: Each worker's share of the server (byzps.server.limits).
    limits: Limits = field(default_factory=Limits)
    #: Under mutual TLS, a client certificate naming worker K may call as K only
    #: (byzps.server.auth); off for client certificates from a PKI that names no byzps worker.
    bind_certificates: bool = True
    #: Serve Prometheus metrics at http://METRICS/metrics (byzps.server.metrics); None: off.
    metrics: str | None = None
    #: With cluster.shards = S > 1: this server's rank, the S shards' addresses in rank order
    #: (or a file the launcher writes them to once all listen), and how long a round's close
    #: waits for a peer's part beyond the round deadline before this shard stops
    #: (byzps.server.shard_peer).
    shard: int = 0
    peers: tuple[str, ...] | Path = ()
    peer_timeout: float = 120.0
    #: How a shard serving TLS calls its peers: trusting the CA of their certificates and
    #: presenting its own (byzps.common.credentials.channel_tls); None: plaintext.
    peer_tls: grpc.ChannelCredentials | None = None


def recover(options: DaemonOptions, store: CheckpointStore | None) -> Recovered | None:
    """What the run starts from; StartupError when --resume cannot be honoured, or when the
    checkpoint directory holds a run that the command line did not say to resume or replace
    (the CLI's claim on the directory normally refuses that first)."""
    if store is None:
        if options.resume:
            raise StartupError("--resume needs --checkpoint-dir (or --out)")
        return None
    if options.resume:
        recovered = store.recover()
        if recovered.state is None and not recovered.records:
            log.warning("%s: nothing to resume, starting fresh", store.directory)
        else:
            start = 0 if recovered.state is None else int(recovered.state["engine"]["round"])
            log.info(
                "resuming from %s: checkpoint of round %d, then %d logged records",
                store.directory,
                start,
                len(recovered.records),
            )
        return recovered
    if store.has_state():
        raise StartupError(
            f"{store.directory} holds a run's checkpoints: pass --resume to continue it or "
            "--overwrite to replace it"
        )
    return None


def connection_cap(descriptor_limit: int, num_workers: int) -> int:
    """The most connections the server accepts at once: room for n workers four times over
    (reconnects, fleets, operators' tools; at least MIN_CONNECTIONS), within the open-file
    limit less the BASE_DESCRIPTORS its files need (a negative limit: unknown or unlimited).

    Why: an idle HTTP/2 connection needs no credential, and each holds a descriptor and ~14 KB.
    Uncapped, 1,100 of them took all 1,024 of a server's descriptors, and every checkpoint
    failed (EMFILE); 19,000 held 272 MB. Capped, callers past the cap are turned away, and the
    server's own files keep their descriptors."""
    wanted = max(MIN_CONNECTIONS, 4 * num_workers + BASE_DESCRIPTORS)
    if 0 <= descriptor_limit < 2**31:
        wanted = min(wanted, descriptor_limit - BASE_DESCRIPTORS)
    return max(1, wanted)


def grpc_options(door: Door, connections: int | None = None) -> list[tuple[str, int]]:
    """Channel arguments of the server's port: receive no request larger than the largest legal
    one, bound the streams one connection may hold and (`connections`) the connections held at
    once, and close connections idle for CONNECTION_IDLE_SECONDS or slow to handshake."""
    largest = max(BASE_RECEIVE_BYTES, *door.request_limits().values())
    options = [
        ("grpc.max_receive_message_length", largest),
        ("grpc.max_concurrent_streams", MAX_STREAMS_PER_CONNECTION),
        ("grpc.so_reuseport", 0),
        ("grpc.max_connection_idle_ms", int(CONNECTION_IDLE_SECONDS * 1000)),
        ("grpc.server_handshake_timeout_ms", int(HANDSHAKE_SECONDS * 1000)),
    ]
    if connections is not None:
        options.append(("grpc.max_allowed_incoming_connections", connections))
    return options


def bind(
    door: Door,
    listen: str,
    tls: grpc.ServerCredentials | None = None,
    connections: int | None = None,
) -> tuple[grpc.aio.Server, int]:
    """An aio gRPC server bound to `listen` (TLS when `tls` is given), accepting at most
    `connections` at once, with no service yet; it must be made on the loop that will run it.
    Bound first, before anything is written, so an address in use fails at once and leaves no
    files behind."""
    server = grpc.aio.server(options=grpc_options(door, connections))
    try:
        port = (
            server.add_insecure_port(listen) if tls is None else server.add_secure_port(listen, tls)
        )
    except RuntimeError as exc:
        raise StartupError(f"--listen {listen}: cannot bind ({exc})") from None
    if port == 0:
        raise StartupError(f"--listen {listen}: cannot bind (address in use?)")
    return server, port


def add_services(
    server: grpc.aio.Server, servicer: ParameterServerServicer
) -> health.aio.HealthServicer:
    """Our service, grpc.health.v1 and server reflection on `server` (before it starts), the
    latter two within the share of callers without a credential (byzps.server.side_services)."""
    add_to_server(servicer, server)
    return add_side_services(server, servicer.admission, (SERVICE_NAME,))


@contextmanager
def metrics_served(options: DaemonOptions, num_workers: int) -> Iterator[ServerMetrics]:
    """The server's metrics, served at --metrics until the block ends; bound at once, so a
    taken port fails (StartupError naming --metrics) before anything is written. Metrics that
    report nothing when the option is off."""
    if options.metrics is None:
        yield ServerMetrics()
        return
    metrics = PrometheusMetrics(num_workers)
    try:
        endpoint = MetricsEndpoint(options.metrics, metrics.registry)
    except (OSError, ValueError) as exc:
        raise StartupError(f"--metrics {options.metrics}: cannot bind ({exc})") from None
    log.info("metrics on %s", endpoint.url)
    try:
        yield metrics
    finally:
        endpoint.close()


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
    shard = ShardLayout(task.dim, config.cluster.shards).shard(options.shard)
    width = int(engine.x.numel())
    if width != shard.width:
        raise StartupError(f"the engine holds {width} coordinates, shard {shard} {shard.width}")
    door = build_door(config, task, max_nnz, shard)
    check_fits_the_log(door)
    return asyncio.run(_serve(config, task, engine, door, options, ready, stop))


def check_fits_the_log(door: Door) -> None:
    """StartupError when the largest request the door admits could not be one write-ahead log
    record (with room for the record's own fields): the log would refuse to write it, and gRPC
    cannot carry a message that large either."""
    largest = max(door.request_limits().values())
    if largest + RECORD_FIELD_ROOM > wal.MAX_RECORD_BYTES:
        raise StartupError(
            f"task: an update of this model may take {largest} bytes, over what one "
            f"write-ahead log record holds ({wal.MAX_RECORD_BYTES}); shard the model "
            "(cluster.shards) or compress it"
        )


def build_door(
    config: RunConfig, task: Task, max_nnz: Callable[[int], int], shard: ShardRange | None = None
) -> Door:
    """The door of the run's server (of one `shard` of it): the run's compressor, rounds and
    seed, so that every check an update's round fixes (its k_max, Perm-K's shared seed) holds."""
    spec = build_run_compressor(config, task)
    width = task.dim if shard is None else shard.width
    return Door(
        width, config.compressor.name, max_nnz, config.run.rounds, spec, shard, config.run.seed
    )


def shard_context(config: RunConfig, task: Task, options: DaemonOptions) -> ShardContext | None:
    """This server's place among cluster.shards (None when it is the only one)."""
    layout = ShardLayout(task.dim, config.cluster.shards)
    if layout.count == 1:
        return None
    if options.tls is not None and options.peer_tls is None:
        raise StartupError(
            "cluster.shards: shards serving TLS call each other over TLS: pass --tls-peer-ca "
            "(or --tls-client-ca) to check the other shards' certificates"
        )
    if not options.peers:
        raise StartupError("cluster.shards: a shard needs the shards' addresses (--peers)")
    shard = layout.shard(options.shard)
    # A peer short of pushes closes only at its round deadline, so the wait for its part runs
    # from then: a Byzantine worker that pushes to one shard only must not make the other
    # give up first (with a deadline past the peer timeout it stopped in round 0).
    wait = options.settings.round_deadline + options.peer_timeout
    peers = Peers(shard, options.peers, options.secret, wait, credentials=options.peer_tls)
    return ShardContext(shard, layout.widths, Outbox(), peers)


def _start_coordinator(
    config: RunConfig,
    task: Task,
    engine: RoundEngine,
    door: Door,
    options: DaemonOptions,
    observer: ServerMetrics,
    shards: ShardContext | None = None,
) -> Coordinator:
    """Recover (or start fresh) and open the run's files: the coordinator, started. On a shard
    only rank 0 writes the run's metrics, evaluating the whole model from every shard's slice."""
    store = None
    if options.checkpoint_dir is not None:
        store = CheckpointStore(options.checkpoint_dir, config.digest(), fsync=options.wal_fsync)
    recovered = recover(options, store)
    elapsed = 0.0
    if recovered is not None and recovered.state is not None:
        elapsed = float(recovered.state.get("elapsed", 0.0))
    evaluates = shards is None or shards.shard.rank == 0
    metrics = MetricsRecorder(
        options.out if evaluates else None,
        config,
        task,
        resume=recovered is not None,
        elapsed=elapsed,
    )
    if shards is not None:

        def assemble(round: int, x: torch.Tensor) -> torch.Tensor | None:
            # A resumed rank 0 may re-evaluate a round whose slices a peer no longer keeps (it
            # keeps the last few): that record is lost, not the run.
            try:
                return torch.from_numpy(shards.gather_model(round, x.numpy()))
            except PeerError as exc:
                log.error("no metrics record of round %d: %s", round, exc)
                return None

        metrics.assemble = assemble
    coordinator = Coordinator(
        config,
        engine,
        door,
        options.settings,
        metrics=metrics,
        rounds_log=RoundLog(options.out),
        store=store,
        observer=observer,
        shards=shards,
    )
    try:
        coordinator.start(recovered)
    except (ValueError, KeyError, TypeError, RuntimeError) as exc:
        if recovered is None:
            raise
        raise StartupError(f"checkpoint: cannot restore the saved state ({exc})") from None
    return coordinator


async def _serve(
    config: RunConfig,
    task: Task,
    engine: RoundEngine,
    door: Door,
    options: DaemonOptions,
    ready: Callable[[str], None],
    stop: threading.Event,
) -> int:
    descriptors = raise_descriptor_limit(config.cluster.workers)
    shards = shard_context(config, task, options)
    cap = connection_cap(descriptors, config.cluster.workers)
    server, port = bind(door, options.listen, options.tls, cap)
    with metrics_served(options, config.cluster.workers) as metrics:
        coordinator = _start_coordinator(config, task, engine, door, options, metrics, shards)
        auth = Authenticator(
            options.secret, config.cluster.workers, bind_certificates=options.bind_certificates
        )
        servicer = ParameterServerServicer(
            coordinator,
            auth,
            config,
            task,
            limits=options.limits,
            metrics=metrics,
            shard=door.shard,
        )
        try:
            health_servicer = add_services(server, servicer)
            if shards is not None:
                add_peer_service(server, ShardPeerServicer(shards.outbox, options.secret))
            await server.start()
            servicer.attach(asyncio.get_running_loop())
            await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
            await health_servicer.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
            host = options.listen.rsplit(":", 1)[0]
            ready(f"{host}:{port}")
            code = await _run(coordinator, servicer, stop, options.linger)
            await health_servicer.enter_graceful_shutdown()
            coordinator.stop()
            await server.stop(SHUTDOWN_GRACE_SECONDS)
        finally:
            servicer.close()
            if shards is not None:
                shards.peers.close()
        coordinator.close(checkpoint=code == 0)
        if code == 0 and coordinator.results_missing:
            log.error("the finished run's results could not be written (see above)")
            code = 1
        log.info("exiting with code %d; peak resident memory %.1f MB", code, peak_rss_mb())
        return code


async def _run(
    coordinator: Coordinator,
    servicer: ParameterServerServicer,
    stop: threading.Event,
    linger: float,
) -> int:
    """Tick until the run finished (then linger), a signal arrives, or the log or a peer failed."""
    while not stop.is_set():
        await asyncio.sleep(TICK_SECONDS)
        if coordinator.failure is not None:
            log.error("stopping (the log or a peer shard failed): %s", coordinator.failure)
            return 1
        if coordinator.finished:
            await _sleep_unless(stop, linger)
            return 0 if coordinator.failure is None else 1
        await servicer.offload(coordinator.tick)
    return 0 if coordinator.failure is None else 1


async def _sleep_unless(stop: threading.Event, seconds: float) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    while not stop.is_set() and loop.time() < end:
        await asyncio.sleep(min(TICK_SECONDS, max(0.0, end - loop.time())))


class ServerThread:
    """A started coordinator served by the aio gRPC server on a background thread's loop.

    The coordinator is the caller's (started, with whatever clock it likes); this only serves it
    on `listen` until `stop()`, which also stops the coordinator (not close: the caller owns its
    files)."""

    def __init__(
        self,
        servicer: ParameterServerServicer,
        listen: str = "127.0.0.1:0",
        tls: grpc.ServerCredentials | None = None,
    ) -> None:
        self.servicer = servicer
        self._listen = listen
        self._tls = tls
        self._loop = asyncio.new_event_loop()
        self._stopped: asyncio.Event | None = None
        self._started = threading.Event()
        self._error: BaseException | None = None
        self.port = 0
        self._thread = threading.Thread(target=self._main, name="grpc-server", daemon=True)
        self._thread.start()
        self._started.wait(30)
        if self._error is not None:
            raise self._error
        if not self.port:
            raise RuntimeError("the server thread did not start within 30 s")

    @property
    def address(self) -> str:
        host = self._listen.rsplit(":", 1)[0]
        return f"{host}:{self.port}"

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._serve())
        except BaseException as exc:  # surfaced to the constructor, or lost after start
            self._error = exc
            self._started.set()
        finally:
            self._loop.close()

    async def _serve(self) -> None:
        self._stopped = asyncio.Event()
        server, self.port = bind(self.servicer.coordinator.door, self._listen, self._tls)
        add_services(server, self.servicer)
        await server.start()
        self.servicer.attach(asyncio.get_running_loop())
        self._started.set()
        await self._stopped.wait()
        self.servicer.coordinator.stop()
        await server.stop(0)

    def stop(self) -> None:
        if self._thread.is_alive() and self._stopped is not None:
            self._loop.call_soon_threadsafe(self._stopped.set)
        self._thread.join(30)
        self.servicer.close()


def install_signal_handlers(stop: threading.Event) -> None:
    """SIGTERM and SIGINT request a graceful shutdown (from the main thread only)."""

    def handle(signum: int, frame: object) -> None:
        del frame
        log.info("signal %d: shutting down", signum)
        stop.set()

    signal.signal(signal.SIGTERM, handle)
    signal.signal(signal.SIGINT, handle)
