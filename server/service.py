"""The gRPC servicer: a thin translation between protobuf messages and the Coordinator.

Every method authenticates, converts the request to domain values, calls the coordinator and
converts the answer back; refusals (Rejected) become a non-OK status with their precise code.
Anything unexpected becomes INTERNAL without touching state — the coordinator mutates state only
in steps that cannot fail halfway — so no input can crash the server. Requests are parsed by our
own deserializer, so even bytes that are not a protobuf message get INVALID_ARGUMENT instead of
gRPC's generic error.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from byzps.common.codec import COMPRESSOR_IDS, encode_model
from byzps.common.config import RunConfig
from byzps.common.downlink import DenseModel, Downlink, encode_downlink
from byzps.common.tasks.base import Task
from byzps.proto.v1 import parameter_server_pb2 as pb
from byzps.proto.v1 import parameter_server_pb2_grpc as pb_grpc
from byzps.server.auth import Authenticator
from byzps.server.broadcast import EncodedAnswers, passthrough
from byzps.server.coordinator import Coordinator
from byzps.server.validation import Rejected, max_update_bytes

log = logging.getLogger("byzps.server")

SERVICE_NAME = "byzps.v1.ParameterServer"
ACCEPTED_DTYPES = (pb.VALUE_DTYPE_FLOAT32, pb.VALUE_DTYPE_FLOAT16, pb.VALUE_DTYPE_BFLOAT16)

R = TypeVar("R", bound=Message)
T = TypeVar("T")


class Malformed:
    """Stands in for a request whose bytes did not parse, so the servicer can refuse it."""

    def __init__(self, error: str) -> None:
        self.error = error

    def ByteSize(self) -> int:  # mirrors the protobuf method it stands in for
        return 0


def _parser(cls: type[Message]) -> Callable[[bytes], Message | Malformed]:
    def parse(data: bytes) -> Message | Malformed:
        try:
            return cls.FromString(data)
        except (DecodeError, ValueError, RuntimeError) as exc:
            return Malformed(f"request is not a valid {cls.DESCRIPTOR.name}: {exc}")

    return parse


def model_spec(task: Task) -> pb.ModelSpec:
    """The flat model's layout: one TensorSpec per parameter tensor, in flattening order."""
    spec = pb.ModelSpec(dim=task.dim, dtype=pb.VALUE_DTYPE_FLOAT32)
    offset = 0
    for i, size in enumerate(task.layer_sizes):
        spec.tensors.append(
            pb.TensorSpec(name=f"tensor{i}", shape=[size], offset=offset, numel=size)
        )
        offset += size
    return spec


