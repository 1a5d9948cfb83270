"""Protocol-level attacks: what F Byzantine identities can do to a live server besides sending
bad gradients — flood it with calls, stall its streams, trickle requests, pad messages, time
their pushes.

Each attack is a small class registered by name in PROTOCOL_ATTACKS; `byzps attack --protocol
NAME [--protocol-param [NAME.]KEY=VALUE ...]` runs any number of them beside the cohort's
gradient attack (a ProtocolCampaign). The rules they all follow:

* Only the members' own identities: every call names a member's worker id and carries that
  member's own token, exactly the metadata its ParameterServerClient sends; an attack never
  needs an honest id, the master secret or another member's token.
* Bounded: each attack runs in daemon threads with a bounded number of calls, streams or
  connections in flight (its parameters, counted per member unless said otherwise), and
  everything stops with the cohort: when the run ends the campaign sets its stop event and
  closes every channel and socket the attacks opened, which cancels whatever is in flight.
* The cohort's own calls come first: a server with per-worker limits (RESOURCE_EXHAUSTED)
  counts an attack's calls against the member it names, so a flood would also refuse the
  member's own gradient push and model fetch. Whenever a member's client backs off (Priority,
  the clients' `sleep`), the attacks cancel the calls they hold open and start no new ones
  until a second after the backoff: the attack costs the server what it costs, without
  changing which updates the cohort gets through.
* Met, even by a short run: the members' first push waits (at most a call's timeout) until
  each burst attack's first burst was answered, so a run cannot end before the attack began.
* No accepted update: except `deadline` (which only delays the cohort's own pushes), none of
  them sends an update the server could apply (byzps.worker.byzantine.forge), so a run under
  attack must end on exactly the parameters of the same run without it. Anything else — or an
  honest worker that cannot finish — is a server bug; tests/test_protocol_attacks.py checks it.

Each class's docstring says what it does, what the server must do to withstand it, and its
parameters. The campaign logs, per attack, how its calls ended (by status), so a run's attack
log shows that the attack did happen.
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from abc import ABC
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

import grpc

from byzps.common.codec import chunk_elements
from byzps.common.config import ConfigError, apply_override
from byzps.common.credentials import TOKEN_METADATA_KEY
from byzps.common.registry import Registry
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.proto.v1 import parameter_server_pb2_grpc as pb_grpc
from byzps.worker.byzantine import forge, h2
from byzps.worker.client import PUSH_PATH, ParameterServerClient, wire_push
from byzps.worker.shard_client import ShardedClient

if TYPE_CHECKING:
    from byzps.worker.byzantine.daemon import ByzantineDaemon

log = logging.getLogger(__name__)

PROTOCOL_ATTACKS: Registry[ProtocolAttack] = Registry("protocol attack")

#: Every attack channel gets its own TCP connection: without a local subchannel pool, gRPC
#: shares one connection among channels with equal arguments, and the members' own calls would
#: queue behind the attack's streams on it.
_OWN_CONNECTION = ("grpc.use_local_subchannel_pool", 1)
#: Seconds a thread waits after an unexpected failure before it tries again.
_BACKOFF = 0.5


# ----------------------------------------------------------------------------------------------
# What an attack works with
# ----------------------------------------------------------------------------------------------


class Tally:
    """Thread-safe counts of how an attack's calls ended ("DUPLICATE", "INVALID_ARGUMENT", …)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counts: Counter[str] = Counter()

    def add(self, outcome: str, count: int = 1) -> None:
        with self._lock:
            self._counts[outcome] += count

    def error(self, exc: grpc.RpcError) -> None:
        self.add(exc.code().name)  # type: ignore[attr-defined]

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def summary(self) -> str:
        counts = self.counts()
        if not counts:
            return "nothing sent"
        parts = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        return f"{sum(counts.values())} calls: {parts}"


class Priority:
    """Makes room for the cohort's own calls (see the module doc).

    `backoff(delay)` is the members' clients' `sleep` between retries: it pauses the attacks
    until GRACE seconds after the backoff and cancels every call they registered with `held`
    (long-polls and stalled streams occupy the member's in-flight slots).
    """

    GRACE = 1.0

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._until = 0.0
        self._held: set[grpc.Call] = set()

    def backoff(self, delay: float) -> None:
        with self._lock:
            self._until = max(self._until, self._clock() + delay + self.GRACE)
            held = list(self._held)
        for call in held:
            call.cancel()
        time.sleep(delay)

    def wait_turn(self, stop: threading.Event) -> None:
        """Return once no member is backing off (at once, usually) or the campaign stopped."""
        while not stop.is_set():
            with self._lock:
                remaining = self._until - self._clock()
            if remaining <= 0:
                return
            stop.wait(remaining)

    @contextmanager
    def held(self, call: grpc.Call) -> Iterator[grpc.Call]:
        """Register a call an attack holds open, so a member's backoff can cancel it."""
        with self._lock:
            self._held.add(call)
        try:
            yield call
        finally:
            with self._lock:
                self._held.discard(call)


