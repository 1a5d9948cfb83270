"""A thin gRPC client for the parameter server: stubs, credentials, deadlines and retries.

It translates between protobuf messages and tensors and survives an unreliable server — nothing
more. What to send and when to commit stays in the worker loop and the estimator.

Why retries look like this:

* UNAVAILABLE (server down or restarting) and DEADLINE_EXCEEDED (a call that took too long)
  are retried with exponential backoff and jitter, so n workers do not hammer a restarting
  server in lock-step. RESOURCE_EXHAUSTED is retried only when the server says the call may
  succeed later (the `byzps-retry-after-ms` trailer: over this worker's share of the server,
  byzps.server.limits — an honest worker only meets it if the server is configured tighter
  than its pace), after at least the wait it suggests; without that trailer (a request too
  large) it is final. Any other status is a real answer and is raised at once.
* A retried PushUpdate carries the *same* seq and the *same* encoded bytes: if the first attempt
  was applied before the connection broke, the server answers DUPLICATE and nothing is applied
  twice (exactly-once = at-least-once delivery + server-side dedup).
* After a failure the client registers again before the next attempt. Register is idempotent,
  tells a restarted server that the worker is back, and returns the server's last_seq, which the
  worker loop checks against its own ledger (`on_register`).
* Retrying is bounded: `RetryPolicy.give_up_after` seconds of consecutive failure raise
  ServerUnreachable, so a worker whose server is gone for good exits instead of hanging.
* A GetModel long-poll that reaches its deadline is a normal "no new round yet", not a failure:
  it is re-issued at once, bounded separately by `max_wait`.

The sparse downlink: with `sparse_downlink` (the default) the client keeps a ModelMirror of
(round, x, ĝ) and asks GetModelUpdate, which answers a caller one round behind with the change of
the aggregate only; the mirror applies it with the server's own float32 step, so the x handed to
the worker is bit-identical to the server's. Any gap (a skipped round, a new registration after
a failure) makes the server answer densely, and a server without GetModelUpdate (UNIMPLEMENTED)
is served by plain GetModel from then on.
"""

from __future__ import annotations

import enum
import logging
import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TypeVar

import grpc
from torch import Tensor

from byzps.common.codec import RETRY_AFTER_METADATA_KEY, decode_model, encode_push_request
from byzps.common.credentials import TOKEN_METADATA_KEY, token_for
from byzps.common.downlink import ModelMirror, decode_downlink
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.proto.v1 import parameter_server_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)
T = TypeVar("T")

#: Status codes that say "try again later", never "your request is wrong".
RETRYABLE = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})


def retry_after(exc: grpc.RpcError) -> float | None:
    """The wait (s) a refusal suggests before the same call is tried again, or None when the
    refusal says nothing of the kind (then it is final unless its code is RETRYABLE)."""
    try:
        trailers = exc.trailing_metadata() or ()  # type: ignore[attr-defined]
    except AttributeError:
        return None
    for key, value in trailers:
        if key == RETRY_AFTER_METADATA_KEY:
            try:
                return max(0.0, int(value) / 1000.0)
            except ValueError:
                return None
    return None


#: Seconds between the log lines of a worker that keeps retrying (the first failure is logged at
#: once, with the whole budget).
RETRY_LOG_SECONDS = 5.0

#: gRPC's own reconnect backoff defaults to 1 s … 120 s; a restarted server on the same port
#: should be found within about a second.
_CHANNEL_OPTIONS = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


def open_channel(
    address: str,
    credentials: grpc.ChannelCredentials | None = None,
    tls_server_name: str | None = None,
    *,
    own_connection: bool = False,
) -> grpc.Channel:
    """A channel to the server: TLS with `credentials` (and the certificate name to expect, when
    it differs from the address's host), plaintext without.

    gRPC shares one connection among all channels of a process that have the same target and
    arguments; `own_connection` gives this channel a connection of its own (a local subchannel
    pool), so that a process holding many identities can spread their calls over a few
    connections and stay under the server's streams-per-connection bound."""
    options = list(_CHANNEL_OPTIONS)
    if own_connection:
        options.append(("grpc.use_local_subchannel_pool", 1))
    if credentials is None:
        return grpc.insecure_channel(address, options=options)
    if tls_server_name:
        options.append(("grpc.ssl_target_name_override", tls_server_name))
    return grpc.secure_channel(address, credentials, options=options)


