"""Live server metrics for Prometheus: what the server counts, and the read-only /metrics endpoint.

Why: an operator watches a run with the tools already watching everything else, so `byzps server
--metrics HOST:PORT` serves the Prometheus text format (docs/metrics.md names every series and
its unit). The server's other outputs (metrics.jsonl, rounds.jsonl, Status) stay as they are;
this adds live counters, not a second source of truth for results.

Byzantine safety, the three rules this module keeps:

* bounded cardinality: the only per-worker label is `worker`, and its values are the n
  configured ids "0" … "n−1", written only for a caller whose credential proved that id
  (byzps.server.auth); a `reason` or `code` label is the name of a `Refusal` / gRPC status, a
  `method` one of the four method groups. No label ever holds a client-supplied string, so a
  worker cannot grow the series set, whatever it sends.
* the hot path stays cheap: the servicer's event loop and the coordinator only increment
  counters (one short, uncontended lock inside prometheus-client per increment; no lock is held
  across an await), and the one O(d) figure, ‖x‖₂, is computed once per closed round;
  everything the coordinator already counts is read at scrape time, lock-free.
* a flood of requests cannot slow rounds: the endpoint is prometheus-client's WSGI app served by a
  single thread that answers one HTTP/1.0 request at a time, at most MAX_REQUESTS_PER_SECOND of
  them, with a 5 s socket timeout; further connections wait in the kernel's small accept backlog,
  and never more than MAX_BUSY_SHARE (5 %) of the time rendering answers, whose cost grows with n
  (136 ms at n = 1,000). A flood thus costs the server at most 20 answers a second and 5 % of its
  time (and may deny scrapes), where the library's own server starts a thread per request, each
  taking the GIL from the rounds. Measured on 2 busy cores, 5 workers, 16 threads flooding
  /metrics from another process: 18.3 ms per round (p50) against 18.5 ms without the flood. It
  only answers GET (and OPTIONS) and binds only where the operator says; it is off by default.

`ServerMetrics` is the interface the server calls, and reports nothing; `PrometheusMetrics`
records into a private registry (one per server, so servers in one process never mix series).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from socketserver import TCPServer
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector
from torch import Tensor

if TYPE_CHECKING:
    from byzps.server.coordinator import Coordinator
    from byzps.server.limits import Admission

log = logging.getLogger("byzps.server")

#: Round durations (open → close): from a loopback round of a tiny model (ms) to quorum rounds
#: that wait for the deadline (10 s by default) and slow deployments.
ROUND_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
                 25.0, 60.0, 120.0)  # fmt: skip
#: Aggregation + model step: 0.1 ms (d = 123, cm) to seconds (gm at d = 1e7).
AGGREGATION_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                       0.25, 0.5, 1.0, 2.5, 5.0, 10.0)  # fmt: skip
#: A scrape client that sends nothing for this long is dropped (the endpoint serves one at a time).
SOCKET_TIMEOUT_SECONDS = 5.0
#: Requests the endpoint answers per second at most: ample for any number of Prometheus servers
#: (one scrape every few seconds each), and a flood's cost is capped at this many answers.
MAX_REQUESTS_PER_SECOND = 20.0
#: The largest share of the server's time the endpoint may take: after an answer that took t
#: seconds to render, the next waits at least t / MAX_BUSY_SHARE. Why: an answer holds the GIL
#: for its whole rendering, which grows with n (a series per worker and family): 136 ms at
#: n = 1,000 (measured), so 20 answers a second would have been 2.7 s of work a second, and a
#: flood of scrapes would have stopped the rounds. A scrape every few seconds is unaffected.
MAX_BUSY_SHARE = 0.05
#: The status code of a call that ended normally.
OK = "OK"
PUSH = "PushUpdate"


class ServerMetrics:
    """What the server reports as it runs (all no-ops here: metrics off). Every method is called
    from the servicer's event-loop thread except `round_closed`, which the coordinator calls
    under its lock."""

    def watch(self, coordinator: Coordinator, admission: Admission) -> None:
        """Read what `coordinator` and `admission` already count, at scrape time."""

    def call_started(self, method: str, peer: str) -> None:
        """A call of method group `method` from connection `peer` entered the servicer."""

    def call_ended(self, method: str, peer: str, code: str, row: int | None) -> None:
        """That call ended with status `code` (a gRPC status name); `row`: the worker it
        authenticated as (None: it did not get that far). A refused caller may hear its status
        a moment before this is called: the status goes out first."""

    def registered(self, row: int) -> None:
        """Worker `row` registered (again)."""

    def update_acked(self, row: int, *, duplicate: bool, wire_bytes: int) -> None:
        """An update of worker `row` was acknowledged: applied, or a duplicate."""

    def round_closed(self, seconds: float, aggregation_seconds: float, x: Tensor) -> None:
        """A round closed live (not in WAL replay) after `seconds` open; closing it (aggregation
        and step) took `aggregation_seconds`, leaving the model `x`."""


class PrometheusMetrics(ServerMetrics):
    """The server's metrics in a private prometheus-client registry (see docs/metrics.md)."""

    def __init__(self, num_workers: int) -> None:
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        self.num_workers = num_workers
        self.registry = CollectorRegistry()
        reg = self.registry
        self.rounds_closed = Counter(
            "byzps_rounds_closed", "Rounds this server process closed (WAL replay excluded).",
            registry=reg,
        )  # fmt: skip
        self.round_duration = Histogram(
            "byzps_round_duration_seconds", "Time from a round's opening to its close.",
            buckets=ROUND_BUCKETS, registry=reg,
        )  # fmt: skip
        self.aggregation = Histogram(
            "byzps_aggregation_duration_seconds",
            "Time to close a round: robust aggregation of the n candidates and the model step.",
            buckets=AGGREGATION_BUCKETS, registry=reg,
        )  # fmt: skip
        self.model_norm = Gauge(
            "byzps_model_norm", "Euclidean norm of the model after the last closed round.",
            registry=reg,
        )  # fmt: skip
        worker = ["worker"]
        self.registrations = Counter(
            "byzps_registrations", "Successful Register calls, per worker id.", worker,
            registry=reg,
        )  # fmt: skip
        self.accepted = Counter(
            "byzps_updates_accepted", "Updates applied, per worker id.", worker, registry=reg
        )
        self.duplicates = Counter(
            "byzps_updates_duplicate",
            "Pushes of an already applied sequence number (acknowledged, not applied).",
            worker, registry=reg,
        )  # fmt: skip
        self.update_bytes = Counter(
            "byzps_update_bytes", "Payload bytes of the applied updates, per worker id.",
            worker, registry=reg,
        )  # fmt: skip
        self.refused = Counter(
            "byzps_updates_refused",
            "Pushes refused after the sender authenticated, per worker id and status.",
            ["worker", "reason"], registry=reg,
        )  # fmt: skip
        self.calls = Counter(
            "byzps_calls", "Calls ended, per method group and gRPC status.",
            ["method", "code"], registry=reg,
        )  # fmt: skip
        self.in_progress = Gauge(
            "byzps_calls_in_progress", "Calls being served, per method group.", ["method"],
            registry=reg,
        )  # fmt: skip
        for row in range(num_workers):
            for family in (self.registrations, self.accepted, self.duplicates, self.update_bytes):
                family.labels(str(row))
        self._peers: dict[str, int] = {}
        self._live = _Live(lambda: len(self._peers), num_workers)
        reg.register(self._live)
        ProcessCollector(registry=reg)

    def watch(self, coordinator: Coordinator, admission: Admission) -> None:
        self._live.coordinator = coordinator
        self._live.admission = admission
        self._set_norm(coordinator.engine.x)  # x⁰, or the resumed model

    def call_started(self, method: str, peer: str) -> None:
        self.in_progress.labels(method).inc()
        self._peers[peer] = self._peers.get(peer, 0) + 1

    def call_ended(self, method: str, peer: str, code: str, row: int | None) -> None:
        self.calls.labels(method, code).inc()
        if method == PUSH and code != OK and self._known(row):
            self.refused.labels(str(row), code).inc()
        left = self._peers.get(peer, 0) - 1
        if left > 0:
            self._peers[peer] = left
        else:
            self._peers.pop(peer, None)
        # Last, so a scrape that sees no call in progress sees every ended call counted.
        self.in_progress.labels(method).dec()

    def registered(self, row: int) -> None:
        if self._known(row):
            self.registrations.labels(str(row)).inc()

    def update_acked(self, row: int, *, duplicate: bool, wire_bytes: int) -> None:
        if not self._known(row):
            return
        if duplicate:
            self.duplicates.labels(str(row)).inc()
            return
        self.accepted.labels(str(row)).inc()
        self.update_bytes.labels(str(row)).inc(wire_bytes)

    def round_closed(self, seconds: float, aggregation_seconds: float, x: Tensor) -> None:
        self.rounds_closed.inc()
        self.round_duration.observe(max(0.0, seconds))
        self.aggregation.observe(max(0.0, aggregation_seconds))
        self._set_norm(x)

    def _set_norm(self, x: Tensor) -> None:
        self.model_norm.set(float(torch.linalg.vector_norm(x, dtype=torch.float64)))

    def _known(self, row: int | None) -> bool:
        """Only the configured ids get a series (the operator's credential row n does not)."""
        return row is not None and 0 <= row < self.num_workers