@dataclass
class ProtocolContext:
    """The members, what the server told them, and the stop switch, shared by every attack.

    `last_seq(i)`: member i's last acknowledged seq as the cohort knows it (never ahead of the
    server's, which only grows). `credentials` and `tls_server_name`: the security of the
    members' own channels, reused for every channel an attack opens. Every attack loop calls
    `wait_turn()` before it starts a call or a burst, and holds long calls in `held(call)`.
    """

    address: str
    members: Sequence[ParameterServerClient]
    registration: pb.RegisterReply
    rounds: int
    last_seq: Callable[[int], int]
    stop: threading.Event = field(default_factory=threading.Event)
    credentials: grpc.ChannelCredentials | None = None
    tls_server_name: str | None = None
    priority: Priority = field(default_factory=Priority)
    _opened: list[Any] = field(default_factory=list, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False)

    def worker_id(self, i: int) -> str:
        return self.members[i].worker_id

    def wait_turn(self) -> None:
        self.priority.wait_turn(self.stop)

    def held(self, call: grpc.Call) -> AbstractContextManager[grpc.Call]:
        return self.priority.held(call)

    def metadata(self, i: int) -> tuple[tuple[str, str], ...]:
        """Member i's call metadata — its own token, exactly as its client sends it."""
        return tuple(self.members[i].metadata)

    def token(self, i: int) -> str | None:
        return dict(self.metadata(i)).get(TOKEN_METADATA_KEY)

    def channel(self, options: Iterable[tuple[str, Any]] = ()) -> grpc.Channel:
        """A new channel (own connection) with the members' security; closed at stop."""
        opts = [_OWN_CONNECTION, *options]
        if self.credentials is None:
            channel = grpc.insecure_channel(self.address, options=opts)
        else:
            if self.tls_server_name:
                opts.append(("grpc.ssl_target_name_override", self.tls_server_name))
            channel = grpc.secure_channel(self.address, self.credentials, options=opts)
        return self._track(channel)

    def connect(self, timeout: float = 5.0) -> socket.socket:
        """A raw TCP connection to the server (plaintext); closed at stop."""
        host, _, port = self.address.rpartition(":")
        sock = socket.create_connection((host.strip("[]"), int(port)), timeout=timeout)
        return self._track(sock)

    def _track(self, resource: Any) -> Any:
        with self._lock:
            if self.stop.is_set():
                resource.close()
                raise _Stopped
            self._opened.append(resource)
        return resource

    def release(self, resource: Any) -> None:
        """Close a tracked channel or socket early (an attack cycling its connections)."""
        with self._lock:
            if resource in self._opened:
                self._opened.remove(resource)
        _close(resource)

    def close_all(self) -> None:
        """Close every channel and socket: cancels the calls in flight, unblocks the threads."""
        with self._lock:
            opened, self._opened = self._opened, []
        for resource in opened:
            _close(resource)


def _close(resource: Any) -> None:
    try:
        if isinstance(resource, socket.socket):
            resource.shutdown(socket.SHUT_RDWR)
        resource.close()
    except OSError:
        pass


class _Stopped(Exception):
    """The campaign stopped while a thread was opening something (internal)."""


class _FirstBursts:
    """The burst loops of one attack whose first burst is not answered yet.

    The members' first push waits for none to be left (`hold_push`), at most `within` seconds:
    a short run on a loaded machine could otherwise end before the attack made a single call,
    and the run would test nothing. Nothing the server sees changes but the timing."""

    def __init__(self) -> None:
        self._left = 0
        self._within = 0.0
        self._changed = threading.Condition()

    def expect(self, loops: int, within: float) -> None:
        with self._changed:
            self._left, self._within = loops, within

    def answered(self) -> None:
        with self._changed:
            self._left = max(0, self._left - 1)
            self._changed.notify_all()

    def wait(self, stop: threading.Event) -> None:
        deadline = time.monotonic() + self._within
        with self._changed:
            while self._left and not stop.is_set():
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    self._left = 0  # give up once: later pushes are not held
                    return
                self._changed.wait(min(remaining, 0.1))


