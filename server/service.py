"""The gRPC servicer (grpc.aio): a thin translation between protobuf messages and the Coordinator.

Every method parses, authenticates, is admitted (byzps.server.limits), converts the request to
domain values, calls the coordinator and converts the answer back; a refusal (Rejected) becomes a
non-OK status with its precise code. Anything unexpected becomes INTERNAL without touching state
— the coordinator mutates state only in steps that cannot fail halfway — so no input can crash
the server.

Why asyncio: a waiting call must not cost a thread. A long-poll for the next round, a reader
that stops reading a model stream, a request that trickles in byte by byte — under a thread-pool
server each holds a thread, and twenty of them from one worker's valid token blocked every other
worker (measured). Here each is a suspended coroutine; long-polls are held at most
`Limits.max_poll_seconds`, a reply write that waits longer than `Limits.stall_seconds` for the
reader ends the call, and a request is refused by size before it is parsed. The coordinator's
work (its lock, aggregation, snapshots, serialization) runs on a small thread pool so the event
loop never waits behind it.

Requests are parsed by our own deserializer with a per-method size limit, so bytes that are not a
protobuf message get INVALID_ARGUMENT, and padding (unknown fields) beyond the largest legal
request gets RESOURCE_EXHAUSTED, before anything else is done.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import json
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from byzps.common.codec import COMPRESSOR_IDS, RETRY_AFTER_METADATA_KEY, encode_model_wire
from byzps.common.config import RunConfig
from byzps.common.downlink import DenseModel, encode_downlink_wire
from byzps.common.shards import ShardRange
from byzps.common.tasks.base import Task
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.server.auth import Authenticator
from byzps.server.broadcast import EncodedAnswers, passthrough
from byzps.server.coordinator import AckInfo, Coordinator
from byzps.server.limits import Admission, Group, Limits
from byzps.server.metrics import OK, ServerMetrics
from byzps.server.validation import Refusal, Rejected, Update, max_update_bytes

log = logging.getLogger("byzps.server")

SERVICE_NAME = "byzps.v1.ParameterServer"
ACCEPTED_DTYPES = (pb.VALUE_DTYPE_FLOAT32, pb.VALUE_DTYPE_FLOAT16, pb.VALUE_DTYPE_BFLOAT16)

T = TypeVar("T")


class Malformed:
    """Stands in for a request whose bytes did not parse (or were too many), so the servicer can
    refuse it with `code`."""

    def __init__(self, code: Refusal, error: str) -> None:
        self.code = code
        self.error = error


async def abort(context: grpc.aio.ServicerContext, refusal: Rejected) -> None:
    """End the call with the refusal's status and reason, and its retry hint (the
    `byzps-retry-after-ms` trailing metadata) when it has one; raises grpc.aio.AbortError."""
    if refusal.retry_after is not None:
        millis = str(max(1, round(refusal.retry_after * 1000)))
        context.set_trailing_metadata(((RETRY_AFTER_METADATA_KEY, millis),))
    await context.abort(getattr(grpc.StatusCode, refusal.code.name), refusal.reason)


def _parser(
    cls: type[Message], limit: int, received: Callable[[int], None]
) -> Callable[[bytes], Message | Malformed]:
    """The request deserializer of one method: counts the bytes as they arrived (`received`;
    a parsed message's ByteSize() would serialize it again: 4 MB per dense push at d = 1e6),
    refuses more than `limit` of them, and turns bytes that do not parse into a Malformed."""
    name = cls.DESCRIPTOR.name

    def parse(data: bytes) -> Message | Malformed:
        received(len(data))
        if len(data) > limit:
            return Malformed(
                Refusal.RESOURCE_EXHAUSTED, f"{name} is {len(data)} bytes, limit {limit}"
            )
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Malformed(Refusal.INVALID_ARGUMENT, f"request is not a valid {name}: {exc}")

    return parse


def model_spec(task: Task, shard: ShardRange | None = None) -> pb.ModelSpec:
    """The flat model's layout: one TensorSpec per parameter tensor, in flattening order. A
    shard's model is its slice, one flat tensor (the whole layout is the task's, which the
    worker builds from the config)."""
    if shard is not None and not shard.whole:
        tensor = pb.TensorSpec(
            name=f"shard{shard.rank}", shape=[shard.width], offset=0, numel=shard.width
        )
        return pb.ModelSpec(dim=shard.width, dtype=pb.VALUE_DTYPE_FLOAT32, tensors=[tensor])
    spec = pb.ModelSpec(dim=task.dim, dtype=pb.VALUE_DTYPE_FLOAT32)
    offset = 0
    for i, size in enumerate(task.layer_sizes):
        spec.tensors.append(
            pb.TensorSpec(name=f"tensor{i}", shape=[size], offset=offset, numel=size)
        )
        offset += size
    return spec


class ParameterServerServicer:
    """Register, GetModel(Update), PushUpdate and Status over one Coordinator.

    `attach(loop)` must be called on the serving event loop before the first call: it makes the
    coordinator's round closes wake parked long-polls and refill the callers' rate budgets.
    """

    def __init__(
        self,
        coordinator: Coordinator,
        auth: Authenticator,
        config: RunConfig,
        task: Task,
        *,
        limits: Limits | None = None,
        executor: Executor | None = None,
        metrics: ServerMetrics | None = None,
        shard: ShardRange | None = None,
    ) -> None:
        self.coordinator = coordinator
        self.auth = auth
        self.limits = limits if limits is not None else Limits()
        self.admission = Admission(self.limits, coordinator.num_workers)
        self.metrics = metrics if metrics is not None else ServerMetrics()
        self.metrics.watch(coordinator, self.admission)
        self.digest = config.digest()
        self._executor = executor or ThreadPoolExecutor(4, thread_name_prefix="coordinator")
        self._owns_executor = executor is None
        self._changed: asyncio.Event | None = None
        self._acks: DurableAcks | None = None  # set by `attach`
        # Each round's answers, serialized once for all workers (one cache per reply type).
        self._chunks = EncodedAnswers()
        self._updates = EncodedAnswers()
        self._static = pb.RegisterReply(
            model=model_spec(task, shard),
            config_json=json.dumps(config.to_dict()),
            config_digest=self.digest,
            compressor=COMPRESSOR_IDS[config.compressor.name],
            accepted_dtypes=ACCEPTED_DTYPES,
        )
        if shard is not None and not shard.whole:
            self._static.shard.CopyFrom(shard.info())

    def attach(self, loop: asyncio.AbstractEventLoop) -> None:
        """Wake parked callers on `loop` whenever the coordinator closes a round or stops."""
        self._changed = asyncio.Event()

        def wake() -> None:
            assert self._changed is not None
            self._changed.set()
            self._changed = asyncio.Event()
            self.admission.round_closed()

        def schedule() -> None:
            if not loop.is_closed():
                loop.call_soon_threadsafe(wake)

        self.coordinator.on_change(schedule)
        self._acks = DurableAcks(self.coordinator, loop)

    def close(self) -> None:
        if self._acks is not None:
            self._acks.close()
        if self._owns_executor:
            self._executor.shutdown(wait=True)

    # --- RPCs -----------------------------------------------------------------------------

    async def Register(self, request: Any, context: grpc.aio.ServicerContext) -> pb.RegisterReply:
        async with self._serving(request, context, Group.REGISTER, by_token=True) as row:
            if request.config_digest and request.config_digest != self.digest:
                raise Rejected(
                    Refusal.FAILED_PRECONDITION,
                    f"config digest {request.config_digest} differs from the server's "
                    f"{self.digest}",
                )
            round, last_seq = await self.offload(self.coordinator.register, row)
            self.metrics.registered(row)
            door = self.coordinator.door
            reply = pb.RegisterReply()
            reply.CopyFrom(self._static)
            reply.k_max = door.k_max(round)
            reply.max_update_bytes = max_update_bytes(door.largest_k_max)
            reply.round = round
            reply.last_seq = last_seq
            return self._sent(reply)

    async def PushUpdate(self, request: Any, context: grpc.aio.ServicerContext) -> pb.Ack:
        async with self._serving(request, context, Group.PUSH) as row:
            if not request.HasField("update"):
                raise Rejected(Refusal.INVALID_ARGUMENT, "update: missing")

            def receive() -> tuple[Update, AckInfo, int]:  # wire checks, then apply: one hop
                update = self.coordinator.door.receive(
                    row, request.round, request.seq, request.update
                )
                return (update, *self.coordinator.apply(update))

            update, ack, ticket = await self.offload(receive)
            if self._acks is None:  # not attached to a loop: wait on the pool
                await self.offload(self.coordinator.settle, ticket)
            else:
                await self._acks.wait(ticket)
            self.metrics.update_acked(row, duplicate=ack.duplicate, wire_bytes=update.wire_bytes)
            status = pb.ACK_STATUS_DUPLICATE if ack.duplicate else pb.ACK_STATUS_ACCEPTED
            return self._sent(pb.Ack(status=status, round=ack.round, last_seq=ack.last_seq))

    async def GetModel(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        async with self._serving(request, context, Group.MODEL) as row:
            known = request.known_round if request.HasField("known_round") else None

            def fetch() -> DenseModel | None:
                self.coordinator.touch(row)
                return self.coordinator.model(request.round, known)

            answer = await self._await(fetch, request, context)
            messages = await self.offload(self._chunks.get, answer, _model_chunks)
            await self._stream(messages, context)

    async def GetModelUpdate(self, request: Any, context: grpc.aio.ServicerContext) -> None:
        async with self._serving(request, context, Group.MODEL) as row:
            known = request.known_round if request.HasField("known_round") else None

            def fetch() -> object:
                self.coordinator.touch(row)
                return self.coordinator.downlink(request.round, known, request.has_aggregate)

            answer = await self._await(fetch, request, context)
            messages = await self.offload(self._updates.get, answer, encode_downlink_wire)
            await self._stream(messages, context)

    async def Status(self, request: Any, context: grpc.aio.ServicerContext) -> pb.StatusReply:
        cost = self.limits.status_cost(self.coordinator.num_workers)  # its per-worker table
        async with self._serving(request, context, Group.STATUS, anonymous=True, cost=cost) as row:
            info = await self.offload(self.coordinator.status)
            reply = pb.StatusReply(
                round=info.round,
                rounds=info.rounds,
                finished=info.phase.value == "finished",
                phase=info.phase.value,
                num_workers=info.num_workers,
                registered=len(info.workers),
                bytes_in=info.bytes_in,
                bytes_out=info.bytes_out,
            )
            if row is not None:  # the caller holds a credential: every worker's line too
                for w in info.workers:
                    ws = reply.workers.add(worker_id=str(w.row), last_seq=w.last_seq)
                    ws.last_seen.FromNanoseconds(int(w.last_seen * 1e9))
                    ws.last_round = max(w.last_round, 0)
                if row == info.num_workers and info.suspicion is not None:  # the operator only
                    reply.suspicion.extend(info.suspicion)
            return self._sent(reply)

    # --- translation helpers --------------------------------------------------------------

    @asynccontextmanager
    async def _serving(
        self,
        request: Any,
        context: grpc.aio.ServicerContext,
        group: Group,
        *,
        by_token: bool = False,
        anonymous: bool = False,
        cost: float = 1.0,
    ) -> AsyncIterator[int | None]:
        """Check and admit one call, then run its body; a Rejected (from here or the body) ends
        the call with its status, anything else with INTERNAL.

        Yields the caller's row: the worker it authenticated as, or for `anonymous` calls the
        row of any credential it presented (None: none). Every call is counted in `metrics`
        by its method group, its status and (once authenticated) its worker. `cost`: the
        tokens an authenticated caller's call takes from its budget (byzps.server.limits).
        `by_token`: the request carries the caller's token (Register), read only once the
        request is known to have parsed — a Malformed one has no fields to read."""
        connection, code, row = context.peer(), OK, None
        self.metrics.call_started(group.value, connection)
        try:
            if isinstance(request, Malformed):
                raise Rejected(request.code, request.error)
            metadata = context.invocation_metadata() or ()
            peer = context.auth_context()
            if anonymous:
                row = self.auth.holder(metadata, peer)
            else:
                token = request.token if by_token else b""
                row = self.auth.check(metadata, request.worker_id, token, peer)
            with self.admission.enter(row, group, cost):
                yield row
        except Rejected as exc:
            code = exc.code.name
            await abort(context, exc)
        except grpc.aio.AbortError:
            raise
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED.name
            raise
        except Exception:
            code = grpc.StatusCode.INTERNAL.name
            log.exception("unexpected error in %s", group.value)
            await context.abort(grpc.StatusCode.INTERNAL, "internal server error")
        finally:
            self.metrics.call_ended(group.value, connection, code, row)

    async def offload(self, fn: Callable[..., T], *args: Any) -> T:
        """`fn(*args)` on the coordinator's thread pool: it may wait for the coordinator's lock
        (held through an aggregation), which the event loop must never do."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(fn, *args))

    async def _await(
        self, fetch: Callable[[], T | None], request: Any, context: grpc.aio.ServicerContext
    ) -> T:
        """The answer `fetch()` gives once it gives one: at once (wait=false: FAILED_PRECONDITION
        when there is none yet), or parked until a round closes, for at most the client's
        deadline and `max_poll_seconds` (then DEADLINE_EXCEEDED: the client asks again)."""
        loop = asyncio.get_running_loop()
        remaining = context.time_remaining()
        budget = self.limits.max_poll_seconds
        deadline = loop.time() + (budget if remaining is None else min(budget, remaining))
        while True:
            changed = self._changed  # taken before looking, so no close can slip in between
            found = await self.offload(fetch)
            if found is not None:
                return found
            if not request.wait:
                known = request.known_round if request.HasField("known_round") else None
                raise Rejected(
                    Refusal.FAILED_PRECONDITION,
                    f"the server is at round {self.coordinator.round}; asked for round >= "
                    f"{request.round}" + ("" if known is None else f" and > {known}"),
                )
            left = deadline - loop.time()
            if left <= 0 or changed is None:
                raise Rejected(Refusal.DEADLINE_EXCEEDED, "no newer round before the deadline")
            try:
                await asyncio.wait_for(changed.wait(), left)
            except asyncio.TimeoutError:
                continue  # the loop sees the deadline has passed

    async def _stream(self, messages: Iterable[bytes], context: grpc.aio.ServicerContext) -> None:
        """Send a serialized reply stream; a reader that takes no message for `stall_seconds`
        (its flow-control window stays shut) is cut off with RESOURCE_EXHAUSTED."""
        stall = self.limits.stall_seconds
        for data in messages:
            self.coordinator.account(bytes_out=len(data))
            try:
                await asyncio.wait_for(context.write(data), stall)
            except asyncio.TimeoutError:
                raise Rejected(
                    Refusal.RESOURCE_EXHAUSTED, f"the reader took nothing for {stall:g} s"
                ) from None
            except Exception:
                if context.cancelled():  # the reader went away: nothing left to send it
                    return
                raise

    def _sent(self, reply: Message) -> Any:
        self.coordinator.account(bytes_out=reply.ByteSize())
        return reply