class Pushed(enum.Enum):
    """What became of a pushed update."""

    ACCEPTED = "ACCEPTED"  # applied now: commit it
    DUPLICATE = "DUPLICATE"  # applied by an earlier attempt of the same seq: commit it
    RUN_FINISHED = "RUN_FINISHED"  # the run ended before it arrived: nothing applied

    @property
    def applied(self) -> bool:
        """The server applied it, so the worker commits it (its mirror of g moves)."""
        return self is not Pushed.RUN_FINISHED


class ServerUnreachable(RuntimeError):
    """The server stayed unreachable for longer than the retry budget."""


class ServerError(RuntimeError):
    """The server answered with a non-retryable gRPC status."""

    def __init__(self, method: str, code: grpc.StatusCode, details: str) -> None:
        super().__init__(f"{method}: {code.name}: {details}")
        self.method = method
        self.code = code
        self.details = details


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff with full-range jitter, bounded by a total time budget.

    Attempt i waits min(max_backoff, initial·multiplier^i) scaled by a uniform factor in
    [1 − jitter, 1].
    """

    initial_backoff: float = 0.05
    max_backoff: float = 2.0
    multiplier: float = 2.0
    jitter: float = 0.5
    give_up_after: float = 120.0

    def delays(self, rng: random.Random) -> Iterator[float]:
        delay = self.initial_backoff
        while True:
            yield delay * (1.0 - self.jitter * rng.random())
            delay = min(self.max_backoff, delay * self.multiplier)


def _method_path(name: str) -> str:
    """The gRPC path of one of the ParameterServer service's methods, from the descriptor."""
    service = pb.DESCRIPTOR.services_by_name["ParameterServer"]
    return f"/{service.full_name}/{service.methods_by_name[name].name}"


PUSH_PATH = _method_path("PushUpdate")


def wire_push(channel: grpc.Channel) -> grpc.UnaryUnaryMultiCallable:
    """PushUpdate taking its request already in wire form (encode_push_request, or bytes crafted
    on purpose): the stub's own serializer would parse nothing but copy every update once more."""
    return channel.unary_unary(
        PUSH_PATH, request_serializer=None, response_deserializer=pb.Ack.FromString
    )


