"""The shards of one sharded server, talking to each other: the wire form of `Collective`.

A round's close is one SPMD program on every shard (byzps.common.aggregators.collective): each
all-sum publishes this shard's part in its `Outbox` under (round, step) and fetches every peer's
part for the same key with the ShardPeer service's FetchPart, then adds the S parts in rank order
— the same bits on every shard, and the same bits as `ThreadCollective` gives in one process.

Why pull, not push: a shard only ever serves what it computed itself, so nothing another process
sends can change its state (a caller can read a part, never write one), and a shard that crashes
and re-closes a round fetches the peers' parts of that round again from their outboxes, which
keep the last two rounds. The parts a shard publishes come from durable state only (the
coordinator waits for its log before a close), so a re-close publishes the same parts as the
first attempt did, and the peers that already used them stay consistent with it.

Replaying the write-ahead log needs no peers: each close record keeps the sums the close
received (`pack_arrays`), and `ReplayCollective` hands them back in order.

Model slices: after each round that is due an evaluation every shard publishes its slice of x
(PART_KIND_MODEL); rank 0 fetches them beside the rounds to evaluate the whole model.

Who may fetch: callers presenting the peer token (`peer_token`, derived from the master secret,
which workers never hold), or anyone when the server runs with --no-auth.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import struct
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from byzps.common.aggregators.collective import Collective
from byzps.common.credentials import TOKEN_METADATA_KEY, token_for
from byzps.common.shards import ShardRange
from byzps.proto.v1 import shard_peer_pb2 as pb
from byzps.proto.v1 import shard_peer_pb2_grpc as pb_grpc

log = logging.getLogger("byzps.server")

#: The identity peer tokens are derived for: no worker id (a decimal) or operator looks like it.
PEER_ID = "shard-peer"
#: The longest a FetchPart may park waiting for a part, whatever it asks.
MAX_WAIT_MS = 5000
#: Parked FetchParts at once; more are refused (RESOURCE_EXHAUSTED) — peers need S − 1.
MAX_WAITERS = 64
#: Rounds of collective parts an outbox keeps (the current one and the one before).
KEEP_ROUNDS = 2
#: Model slices an outbox keeps (the newest evaluated rounds).
KEEP_MODELS = 4
#: Largest part a peer reply may carry: an n × n Gram at n = 10,000 or a slice of 1.5e8 floats.
MAX_PART_BYTES = 1 << 30

COLLECTIVE = pb.PART_KIND_COLLECTIVE
MODEL = pb.PART_KIND_MODEL


def peer_token(secret: bytes | None) -> str | None:
    """The token shards present to each other (None: --no-auth)."""
    return None if secret is None else token_for(secret, PEER_ID)


class PeerError(RuntimeError):
    """A peer shard did not provide its part in time, or provided one that does not fit."""


# --- what a shard publishes --------------------------------------------------------------------


class Outbox:
    """This shard's published parts, keyed (kind, round, step); bounded by round, thread-safe.

    Readers on the serving event loop wait with `wait_event` (no thread per waiter)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._parts: dict[tuple[int, int, int], np.ndarray] = {}
        self._events: set[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = set()
        #: The newest round this shard published a collective part of.
        self.round = 0

    def put(self, kind: int, round: int, step: int, part: np.ndarray) -> None:
        with self._lock:
            self._parts[(kind, round, step)] = part
            if kind == COLLECTIVE:
                self.round = max(self.round, round)
            self._forget()
            events = list(self._events)
        for loop, event in events:
            if not loop.is_closed():
                loop.call_soon_threadsafe(event.set)

    def get(self, kind: int, round: int, step: int) -> np.ndarray | None:
        with self._lock:
            return self._parts.get((kind, round, step))

    def _forget(self) -> None:
        """Drop collective parts older than KEEP_ROUNDS rounds and all but KEEP_MODELS slices."""
        models = sorted(r for k, r, _ in self._parts if k == MODEL)
        stale_models = set(models[:-KEEP_MODELS])
        oldest = self.round - KEEP_ROUNDS + 1
        for key in list(self._parts):
            kind, round, _ = key
            if (kind == COLLECTIVE and round < oldest) or (kind == MODEL and round in stale_models):
                del self._parts[key]

    def event(self) -> asyncio.Event:
        """An event set at the next `put` (call `release` when done with it), on this loop."""
        event = asyncio.Event()
        with self._lock:
            self._events.add((asyncio.get_running_loop(), event))
        return event

    def release(self, event: asyncio.Event) -> None:
        with self._lock:
            self._events = {(loop, e) for loop, e in self._events if e is not event}


# --- serving it ----------------------------------------------------------------------------------


class ShardPeerServicer(pb_grpc.ShardPeerServicer):
    """FetchPart over one Outbox: authenticated, long-polled on the event loop, bounded."""

    def __init__(self, outbox: Outbox, secret: bytes | None) -> None:
        self.outbox = outbox
        token = peer_token(secret)
        self._token = None if token is None else token.encode()
        self._waiters = 0

    async def FetchPart(self, request: Any, context: grpc.aio.ServicerContext) -> pb.PartReply:
        if self._token is not None:
            presented = b""
            for key, value in context.invocation_metadata() or ():
                if key == TOKEN_METADATA_KEY:
                    presented = value.encode() if isinstance(value, str) else value
            if not hmac.compare_digest(presented, self._token):
                await context.abort(grpc.StatusCode.UNAUTHENTICATED, "not a peer shard's token")
        if request.kind not in (COLLECTIVE, MODEL):
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, f"kind {request.kind}")
        key = (request.kind, request.round, request.step)
        part = self.outbox.get(*key)
        if part is None and request.wait_ms:
            if self._waiters >= MAX_WAITERS:
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, "too many parked fetches")
            self._waiters += 1
            try:
                part = await self._wait(key, min(request.wait_ms, MAX_WAIT_MS) / 1000)
            finally:
                self._waiters -= 1
        if part is None:
            return pb.PartReply(ready=False, round=self.outbox.round)
        return pb.PartReply(
            ready=True,
            shape=list(part.shape),
            dtype=part.dtype.str,
            data=part.tobytes(),
            round=self.outbox.round,
        )

    async def _wait(self, key: tuple[int, int, int], seconds: float) -> np.ndarray | None:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds
        while True:
            event = self.outbox.event()
            try:
                part = self.outbox.get(*key)  # after registering: a put in between is seen
                left = end - loop.time()
                if part is not None or left <= 0:
                    return part
                try:
                    await asyncio.wait_for(event.wait(), left)
                except TimeoutError:
                    return self.outbox.get(*key)
            finally:
                self.outbox.release(event)