class DurableAcks:
    """Pushes waiting for their log record to reach the disk before their Ack goes out, all
    waited for by one thread (`Coordinator.apply` says why not by the pool's threads).

    `wait(ticket)` (on the event loop) parks the call on a future; the thread waits for the
    smallest ticket pending (`Coordinator.settle`, which also publishes a round whose close
    record is now on disk), settles the largest one already on disk too, and resolves every
    future up to it: a group commit acknowledges everything it held at once. The futures are at
    most the pushes in flight, which the admission bounds per worker (byzps.server.limits).
    When the log fails, every waiting push ends UNAVAILABLE, as `settle` says."""

    def __init__(self, coordinator: Coordinator, loop: asyncio.AbstractEventLoop) -> None:
        self._coordinator = coordinator
        self._loop = loop
        self._cond = threading.Condition()
        self._pending: list[tuple[int, int, asyncio.Future[None]]] = []  # heap by ticket
        self._count = itertools.count()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="durable-acks", daemon=True)
        self._thread.start()

    def wait(self, ticket: int) -> asyncio.Future[None]:
        """A future that completes once log record `ticket` is on disk (at once for 0)."""
        future: asyncio.Future[None] = self._loop.create_future()
        if ticket <= 0:
            future.set_result(None)
            return future
        with self._cond:
            if self._closed:
                future.set_exception(Rejected(Refusal.UNAVAILABLE, "the server is shutting down"))
                return future
            heapq.heappush(self._pending, (ticket, next(self._count), future))
            self._cond.notify()
        return future

    def close(self) -> None:
        """Stop the thread; pushes still waiting end UNAVAILABLE."""
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(30)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    left = [f for _, _, f in self._pending]
                    self._pending.clear()
                    self._resolve(left, Rejected(Refusal.UNAVAILABLE, "the server stopped"))
                    return
                first = self._pending[0][0]
            error: Rejected | None = None
            try:
                self._coordinator.settle(first)
            except Rejected as exc:
                error = exc
            except Exception:  # never leave a push waiting on a thread that died
                log.exception("waiting for the write-ahead log failed")
                error = Rejected(Refusal.UNAVAILABLE, "the server could not confirm the write")
            with self._cond:
                done = []
                while self._pending and (
                    error is not None or self._coordinator.durable(self._pending[0][0])
                ):
                    done.append(heapq.heappop(self._pending))
            if done and error is None and done[-1][0] > first:
                # Records on disk since: publish a round their group closed before acking them.
                try:
                    self._coordinator.settle(done[-1][0])
                except Rejected as exc:
                    error = exc
            self._resolve([f for _, _, f in done], error)

    def _resolve(self, futures: list[asyncio.Future[None]], error: Rejected | None) -> None:
        def complete() -> None:
            for future in futures:
                if not future.done():  # a cancelled call no longer waits
                    if error is None:
                        future.set_result(None)
                    else:
                        future.set_exception(error)

        if futures and not self._loop.is_closed():
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                self._loop.call_soon_threadsafe(complete)