class ParameterServerServicer(pb_grpc.ParameterServerServicer):
    """Register, GetModel(Update), PushUpdate and Status over one Coordinator."""

    def __init__(
        self, coordinator: Coordinator, auth: Authenticator, config: RunConfig, task: Task
    ) -> None:
        self.coordinator = coordinator
        self.auth = auth
        self.digest = config.digest()
        # Each round's answers, serialized once for all workers (one cache per reply type).
        self._chunks = EncodedAnswers()
        self._updates = EncodedAnswers()
        self._static = pb.RegisterReply(
            model=model_spec(task),
            config_json=_config_json(config),
            config_digest=self.digest,
            compressor=COMPRESSOR_IDS[config.compressor.name],
            accepted_dtypes=ACCEPTED_DTYPES,
        )

    # --- RPCs -----------------------------------------------------------------------------

    def Register(self, request: Any, context: grpc.ServicerContext) -> pb.RegisterReply:
        def register() -> pb.RegisterReply:
            self.auth.check(
                context.invocation_metadata(),
                request.worker_id,
                request.token,
                context.auth_context(),
            )
            if request.config_digest and request.config_digest != self.digest:
                raise Rejected(
                    grpc.StatusCode.FAILED_PRECONDITION,
                    f"config digest {request.config_digest} differs from the server's "
                    f"{self.digest}",
                )
            round, last_seq = self.coordinator.register(request.worker_id)
            k_max = self.coordinator.k_max(round)
            peak = max(k_max, self.coordinator.k_max(0))
            reply = pb.RegisterReply()
            reply.CopyFrom(self._static)
            reply.k_max = k_max
            reply.max_update_bytes = max_update_bytes(peak)
            reply.round = round
            reply.last_seq = last_seq
            return reply

        return self._unary(request, context, register)

    def PushUpdate(self, request: Any, context: grpc.ServicerContext) -> pb.Ack:
        def push() -> pb.Ack:
            row = self.auth.check(
                context.invocation_metadata(), request.worker_id, peer=context.auth_context()
            )
            if not request.HasField("update"):
                raise Rejected(grpc.StatusCode.INVALID_ARGUMENT, "update: missing")
            ack = self.coordinator.push(
                request.worker_id, row, request.round, request.seq, request.update
            )
            status = pb.ACK_STATUS_DUPLICATE if ack.duplicate else pb.ACK_STATUS_ACCEPTED
            return pb.Ack(status=status, round=ack.round, last_seq=ack.last_seq)

        return self._unary(request, context, push)

    def GetModel(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        def fetch(known: int | None) -> DenseModel | None:
            return self.coordinator.model(request.round, known, request.wait, _alive(context))

        found = self._await(request, context, fetch)
        if found is not None:
            yield from self._sent(self._chunks.get(found, _model_chunks))

    def GetModelUpdate(self, request: Any, context: grpc.ServicerContext) -> Iterator[bytes]:
        def fetch(known: int | None) -> Downlink | None:
            return self.coordinator.downlink(
                request.round, known, request.wait, _alive(context), request.has_aggregate
            )

        found = self._await(request, context, fetch)
        if found is not None:
            yield from self._sent(self._updates.get(found, encode_downlink))

    def Status(self, request: Any, context: grpc.ServicerContext) -> pb.StatusReply:
        def status() -> pb.StatusReply:
            info = self.coordinator.status()
            reply = pb.StatusReply(round=info.round, bytes_in=info.bytes_in)
            for w in info.workers:
                ws = reply.workers.add(worker_id=w.worker_id, last_seq=w.last_seq)
                ws.last_seen.FromNanoseconds(int(w.last_seen * 1e9))
                ws.last_round = max(w.last_round, 0)
            reply.bytes_out = info.bytes_out
            return reply

        return self._unary(request, context, status)

    # --- translation helpers --------------------------------------------------------------

    def _call(self, request: Any, context: grpc.ServicerContext, fn: Callable[[], Any]) -> Any:
        """Run `fn`; a Rejected or unexpected exception ends the call with its status code."""
        if isinstance(request, Malformed):
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.error)
        self.coordinator.account(bytes_in=request.ByteSize())
        try:
            return fn()
        except Rejected as exc:
            code, reason = exc.code, exc.reason
        except Exception:
            log.exception("unexpected error in %s", type(request).__name__)
            code, reason = grpc.StatusCode.INTERNAL, "internal server error"
        context.abort(code, reason)

    def _await(
        self, request: Any, context: grpc.ServicerContext, fetch: Callable[[int | None], T]
    ) -> T | None:
        """The shared front of both model RPCs: authenticate, then `fetch(known_round)`; a
        long-poll that outlives its deadline while still connected ends DEADLINE_EXCEEDED."""

        def call() -> T | None:
            self.auth.check(
                context.invocation_metadata(), request.worker_id, peer=context.auth_context()
            )
            self.coordinator.touch(request.worker_id)
            return fetch(request.known_round if request.HasField("known_round") else None)

        found = self._call(request, context, call)
        if found is None and context.is_active():  # still connected, so its deadline ran out
            context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no newer round before deadline")
        return found

    def _sent(self, messages: list[bytes]) -> Iterator[bytes]:
        """Pass a serialized reply stream through, counting its bytes."""
        for data in messages:
            self.coordinator.account(bytes_out=len(data))
            yield data

    def _unary(self, request: Any, context: grpc.ServicerContext, fn: Callable[[], R]) -> R:
        reply = self._call(request, context, fn)
        self.coordinator.account(bytes_out=reply.ByteSize())
        return reply


def _alive(context: grpc.ServicerContext) -> Callable[[], bool]:
    def alive() -> bool:
        remaining = context.time_remaining()
        return context.is_active() and (remaining is None or remaining > 0)

    return alive


def _model_chunks(model: DenseModel) -> Iterator[pb.ModelChunk]:
    return encode_model(model.x, model.round)


def _config_json(config: RunConfig) -> str:
    return json.dumps(config.to_dict())


def add_to_server(servicer: ParameterServerServicer, server: grpc.Server) -> None:
    """Register the servicer like the generated helper, but with forgiving request parsers."""
    handlers = {
        "Register": grpc.unary_unary_rpc_method_handler(
            servicer.Register,
            request_deserializer=_parser(pb.RegisterRequest),
            response_serializer=pb.RegisterReply.SerializeToString,
        ),
        "GetModel": grpc.unary_stream_rpc_method_handler(
            servicer.GetModel,
            request_deserializer=_parser(pb.GetModelRequest),
            response_serializer=passthrough(pb.ModelChunk.SerializeToString),
        ),
        "GetModelUpdate": grpc.unary_stream_rpc_method_handler(
            servicer.GetModelUpdate,
            request_deserializer=_parser(pb.GetModelRequest),
            response_serializer=passthrough(pb.ModelUpdate.SerializeToString),
        ),
        "PushUpdate": grpc.unary_unary_rpc_method_handler(
            servicer.PushUpdate,
            request_deserializer=_parser(pb.PushUpdateRequest),
            response_serializer=pb.Ack.SerializeToString,
        ),
        "Status": grpc.unary_unary_rpc_method_handler(
            servicer.Status,
            request_deserializer=_parser(pb.StatusRequest),
            response_serializer=pb.StatusReply.SerializeToString,
        ),
    }
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
    server.add_registered_method_handlers(SERVICE_NAME, handlers)