class _Live(Collector):
    """What the coordinator and the admission control already count, read at scrape time without
    their locks (single int/bool reads; a scrape may see a value one event old)."""

    def __init__(self, connections: Callable[[], int], num_workers: int) -> None:
        self.coordinator: Coordinator | None = None
        self.admission: Admission | None = None
        self._connections = connections
        self._num_workers = num_workers

    def collect(self) -> Iterator[Metric]:
        yield _gauge("byzps_workers", "Workers the run is configured for (n).", self._num_workers)
        yield _gauge(
            "byzps_connections_active",
            "Client connections (peer address and port) with a call in progress.",
            self._connections(),
        )
        coordinator = self.coordinator
        if coordinator is not None:
            yield _gauge("byzps_round", "The round the server is in.", coordinator.round)
            yield _gauge("byzps_run_rounds", "Rounds the run is configured for.",
                         coordinator.rounds)  # fmt: skip
            yield _gauge("byzps_run_finished", "1 once the last round closed, else 0.",
                         int(coordinator.finished))  # fmt: skip
            yield _gauge("byzps_workers_registered", "Worker ids that have registered.",
                         coordinator.num_registered)  # fmt: skip
            received, sent = coordinator.traffic
            yield CounterMetricFamily(
                "byzps_received_bytes", "Serialized request bytes of authenticated-or-not calls.",
                value=received,
            )  # fmt: skip
            yield CounterMetricFamily(
                "byzps_sent_bytes", "Serialized reply bytes (model streams included).", value=sent
            )
            scores = coordinator.engine.suspicion.report()
            if scores is not None:
                suspicion = GaugeMetricFamily(
                    "byzps_worker_suspicion",
                    "Exponentially weighted share of each worker's state the robust rule "
                    "discounted (0: counted as an equal share, 1: ignored).",
                    labels=["worker"],
                )
                for row, score in enumerate(scores):
                    suspicion.add_metric([str(row)], score)
                yield suspicion
        if self.admission is not None:
            throttled = CounterMetricFamily(
                "byzps_calls_throttled",
                "Calls refused for going over the caller's share, per limit (server/limits.py).",
                labels=["reason"],
            )
            for reason, count in dict(self.admission.refused).items():
                throttled.add_metric([reason], count)
            yield throttled


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