class ProtocolAttack(ABC):
    """One protocol attack: background `bodies` (each runs in its own thread until the stop
    event) and/or a `hold_push` on the cohort's own pushes. Counts outcomes in `tally`."""

    name: ClassVar[str]

    def __init__(self) -> None:
        self.tally = Tally()
        self.first_bursts = _FirstBursts()

    def bodies(self, ctx: ProtocolContext) -> list[Callable[[], None]]:
        """The loops to run in background threads (none by default)."""
        del ctx
        return []

    def hold_push(self, ctx: ProtocolContext, round: int, arrived: float) -> None:
        """Called before the members push for `round`, whose model arrived at monotonic time
        `arrived`; may block (bounded by the stop event). By default it waits, once, for the
        first burst of each `_burst_loop` to be answered (_FirstBursts)."""
        del round, arrived
        self.first_bursts.wait(ctx.stop)

    def _burst_bodies(
        self, ctx: ProtocolContext, timeout: float, loop: Callable[[int], None]
    ) -> list[Callable[[], None]]:
        """One body per member, `loop(member)` (a `_burst_loop`), announced to `first_bursts`:
        the first push waits for as many first answers, at most a call's `timeout` and a
        backoff."""
        self.first_bursts.expect(len(ctx.members), within=timeout + _BACKOFF)
        return _per_member(ctx, 1, lambda i, _: loop(i))

    def _burst_loop(
        self,
        ctx: ProtocolContext,
        fire: Callable[[], list[grpc.Future]],
        pause: float,
        name: Callable[[Any], str] | None = None,
    ) -> None:
        """Until the stop: wait for the cohort's turn, `fire` a burst of calls, count how each
        ended (`_settle`), pause. `bodies` makes these loops with `_burst_bodies`."""
        first = True
        while not ctx.stop.is_set():
            ctx.wait_turn()
            _settle(fire(), self.tally, name)
            if first:
                self.first_bursts.answered()
                first = False
            ctx.stop.wait(pause)

    def expects_accepted(self) -> bool:
        """Whether an ACCEPTED outcome is expected (only for attacks that push real updates)."""
        return False


def _count(attack: str, name: str, value: object, low: int = 1, high: int = 100_000) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{attack} {name} must be an int in [{low}, {high}], got {value!r}")
    return value