def _model_chunks(model: DenseModel) -> Iterator[bytes]:
    return encode_model_wire(model.x, model.round)


def add_to_server(servicer: ParameterServerServicer, server: grpc.aio.Server) -> None:
    """Register the servicer like the generated helper, but with size-limited, forgiving request
    parsers and pass-through serializers for the pre-serialized model streams."""
    limits = servicer.coordinator.door.request_limits()

    def received(size: int) -> None:
        servicer.coordinator.account(bytes_in=size)

    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register,
            request_deserializer=_parser(pb.RegisterRequest, limits["Register"], received),
            response_serializer=pb.RegisterReply.SerializeToString,
        ),
        "GetModel": grpc.unary_stream_rpc_method_handler(
            servicer.GetModel,
            request_deserializer=_parser(pb.GetModelRequest, limits["GetModel"], received),
            response_serializer=passthrough(pb.ModelChunk.SerializeToString),
        ),
        "GetModelUpdate": grpc.unary_stream_rpc_method_handler(
            servicer.GetModelUpdate,
            request_deserializer=_parser(pb.GetModelRequest, limits["GetModelUpdate"], received),
            response_serializer=passthrough(pb.ModelUpdate.SerializeToString),
        ),
        "PushUpdate": grpc.unary_unary_rpc_method_handler(
            servicer.PushUpdate,
            request_deserializer=_parser(pb.PushUpdateRequest, limits["PushUpdate"], received),
            response_serializer=pb.Ack.SerializeToString,
        ),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status,
            request_deserializer=_parser(pb.StatusRequest, limits["Status"], received),
            response_serializer=pb.StatusReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