# ----------------------------------------------------------------------------------------------
# The endpoint
# ----------------------------------------------------------------------------------------------


class _Quiet(WSGIRequestHandler):
    """One request per connection (HTTP/1.0), dropped after SOCKET_TIMEOUT_SECONDS of silence,
    and not logged (a scrape a second would drown the server's log)."""

    timeout = SOCKET_TIMEOUT_SECONDS

    def log_message(self, format: str, *args: Any) -> None:
        del format, args


class _Rendering:
    """Seconds the last answer took to render (set by `_only_metrics`, read by `_Server`)."""

    seconds = 0.0


class _Server(WSGIServer):
    """A single-threaded WSGI server that answers at most MAX_REQUESTS_PER_SECOND requests, and
    spends at most MAX_BUSY_SHARE of the time rendering them: it sleeps (holding no lock, not the
    GIL) until the next one is due, while further connections wait in the kernel's backlog. It
    also skips the reverse DNS lookup of its own address (HTTPServer.server_bind calls
    socket.getfqdn, which can stall without a resolver)."""

    _due = 0.0
    rendering = _Rendering()

    def server_bind(self) -> None:
        TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)
        self.setup_environ()

    def process_request(self, request: Any, client_address: Any) -> None:
        wait = self._due - time.monotonic()
        if wait > 0:
            time.sleep(wait)
        began = time.monotonic()
        self.rendering.seconds = 0.0
        try:
            super().process_request(request, client_address)
        finally:
            spent = self.rendering.seconds  # rendering only: a slow reader costs no GIL
            self._due = began + max(1.0 / MAX_REQUESTS_PER_SECOND, spent / MAX_BUSY_SHARE)


def _only_metrics(
    app: Callable[..., Iterable[bytes]], rendering: _Rendering | None = None
) -> Callable[..., Iterable[bytes]]:
    """`app` at /metrics, 404 elsewhere: the endpoint offers nothing else. The time `app` takes
    to render its answer goes to `rendering`."""

    def routed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") != "/metrics":
            start_response("404 Not Found", [("Content-Type", "text/plain")])
            return [b"metrics are at /metrics\n"]
        began = time.monotonic()
        try:
            return app(environ, start_response)  # prometheus-client renders it all here
        finally:
            if rendering is not None:
                rendering.seconds = time.monotonic() - began

    return routed


class MetricsEndpoint:
    """`registry` served at http://`address`/metrics from one daemon thread until `close()`.

    `address` is HOST:PORT or [IPV6]:PORT (port 0: any free one, see `port`); OSError when it
    cannot be bound, before anything is served."""

    def __init__(self, address: str, registry: CollectorRegistry) -> None:
        host, sep, port = address.rpartition(":")
        if not sep or not port.isdigit():
            raise ValueError(f"address: expected HOST:PORT, got {address!r}")
        host = host.strip("[]")
        infos = socket.getaddrinfo(
            host, int(port), type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )
        family, _, _, _, sockaddr = infos[0]
        server_class = type("_BoundServer", (_Server,), {"address_family": family})
        rendering = _Rendering()
        app = _only_metrics(make_wsgi_app(registry, disable_compression=True), rendering)
        self._httpd = server_class(sockaddr[:2], _Quiet)
        self._httpd.rendering = rendering
        self._httpd.set_app(app)
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, args=(0.1,), name="metrics-http", daemon=True
        )  # polls for close() every 0.1 s
        self._thread.start()

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}/metrics"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(SOCKET_TIMEOUT_SECONDS + 1)