class ParameterServerClient:
    """One worker identity talking to one server address.

    It authenticates with `token`, the worker's own token (`byzps credentials issue`), or —
    the legacy way — derives it from the master `secret`; with neither, it sends no token
    (a server run with --no-auth).

    Methods block until they have an answer, retrying transient failures per `retry`.
    `call_timeout` bounds each unary call, `poll_timeout` each GetModel long-poll, and `max_wait`
    the total time spent waiting for a new model. `channel`: a channel shared with other
    identities of the same process (`open_channel`), which `close` leaves open; the token still
    goes with every call, so sharing a connection shares nothing else.
    """

    def __init__(
        self,
        address: str,
        worker_id: str,
        secret: bytes | None = None,
        *,
        token: str | None = None,
        call_timeout: float = 10.0,
        poll_timeout: float = 30.0,
        max_wait: float = 3600.0,
        retry: RetryPolicy | None = None,
        config_digest: str = "",
        sparse_downlink: bool = True,
        credentials: grpc.ChannelCredentials | None = None,
        tls_server_name: str | None = None,
        on_register: Callable[[pb.RegisterReply], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
        clock: Callable[[], float] = time.monotonic,
        channel: grpc.Channel | None = None,
    ) -> None:
        self.address = address
        self.worker_id = worker_id
        self.call_timeout = call_timeout
        self.poll_timeout = poll_timeout
        self.max_wait = max_wait
        self.retry = retry or RetryPolicy()
        self.config_digest = config_digest
        self.on_register = on_register
        self._sleep = sleep
        self._clock = clock
        self._rng = random.Random()
        if secret is not None and token is not None:
            raise ValueError("give the worker's token or the master secret, not both")
        self._token = token if secret is None else token_for(secret, worker_id)
        self._metadata = () if self._token is None else ((TOKEN_METADATA_KEY, self._token),)
        # A channel given by the caller is shared with other identities and stays the caller's
        # to close (byzps.worker.fleet multiplexes many identities over a few connections).
        self._owns_channel = channel is None
        self._channel = channel or open_channel(address, credentials, tls_server_name)
        self._stub = pb_grpc.ParameterServerStub(self._channel)
        self._push_wire = wire_push(self._channel)
        self.registration: pb.RegisterReply | None = None
        self._reregister = False
        #: (round, x, ĝ) as last received; None: dense GetModel only.
        self.mirror: ModelMirror | None = ModelMirror() if sparse_downlink else None

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def metadata(self) -> tuple[tuple[str, str], ...]:
        """The call metadata this identity presents (its token): for other callers that speak
        as this worker over their own channels (byzps.worker.byzantine.protocol)."""
        return self._metadata

    def close(self) -> None:
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> ParameterServerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- RPCs --------------------------------------------------------------------------------

    def register(self) -> pb.RegisterReply:
        """Register (idempotent); remembers the reply and hands it to `on_register`."""
        return self._retrying("Register", self._register_once)

    def get_model(self, round: int, known_round: int | None = None) -> tuple[int, Tensor]:
        """(r, x_r) for the server's round r ≥ `round` (and > `known_round`), long-polling."""
        dim = self._dim()
        started = self._clock()
        while True:
            try:
                return self._retrying(
                    "GetModel", lambda: self._fetch(round, known_round, dim), retry_deadline=False
                )
            except _PollExpired:
                if self._clock() - started > self.max_wait:
                    raise ServerUnreachable(
                        f"GetModel: no model of round >= {round} after {self.max_wait:.0f} s"
                    ) from None

    def _fetch(self, round: int, known_round: int | None, dim: int) -> tuple[int, Tensor]:
        """One model call: GetModelUpdate through the mirror, or plain GetModel without one."""
        request = pb.GetModelRequest(worker_id=self.worker_id, round=round, wait=True)
        if known_round is not None:
            request.known_round = known_round
        mirror = self.mirror
        if mirror is None:
            return decode_model(
                self._stub.GetModel(request, timeout=self.poll_timeout, metadata=self._metadata),
                dim=dim,
            )
        # Saying which round it holds never changes the answer's round: r >= round > held.
        if (
            mirror.round is not None
            and round > mirror.round
            and known_round in (None, mirror.round)
        ):
            request.known_round = mirror.round
            request.has_aggregate = mirror.has_aggregate
        try:
            stream = self._stub.GetModelUpdate(
                request, timeout=self.poll_timeout, metadata=self._metadata
            )
            downlink = decode_downlink(stream, dim=dim)  # the whole stream, before any change
        except grpc.RpcError as exc:
            if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
                raise
            log.info("server %s has no GetModelUpdate: dense downlink only", self.address)
            self.mirror = None
            return self._fetch(round, known_round, dim)
        mirror.apply(downlink)
        assert mirror.round is not None and mirror.x is not None
        return mirror.round, mirror.x.clone()  # the mirror must stay the server's exact copy

    def push(self, round: int, seq: int, update: pb.SparseUpdate | bytes) -> Pushed:
        """Send one update (a message, or its wire bytes: encode_sparse_wire) and say what became
        of it; a retry resends the identical request (same seq), so it is applied at most once.

        The server refuses by ending the call with a status. One refusal is part of a normal
        run's end — OUT_OF_RANGE, the run finished before this update arrived (a round closed
        by quorum without it) — and is its own outcome, Pushed.RUN_FINISHED; any other refusal
        raises ServerError.
        """
        wire = update if isinstance(update, bytes) else update.SerializeToString()
        request = encode_push_request(self.worker_id, round, seq, wire)
        try:
            ack = self._retrying(
                "PushUpdate",
                lambda: self._push_wire(
                    request, timeout=self.call_timeout, metadata=self._metadata
                ),
            )
        except ServerError as exc:
            if exc.code != grpc.StatusCode.OUT_OF_RANGE:
                raise
            log.info("worker %s: seq %d not applied (%s)", self.worker_id, seq, exc.details)
            return Pushed.RUN_FINISHED
        if ack.status == pb.ACK_STATUS_ACCEPTED:
            return Pushed.ACCEPTED
        if ack.status == pb.ACK_STATUS_DUPLICATE:
            return Pushed.DUPLICATE
        raise ServerError("PushUpdate", grpc.StatusCode.UNKNOWN, f"an OK Ack with status {ack}")

    def status(self) -> pb.StatusReply:
        return self._retrying(
            "Status",
            lambda: self._stub.Status(
                pb.StatusRequest(), timeout=self.call_timeout, metadata=self._metadata
            ),
        )

    # --- machinery ---------------------------------------------------------------------------

    def _register_once(self) -> pb.RegisterReply:
        request = pb.RegisterRequest(
            worker_id=self.worker_id,
            token=(self._token or "").encode(),
            config_digest=self.config_digest,
        )
        reply = self._stub.Register(request, timeout=self.call_timeout, metadata=self._metadata)
        self.registration = reply
        if self._reregister and self.mirror is not None:
            self.mirror.reset()  # after a failure, take the next model densely
        self._reregister = False
        if self.on_register is not None:
            self.on_register(reply)
        return reply

    def _dim(self) -> int:
        if self.registration is None:
            self.register()
        assert self.registration is not None
        return int(self.registration.model.dim)

    def _retrying(self, method: str, attempt: Callable[[], T], *, retry_deadline: bool = True) -> T:
        """Run `attempt` until it succeeds, a non-retryable status arrives or the budget ends.

        With `retry_deadline` False, DEADLINE_EXCEEDED is the end of a long-poll and surfaces as
        _PollExpired instead of being retried with backoff.
        """
        delays = self.retry.delays(self._rng)
        first_failure: float | None = None
        last_said = self._clock()
        while True:
            try:
                if self._reregister and method != "Register":
                    self._register_once()
                result = attempt()
                if first_failure is not None:
                    log.info("%s: server back after %.1f s", method, self._clock() - first_failure)
                return result
            except grpc.RpcError as exc:
                code = exc.code()
                details = exc.details() or ""
                if code == grpc.StatusCode.DEADLINE_EXCEEDED and not retry_deadline:
                    raise _PollExpired from None
                suggested = retry_after(exc)
                if code not in RETRYABLE and suggested is None:
                    raise ServerError(method, code, details) from None
                now = self._clock()
                if first_failure is None:
                    first_failure = now
                    log.warning(
                        "%s: %s (%s); retrying for up to %.0f s",
                        method, code.name, details, self.retry.give_up_after,
                    )  # fmt: skip
                if now - first_failure > self.retry.give_up_after:
                    raise ServerUnreachable(
                        f"{method}: server {self.address} unreachable for "
                        f"{now - first_failure:.1f} s ({code.name}: {details})"
                    ) from None
                self._reregister = code == grpc.StatusCode.UNAVAILABLE or self._reregister
                delay = max(next(delays), suggested or 0.0)
                if now - last_said >= RETRY_LOG_SECONDS:  # a waiting worker is never silent long
                    last_said = now
                    left = self.retry.give_up_after - (now - first_failure)
                    log.info(
                        "%s: still %s (%s); retrying, %.0f s left before giving up",
                        method, code.name, details, left,
                    )  # fmt: skip
                log.debug("%s: %s (%s); retrying in %.2f s", method, code.name, details, delay)
                self._sleep(delay)


class _PollExpired(Exception):
    """A GetModel long-poll reached its deadline without a new round (internal)."""