def add_peer_service(server: grpc.aio.Server, servicer: ShardPeerServicer) -> None:
    pb_grpc.add_ShardPeerServicer_to_server(servicer, server)


# --- fetching from the peers ---------------------------------------------------------------------


def read_addresses(source: Sequence[str] | Path, count: int, timeout: float) -> list[str]:
    """The S shard addresses in rank order: given, or read from a file of one per line, which
    the launcher writes once every shard listens (waited for up to `timeout` seconds)."""
    if not isinstance(source, Path):
        addresses = list(source)
    else:
        end = time.monotonic() + timeout
        while not source.exists() and time.monotonic() < end:
            time.sleep(0.05)
        try:
            addresses = source.read_text().split()
        except OSError as exc:
            raise PeerError(f"shard addresses: cannot read {source} ({exc})") from None
    if len(addresses) != count:
        raise PeerError(f"{len(addresses)} shard addresses for {count} shards")
    return addresses


class Peers:
    """Channels to the other shards and FetchPart with retries, bounded by `timeout` seconds.
    The addresses are resolved at the first call (`read_addresses`), not before: a shard must
    listen before the launcher can tell the others where it is."""

    def __init__(
        self,
        shard: ShardRange,
        addresses: Sequence[str] | Path,
        secret: bytes | None,
        timeout: float,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.shard = shard
        self.timeout = timeout
        self._source = addresses
        self._credentials = credentials
        token = peer_token(secret)
        self._metadata = () if token is None else ((TOKEN_METADATA_KEY, token),)
        self._lock = threading.Lock()
        self.addresses: list[str] = []
        self._stubs: dict[int, pb_grpc.ShardPeerStub] = {}
        self._channels: list[grpc.Channel] = []

    def _stub(self, rank: int) -> pb_grpc.ShardPeerStub:
        with self._lock:
            if not self.addresses:
                self.addresses = read_addresses(self._source, self.shard.count, self.timeout)
                options = [
                    ("grpc.max_receive_message_length", MAX_PART_BYTES),
                    # A restarted peer on the same address is found within about a second
                    # (gRPC's own reconnect backoff reaches minutes).
                    ("grpc.initial_reconnect_backoff_ms", 100),
                    ("grpc.min_reconnect_backoff_ms", 100),
                    ("grpc.max_reconnect_backoff_ms", 1000),
                ]
                for other, address in enumerate(self.addresses):
                    if other == self.shard.rank:
                        continue
                    channel = (
                        grpc.insecure_channel(address, options=options)
                        if self._credentials is None
                        else grpc.secure_channel(address, self._credentials, options=options)
                    )
                    self._channels.append(channel)
                    self._stubs[other] = pb_grpc.ShardPeerStub(channel)
            return self._stubs[rank]

    def close(self) -> None:
        for channel in self._channels:
            channel.close()

    def fetch(self, rank: int, kind: int, round: int, step: int) -> np.ndarray:
        """Peer `rank`'s part, waiting for it; PeerError after `timeout` seconds without it."""
        stub = self._stub(rank)
        request = pb.FetchPartRequest(
            kind=kind, round=round, step=step, rank=self.shard.rank, wait_ms=1000
        )
        started = time.monotonic()
        last_error = "not published yet"
        while time.monotonic() - started < self.timeout:
            try:
                reply = stub.FetchPart(request, timeout=10.0, metadata=self._metadata)
            except grpc.RpcError as exc:
                if exc.code() not in (
                    grpc.StatusCode.UNAVAILABLE,
                    grpc.StatusCode.DEADLINE_EXCEEDED,
                ):
                    raise PeerError(f"shard {rank}: {exc.code().name}: {exc.details()}") from None
                last_error = f"{exc.code().name}: {exc.details()}"
                time.sleep(0.1)
                continue
            if reply.ready:
                return _array(reply)
            if kind == MODEL and reply.round > round:
                # Slice r is published as round r opens, before round r's close begins: a peer
                # already closing a later round no longer keeps it (KEEP_MODELS).
                raise PeerError(f"shard {rank} no longer keeps its slice of round {round}")
        raise PeerError(
            f"shard {rank} ({self.addresses[rank]}) gave no part for round {round} step {step} "
            f"within {self.timeout:.0f} s ({last_error})"
        )

    def _known(self) -> bool:
        """Whether the peers' addresses are known or can be read at once: given, or in a file
        that exists (else the first call would wait up to `timeout` for the launcher's file).
        Without the lock: a call that holds it may be waiting for that very file."""
        source = self._source
        return bool(self.addresses) or not isinstance(source, Path) or source.exists()

    def published(self, kind: int, round: int, step: int) -> bool:
        """Whether any peer has published (kind, round, step) now. No waiting: not while the
        peers' addresses cannot be read yet (a shard still starting asks before the launcher
        has written them), and a peer that does not answer counts as not."""
        if not self._known():
            return False
        request = pb.FetchPartRequest(kind=kind, round=round, step=step, rank=self.shard.rank)
        ranks = [r for r in range(self.shard.count) if r != self.shard.rank]
        try:
            stubs = [self._stub(r) for r in ranks]
        except PeerError:  # the launcher's file, not written in full yet
            return False
        for stub in stubs:
            try:
                if stub.FetchPart(request, timeout=2.0, metadata=self._metadata).ready:
                    return True
            except grpc.RpcError:
                continue
        return False


def _array(reply: pb.PartReply) -> np.ndarray:
    dtype = np.dtype(reply.dtype)
    if dtype.kind != "f":
        raise PeerError(f"a part of dtype {reply.dtype}")
    shape = tuple(int(s) for s in reply.shape)
    if int(np.prod(shape)) * dtype.itemsize != len(reply.data):
        raise PeerError(f"a part of shape {shape} with {len(reply.data)} bytes")
    return np.frombuffer(reply.data, dtype=dtype).reshape(shape)


# --- the collectives ---------------------------------------------------------------------------


class WireCollective(Collective):
    """One shard's all-sum over the network: publish, fetch every peer's part, add in rank
    order. `begin(round)` starts a round's close; `sums` are what it received, for the log."""

    def __init__(self, shard: ShardRange, widths: Sequence[int], outbox: Outbox, peers: Peers):
        super().__init__(shard.rank, widths)
        self.outbox = outbox
        self.peers = peers
        self._round = 0
        self._step = 0
        self.sums: list[np.ndarray] = []

    def begin(self, round: int) -> None:
        self._round, self._step, self.sums = round, 0, []

    def all_sum(self, part: np.ndarray) -> np.ndarray:
        step = self._step
        self._step += 1
        mine = np.ascontiguousarray(part)
        self.outbox.put(COLLECTIVE, self._round, step, mine)
        parts = [
            mine if rank == self.rank else self.peers.fetch(rank, COLLECTIVE, self._round, step)
            for rank in range(self.size)
        ]
        for rank, other in enumerate(parts):
            if other.shape != mine.shape:
                raise PeerError(
                    f"shard {rank}'s part of round {self._round} step {step} has shape "
                    f"{other.shape}, this shard's {mine.shape}: the shards run different rules"
                )
        total = parts[0].astype(mine.dtype, copy=True)
        for other in parts[1:]:
            total += other
        self.sums.append(total)
        return total


class ReplayCollective(Collective):
    """The sums round `round`'s logged close received, handed back in order (replay needs no
    peers), and each part published again in `outbox` under (round, step), as the live close
    published it: the peers need not have fetched this shard's last part of that close before
    it was killed (it logs the close once it has theirs), and without it on the resumed shard
    they would wait at the barrier until their peer timeout and stop."""

    def __init__(
        self,
        shard: ShardRange,
        widths: Sequence[int],
        sums: Sequence[np.ndarray],
        outbox: Outbox,
        round: int,
    ):
        super().__init__(shard.rank, widths)
        self._sums = list(sums)
        self._next = 0
        self._outbox = outbox
        self._round = round

    def all_sum(self, part: np.ndarray) -> np.ndarray:
        if self._next >= len(self._sums):
            raise ValueError("the logged close received fewer sums than its replay asks for")
        total = self._sums[self._next]
        if total.shape != np.shape(part):
            raise ValueError(f"a logged sum of shape {total.shape} for a part of {np.shape(part)}")
        self._outbox.put(COLLECTIVE, self._round, self._next, np.ascontiguousarray(part))
        self._next += 1
        return total.astype(np.asarray(part).dtype, copy=True)

    @property
    def exhausted(self) -> bool:
        return self._next == len(self._sums)


# --- the sums in a close record ------------------------------------------------------------------

_COUNT = struct.Struct("<I")
_ARRAY = struct.Struct("<BI")  # dtype code (4: float32, 8: float64), ndim


def pack_arrays(arrays: Sequence[np.ndarray]) -> bytes:
    """float32/float64 arrays as bytes: count, then per array dtype, shape and data (LE)."""
    out = [_COUNT.pack(len(arrays))]
    for a in arrays:
        a = np.ascontiguousarray(a)
        if a.dtype not in (np.float32, np.float64):
            raise ValueError(f"cannot pack a {a.dtype} array")
        out.append(_ARRAY.pack(a.dtype.itemsize, a.ndim))
        out.append(struct.pack(f"<{a.ndim}Q", *a.shape))
        out.append(a.astype(a.dtype.newbyteorder("<"), copy=False).tobytes())
    return b"".join(out)


def unpack_arrays(data: bytes) -> list[np.ndarray]:
    """pack_arrays, reversed; ValueError for bytes it did not write."""
    try:
        return _unpack_arrays(data)
    except struct.error as exc:
        raise ValueError(f"packed arrays: {exc}") from None


def _unpack_arrays(data: bytes) -> list[np.ndarray]:
    (count,) = _COUNT.unpack_from(data)
    at, arrays = _COUNT.size, []
    for _ in range(count):
        itemsize, ndim = _ARRAY.unpack_from(data, at)
        at += _ARRAY.size
        shape = struct.unpack_from(f"<{ndim}Q", data, at)
        at += 8 * ndim
        if itemsize not in (4, 8):
            raise ValueError(f"packed arrays: item size {itemsize}")
        dtype = np.dtype("<f4" if itemsize == 4 else "<f8")
        size = int(np.prod(shape)) * itemsize
        if at + size > len(data):
            raise ValueError("packed arrays: truncated")
        arrays.append(np.frombuffer(data, dtype, int(np.prod(shape)), at).reshape(shape).copy())
        at += size
    if at != len(data):
        raise ValueError("packed arrays: trailing bytes")
    return arrays


# --- one shard's view of the group ---------------------------------------------------------------


@dataclass
class ShardContext:
    """What a coordinator needs to be one shard: its range, the layout's widths, its outbox,
    its peers and the live collective over them."""

    shard: ShardRange
    widths: list[int]
    outbox: Outbox
    peers: Peers
    collective: WireCollective = field(init=False)

    def __post_init__(self) -> None:
        self.collective = WireCollective(self.shard, self.widths, self.outbox, self.peers)

    def replay(self, round: int, sums: bytes) -> ReplayCollective:
        """The collective of round `round`'s logged close: its `sums`, its parts republished."""
        arrays = unpack_arrays(sums) if sums else []
        return ReplayCollective(self.shard, self.widths, arrays, self.outbox, round)

    def gather_model(self, round: int, mine: np.ndarray) -> np.ndarray:
        """The whole x of `round` (rank 0, for evaluation): every peer's published slice."""
        slices = [
            mine if rank == self.shard.rank else self.peers.fetch(rank, MODEL, round, 0)
            for rank in range(self.shard.count)
        ]
        return np.concatenate(slices)