def _seconds(attack: str, name: str, value: object, *, positive: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not ok or not (0 < value < 1e7 if positive else 0 <= value < 1e7):  # type: ignore[operator]
        bound = "(0, 1e7)" if positive else "[0, 1e7)"
        raise ValueError(f"{attack} {name} must be seconds in {bound}, got {value!r}")
    return float(value)  # type: ignore[arg-type]


def _per_member(ctx: ProtocolContext, per: int, loop: Callable[[int, int], None]) -> list[Any]:
    """`per` bodies per member: loop(member, slot)."""
    return [(lambda i=i, k=k: loop(i, k)) for i in range(len(ctx.members)) for k in range(per)]


# ----------------------------------------------------------------------------------------------
# The attacks
# ----------------------------------------------------------------------------------------------


@PROTOCOL_ATTACKS.register("longpoll-flood")
class LongPollFlood(ProtocolAttack):
    """Many concurrent model long-polls per member: GetModel and GetModelUpdate (alternately)
    with wait = true for the next round, each with a long client deadline, re-issued as soon as
    one returns (until the final model, which ends that poll loop).

    What the server must do: hold a waiting call without holding a thread for it (or bound the
    waiting calls per worker), so that polls cannot starve the pushes that close the round; and
    answer the polls of one round from one serialized copy of the model.

    Parameters: `polls` — concurrent long-polls per member (32); `deadline` — each poll's client
    deadline in seconds (600).
    """

    def __init__(self, polls: int = 32, deadline: float = 600.0) -> None:
        super().__init__()
        self.polls = _count(self.name, "polls", polls, high=4096)
        self.deadline = _seconds(self.name, "deadline", deadline, positive=True)

    def bodies(self, ctx: ProtocolContext) -> list[Callable[[], None]]:
        channels = [ctx.channel() for _ in ctx.members]
        return _per_member(ctx, self.polls, lambda i, k: self._poll(ctx, channels[i], i, k))

    def _poll(self, ctx: ProtocolContext, channel: grpc.Channel, i: int, slot: int) -> None:
        stub = pb_grpc.ParameterServerStub(channel)
        method = stub.GetModel if slot % 2 == 0 else stub.GetModelUpdate
        wanted = 0
        while not ctx.stop.is_set():
            ctx.wait_turn()
            request = pb.GetModelRequest(worker_id=ctx.worker_id(i), round=wanted, wait=True)
            try:
                stream = method(request, timeout=self.deadline, metadata=ctx.metadata(i))
                with ctx.held(stream):
                    got = max((_round_of(m) for m in stream), default=-1)
            except grpc.RpcError as exc:
                self.tally.error(exc)
                if exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:  # type: ignore[attr-defined]
                    ctx.stop.wait(_BACKOFF)
                continue
            self.tally.add("OK")
            if got >= ctx.rounds:
                return  # the final model: there is no later round to wait for
            wanted = max(wanted, got + 1)


def _round_of(message: pb.ModelChunk | pb.ModelUpdate) -> int:
    if isinstance(message, pb.ModelChunk):
        return int(message.round)
    body = message.WhichOneof("body")
    return int(getattr(message, body).round) if body else -1


class _Storm(ProtocolAttack):
    """An attack that fires bursts of `calls` concurrent calls per member, `pause` seconds apart,
    each with a client deadline of `timeout` seconds (the storms below share these parameters)."""

    def __init__(self, calls: int = 16, pause: float = 0.01, timeout: float = 10.0) -> None:
        super().__init__()
        self.calls = _count(self.name, "calls", calls, high=4096)
        self.pause = _seconds(self.name, "pause", pause)
        self.timeout = _seconds(self.name, "timeout", timeout, positive=True)


@PROTOCOL_ATTACKS.register("push-storm")
class PushStorm(_Storm):
    """Bursts of concurrent PushUpdate calls per member, none of which may be applied: replays
    of the member's last acknowledged seq (→ DUPLICATE), seqs far in the future (→ a gap,
    FAILED_PRECONDITION) and malformed updates (→ INVALID_ARGUMENT; each of
    forge.MALFORMATIONS in turn), all under the member's own id and token.

    What the server must do: judge every push at the door without letting any change the state
    (a replay is acknowledged, not re-applied), cheaply enough that a storm does not delay the
    honest pushes, and bound the calls in flight per worker.

    Parameters: `calls` — concurrent pushes per member and burst (16); `pause` — seconds between
    bursts (0.01); `timeout` — client deadline of each push (10).
    """

    def bodies(self, ctx: ProtocolContext) -> list[Callable[[], None]]:
        plausible = forge.plausible_update(ctx.registration)
        broken = [forge.malformed_update(ctx.registration, k) for k in forge.MALFORMATIONS]
        return self._burst_bodies(
            ctx, self.timeout, lambda i: self._storm(ctx, i, plausible, broken)
        )

    def _requests(
        self, ctx: ProtocolContext, i: int, plausible: pb.SparseUpdate, broken: list[Any]
    ) -> list[pb.PushUpdateRequest]:
        """One burst: replays, gaps and malformed bodies in turn (see the class doc)."""
        last = ctx.last_seq(i)
        requests = []
        for n in range(self.calls):
            if n % 3 == 0:
                seq, update = forge.never_next(last, replay=True), plausible
            elif n % 3 == 1:
                seq, update = forge.never_next(last, replay=False) + n, plausible
            else:
                seq, update = forge.never_next(last, replay=True), broken[n // 3 % len(broken)]
            requests.append(
                pb.PushUpdateRequest(worker_id=ctx.worker_id(i), round=0, seq=seq, update=update)
            )
        return requests

    def _storm(
        self, ctx: ProtocolContext, i: int, plausible: pb.SparseUpdate, broken: list[Any]
    ) -> None:
        stub = pb_grpc.ParameterServerStub(ctx.channel())

        def fire() -> list[grpc.Future]:
            return [
                stub.PushUpdate.future(r, timeout=self.timeout, metadata=ctx.metadata(i))
                for r in self._requests(ctx, i, plausible, broken)
            ]

        self._burst_loop(ctx, fire, self.pause, _ack_status)


def _wait_done(call: grpc.Call, stop: threading.Event, timeout: float) -> None:
    """Block until `call` ends (cancelled, deadline) or `stop` is set, at most `timeout` s."""
    ended = threading.Event()
    if not call.add_callback(ended.set):
        return  # already over
    deadline = time.monotonic() + timeout
    while not (ended.is_set() or stop.is_set()) and time.monotonic() < deadline:
        ended.wait(0.1)


def _ack_status(status: int) -> str:
    """ "DUPLICATE", "ACCEPTED", … (an Ack's status without its enum prefix)."""
    return pb.AckStatus.Name(status).removeprefix("ACK_STATUS_")


def _settle(
    calls: Sequence[grpc.Future], tally: Tally, name: Callable[[Any], str] | None = None
) -> None:
    """Wait for every call of a burst and count how each ended."""
    for call in calls:
        try:
            reply = call.result()
        except grpc.RpcError as exc:
            tally.error(exc)
        except grpc.FutureCancelledError:
            tally.add("CANCELLED")
        else:
            tally.add(name(reply.status) if name is not None else "OK")


@PROTOCOL_ATTACKS.register("slow-reader")
class SlowReader(ProtocolAttack):
    """GetModel streams that read the first chunk of the model and then stop reading, on
    channels whose flow-control windows cannot grow (BDP probing off, a small lookahead), so
    the server's writes of the next chunks stall. Needs a model of more than one chunk
    (d > ~1.05e6 float32 = 4 MiB); with a smaller one it only logs that it cannot stall.

    What the server must do: never let a stalled reader hold a thread or a lock the other
    callers need (asynchronous writes, a per-worker bound on open streams, a write timeout).

    Parameters: `streams` — stalled streams per member (8); `hold` — seconds each stays stalled
    before it is cancelled and re-opened (600); `window` — the lookahead bytes the channel
    announces (65535).
    """

    def __init__(self, streams: int = 8, hold: float = 600.0, window: int = 65535) -> None:
        super().__init__()
        self.streams = _count(self.name, "streams", streams, high=4096)
        self.hold = _seconds(self.name, "hold", hold, positive=True)
        self.window = _count(self.name, "window", window, low=1024, high=2**31 - 1)

    def bodies(self, ctx: ProtocolContext) -> list[Callable[[], None]]:
        dim = int(ctx.registration.model.dim)
        if dim <= chunk_elements():
            log.warning(
                "slow-reader: the model (d = %d) fits one %d-element chunk; there is no later "
                "write to stall, so the streams only hold the server's answer", dim,
                chunk_elements(),
            )  # fmt: skip
        options = [
            ("grpc.http2.bdp_probe", 0),
            ("grpc.http2.lookahead_bytes", self.window),
            ("grpc.max_receive_message_length", -1),
        ]
        channels = [ctx.channel(options) for _ in ctx.members]
        return _per_member(ctx, self.streams, lambda i, k: self._stall(ctx, channels[i], i))

    def _stall(self, ctx: ProtocolContext, channel: grpc.Channel, i: int) -> None:
        stub = pb_grpc.ParameterServerStub(channel)
        request = pb.GetModelRequest(worker_id=ctx.worker_id(i), round=0, wait=False)
        while not ctx.stop.is_set():
            ctx.wait_turn()
            stream = stub.GetModel(request, timeout=self.hold, metadata=ctx.metadata(i))
            try:
                next(stream)  # one chunk, then nothing more
                self.tally.add("STALLED")
                with ctx.held(stream):
                    _wait_done(stream, ctx.stop, self.hold)
            except grpc.RpcError as exc:
                self.tally.error(exc)
                ctx.stop.wait(_BACKOFF)
            except StopIteration:
                self.tally.add("EMPTY")
                ctx.stop.wait(_BACKOFF)
            finally:
                stream.cancel()


@PROTOCOL_ATTACKS.register("slowloris")
class Slowloris(ProtocolAttack):
    """PushUpdate calls whose request never completes: raw TCP connections speaking HTTP/2 by
    hand (byzps.worker.byzantine.h2) open a call with the member's id and token, announce a
    gRPC message of `declared` bytes and then send it `chunk` bytes every `interval` seconds,
    answering SETTINGS and PING like a live peer. A connection the server closes is re-opened.
    Plaintext only: under TLS it logs that it is skipped (grpcio hides the channel's TLS
    credentials, so it cannot speak TLS with the members' trust settings).

    What the server must do: bound what a half-received request may hold (no thread before the
    message is complete, a limit on connections and streams per peer, a request timeout).

    Parameters: `connections` — in all, spread over the members (8); `interval` — seconds between
    trickles (2); `chunk` — bytes per trickle (4); `declared` — the announced message length
    (65536; below the server's message limit, so it is not refused outright).
    """

    def __init__(
        self, connections: int = 8, interval: float = 2.0, chunk: int = 4, declared: int = 65536
    ) -> None:
        super().__init__()
        self.connections = _count(self.name, "connections", connections, high=4096)
        self.interval = _seconds(self.name, "interval", interval, positive=True)
        self.chunk = _count(self.name, "chunk", chunk, high=16384)
        self.declared = _count(self.name, "declared", declared, high=2**31 - 1)

    def bodies(self, ctx: ProtocolContext) -> list[Callable[[], None]]:
        if ctx.credentials is not None:
            log.warning("slowloris: the server uses TLS and this attack speaks plaintext only; "
                        "skipped")  # fmt: skip
            return []
        m = len(ctx.members)
        return [lambda c=c: self._trickle(ctx, c % m) for c in range(self.connections)]

    def _trickle(self, ctx: ProtocolContext, i: int) -> None:
        while not ctx.stop.is_set():
            ctx.wait_turn()
            try:
                sock = ctx.connect()
            except OSError:
                self.tally.add("CONNECT_FAILED")
                ctx.stop.wait(_BACKOFF)
                continue
            try:
                self._one_connection(ctx, sock, i)
            except (OSError, h2.PeerClosed):
                self.tally.add("CLOSED_BY_SERVER")
                ctx.stop.wait(_BACKOFF)
            finally:
                ctx.release(sock)

    def _one_connection(self, ctx: ProtocolContext, sock: socket.socket, i: int) -> None:
        stream = 1
        token = ctx.token(i)
        metadata = [] if token is None else [(TOKEN_METADATA_KEY, token)]
        headers = h2.grpc_headers(ctx.address, PUSH_PATH, metadata)
        sock.sendall(
            h2.PREFACE
            + h2.frame(h2.SETTINGS, 0, 0)
            + h2.frame(h2.HEADERS, h2.END_HEADERS, stream, h2.hpack_literal(headers))
            + h2.frame(h2.DATA, 0, stream, h2.grpc_message_prefix(self.declared))
        )
        self.tally.add("OPENED")
        reader = h2.FrameReader()
        sent = 0
        next_send = time.monotonic() + self.interval
        while not ctx.stop.is_set():
            sock.settimeout(max(0.01, next_send - time.monotonic()))
            try:
                data = sock.recv(65536)
            except TimeoutError:
                data = None
            if data == b"":
                raise h2.PeerClosed("EOF")
            if data:
                h2.answer(sock, reader.feed(data), stream)
            if time.monotonic() >= next_send and sent + self.chunk < self.declared:
                sock.sendall(h2.frame(h2.DATA, 0, stream, bytes(self.chunk)))
                sent += self.chunk
                self.tally.add("TRICKLED")
                next_send = time.monotonic() + self.interval


@PROTOCOL_ATTACKS.register("padded")
class Padded(ProtocolAttack):
    """Oversized PushUpdate requests: a plausible update (replayed seq, so never applied) followed
    by `pad_bytes` of unknown protobuf fields outside `update`, sent as raw bytes; and, when
    `oversize_bytes` > 0, alternately an update carrying that many unknown bytes inside it and a
    request padded beyond the transport's message limit.

    What the server must do: bound the whole request, not just the update — refuse padding it
    does not need (or cap the message size at the transport to what an update needs) before
    parsing copies megabytes, and refuse an update over max_update_bytes, unknown fields
    included (RESOURCE_EXHAUSTED).

    Parameters: `calls` — concurrent calls per member and burst (2); `pad_bytes` — unknown bytes
    after the request's fields (3 MiB: under the default 4 MiB limit, so it reaches the
    handler); `oversize_bytes` — see above (16 MiB; 0: off); `pause` — seconds between bursts
    (0.2); `timeout` — client deadline of each call (30).
    """

    def __init__(
        self,
        calls: int = 2,
        pad_bytes: int = 3 * 2**20,
        oversize_bytes: int = 16 * 2**20,
        pause: float = 0.2,
        timeout: float = 30.0,
    ) -> None:
        super().__init__()
        self.calls = _count(self.name, "calls", calls, high=1024)
        self.pad_bytes = _count(self.name, "pad_bytes", pad_bytes, low=0, high=2**30)
        self.oversize_bytes = _count(self.name, "oversize_bytes", oversize_bytes, low=0, high=2**30)
        self.pause = _seconds(self.name, "pause", pause)
        self.timeout = _seconds(self.name, "timeout", timeout, positive=True)

    def bodies(self, ctx: ProtocolContext) -> list[Callable[[], None]]:
        # (update, bytes appended after the request's fields), cycled; built once.
        kinds = [(forge.plausible_update(ctx.registration), forge.unknown_field(self.pad_bytes))]
        if self.oversize_bytes:
            kinds.append((forge.oversized_update(ctx.registration, self.oversize_bytes), b""))
            kinds.append((kinds[0][0], forge.unknown_field(self.oversize_bytes)))
        return self._burst_bodies(ctx, self.timeout, lambda i: self._send(ctx, i, kinds))

    def _send(
        self, ctx: ProtocolContext, i: int, kinds: list[tuple[pb.SparseUpdate, bytes]]
    ) -> None:
        channel = ctx.channel([("grpc.max_send_message_length", -1)])
        push = wire_push(channel)
        sent = 0

        def fire() -> list[grpc.Future]:
            nonlocal sent
            calls = []
            for _ in range(self.calls):
                update, padding = kinds[sent % len(kinds)]
                seq = forge.never_next(ctx.last_seq(i), replay=True)
                request = pb.PushUpdateRequest(
                    worker_id=ctx.worker_id(i), round=0, seq=seq, update=update
                )
                body = request.SerializeToString() + padding
                calls.append(push.future(body, timeout=self.timeout, metadata=ctx.metadata(i)))
                sent += 1
            return calls

        self._burst_loop(ctx, fire, self.pause, _ack_status)


@PROTOCOL_ATTACKS.register("register-storm")
class RegisterStorm(_Storm):
    """Bursts of concurrent Register calls per member (idempotent for a registered id, so they
    change nothing but each takes the server's attention, its lock included).

    What the server must do: answer a re-registration cheaply (no state change, no re-sending
    of anything large beyond the reply) and bound the calls in flight per worker.

    Parameters: `calls` — concurrent registrations per member and burst (16); `pause` — seconds
    between bursts (0.01); `timeout` — client deadline of each call (10).
    """

    def bodies(self, ctx: ProtocolContext) -> list[Callable[[], None]]:
        return self._burst_bodies(ctx, self.timeout, lambda i: self._storm(ctx, i))

    def _storm(self, ctx: ProtocolContext, i: int) -> None:
        stub = pb_grpc.ParameterServerStub(ctx.channel())
        request = pb.RegisterRequest(
            worker_id=ctx.worker_id(i), config_digest=ctx.registration.config_digest
        )

        def fire() -> list[grpc.Future]:
            return [
                stub.Register.future(request, timeout=self.timeout, metadata=ctx.metadata(i))
                for _ in range(self.calls)
            ]

        self._burst_loop(ctx, fire, self.pause)


@PROTOCOL_ATTACKS.register("deadline")
class Deadline(ProtocolAttack):
    """The members' pushes are held back until `margin` seconds before the server's round
    deadline: the cohort learns that a round opened from its model (GetModel returns when it
    does) and waits `deadline` − `margin` seconds from then before pushing. The server cannot
    close a round early while a registered worker has not pushed, so every round lasts about
    `deadline`; the updates still count, so the run's result is unchanged unless a push misses
    the deadline.

    What the server must do: nothing beyond its round deadline — the slowdown this causes is
    bounded by `--round-deadline` by design (after it, a round closes on the quorum of n − f
    pushes without the stragglers). `deadline` should be the server's --round-deadline.

    Parameters: `deadline` — the server's round deadline in seconds (10); `margin` — seconds
    before it to push (0.5).
    """

    def __init__(self, deadline: float = 10.0, margin: float = 0.5) -> None:
        super().__init__()
        self.deadline = _seconds(self.name, "deadline", deadline, positive=True)
        self.margin = _seconds(self.name, "margin", margin)
        if self.margin >= self.deadline:
            raise ValueError(f"deadline margin {margin} must be below the deadline {deadline}")

    def hold_push(self, ctx: ProtocolContext, round: int, arrived: float) -> None:
        wait = arrived + self.deadline - self.margin - time.monotonic()
        if wait > 0:
            ctx.stop.wait(wait)
        self.tally.add("HELD")

    def expects_accepted(self) -> bool:
        return True


# ----------------------------------------------------------------------------------------------
# Selecting and running them
# ----------------------------------------------------------------------------------------------


def build_protocol_attacks(names: Sequence[str], params: Sequence[str]) -> list[ProtocolAttack]:
    """The attacks `--protocol NAME` (repeatable) and `--protocol-param [NAME.]KEY=VALUE`
    select. A parameter without NAME goes to the only selected attack (an error when several
    are selected); VALUE is read like a config override (a TOML value, else a string).
    ValueError names what is wrong."""
    if len(set(names)) != len(names):
        raise ValueError(f"--protocol: an attack is named twice in {list(names)}")
    chosen: dict[str, dict[str, Any]] = {}
    for name in names:
        PROTOCOL_ATTACKS.get(name)  # unknown names fail here, listing the known ones
        chosen[name] = {}
    for raw in params:
        key, sep, value = raw.partition("=")
        target, dot, key = key.strip().rpartition(".")
        if not sep or not key:
            raise ValueError(f"--protocol-param {raw!r}: expected [NAME.]KEY=VALUE")
        if not dot:
            if len(chosen) != 1:
                raise ValueError(
                    f"--protocol-param {raw!r}: name the attack (NAME.{key}=…) when "
                    f"{len(chosen)} protocol attacks are selected"
                )
            target = next(iter(chosen))
        if target not in chosen:
            raise ValueError(f"--protocol-param {raw!r}: {target!r} is not a selected --protocol")
        try:
            holder: dict[str, Any] = {}
            apply_override(holder, f"p.{key}={value}")
        except ConfigError as exc:
            raise ValueError(f"--protocol-param {raw!r}: {exc}") from None
        chosen[target][key] = holder["p"][key]
    return [PROTOCOL_ATTACKS.build(name, **kwargs) for name, kwargs in chosen.items()]


@dataclass
class Front:
    """One server a campaign attacks: its context (address, registration, the members' clients
    to it) and attack instances of its own, so each server's tallies are its own."""

    ctx: ProtocolContext
    attacks: list[ProtocolAttack]
    #: How the logs name this server: "" for a lone server, " on shard K" for shard K.
    label: str = ""


class ProtocolCampaign:
    """Runs protocol attacks beside the cohort: starts their threads, holds the cohort's pushes
    for them, and stops everything (stop events, then every channel and socket closed) at the
    end of the run. On a sharded server every shard is a front of its own: each shard has its
    own door and fair shares, and an attacker is free to turn on all of them at once. An attack
    thread that fails is logged and ends; it never ends the daemon."""

    def __init__(self, fronts: Sequence[Front]) -> None:
        self.fronts = list(fronts)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for front in self.fronts:
            for attack in front.attacks:
                bodies = attack.bodies(front.ctx)
                for k, body in enumerate(bodies):
                    thread = threading.Thread(
                        target=self._guarded, args=(front, attack, body),
                        name=f"{attack.name}-{k}", daemon=True,
                    )  # fmt: skip
                    thread.start()
                    self._threads.append(thread)
                log.info(
                    "protocol attack %s%s: started (%d threads)", attack.name, front.label,
                    len(bodies),
                )  # fmt: skip

    def hold_push(self, round: int, arrived: float) -> None:
        for front in self.fronts:
            for attack in front.attacks:
                attack.hold_push(front.ctx, round, arrived)

    def stop(self, grace: float = 5.0) -> None:
        for front in self.fronts:
            front.ctx.stop.set()
            front.ctx.close_all()
        deadline = time.monotonic() + grace
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        stuck = sum(t.is_alive() for t in self._threads)
        if stuck:
            log.warning("protocol attacks: %d threads still running at exit (daemon)", stuck)
        for front in self.fronts:
            for attack in front.attacks:
                log.info(
                    "protocol attack %s%s: %s", attack.name, front.label, attack.tally.summary()
                )
                accepted = attack.tally.counts().get("ACCEPTED", 0)
                if accepted and not attack.expects_accepted():
                    log.error(
                        "protocol attack %s%s: the server ACCEPTED %d updates it must not apply",
                        attack.name, front.label, accepted,
                    )  # fmt: skip

    def _guarded(self, front: Front, attack: ProtocolAttack, body: Callable[[], None]) -> None:
        while not front.ctx.stop.is_set():
            try:
                body()
                return
            except _Stopped:
                return
            except Exception:
                if front.ctx.stop.is_set():
                    return  # a call cut short by the campaign's own close
                log.exception(
                    "protocol attack %s%s: a thread failed; restarting it", attack.name, front.label
                )
                attack.tally.add("THREAD_FAILED")
                front.ctx.stop.wait(_BACKOFF)


def campaign_for(
    daemon: ByzantineDaemon,
    make_attacks: Callable[[], list[ProtocolAttack]],
    client_options: dict[str, Any] | None = None,
    priority: Priority | None = None,
) -> ProtocolCampaign:
    """A campaign over the daemon's members (their clients, tokens, registrations and
    acknowledged seqs), holding the daemon's pushes for it; not yet started. `make_attacks`
    builds one fresh set of attacks per server attacked: the one server, or every shard of a
    sharded one, each with its members' clients to that shard and that shard's own
    registration (so a forged update is built on its slice, and refused for what it means to
    test, not for its width). `priority`: the one whose `backoff` the members' clients sleep
    with, shared by every front."""
    options = client_options or {}
    priority = priority or Priority()
    fronts = []
    for label, members in _servers(daemon.clients):
        registration = members[0].registration
        assert registration is not None, "the members register before the campaign starts"
        ctx = ProtocolContext(
            members[0].address,
            members,
            registration,
            daemon.run_info.rounds,
            last_seq=lambda i: daemon.last_seq[i],
            credentials=options.get("credentials"),
            tls_server_name=options.get("tls_server_name"),
            priority=priority,
        )
        fronts.append(Front(ctx, make_attacks(), label))
    campaign = ProtocolCampaign(fronts)
    daemon.before_push = campaign.hold_push
    return campaign


def _servers(
    clients: Sequence[ParameterServerClient | ShardedClient],
) -> list[tuple[str, list[ParameterServerClient]]]:
    """(label, the members' clients to it) for each server the members talk to: the one server,
    or each shard in rank order."""
    first = clients[0]
    if not isinstance(first, ShardedClient):
        return [("", [c for c in clients if isinstance(c, ParameterServerClient)])]
    sharded = [c for c in clients if isinstance(c, ShardedClient)]
    return [
        (f" on shard {rank}", [c.shards[rank] for c in sharded])
        for rank in range(len(first.shards))
    ]
