"""grpc.health.v1 and server reflection on the workers' port, within the anonymous share.

Why: both answer callers without a credential (an orchestrator's readiness probe, grpcurl), and
their streams stay open as long as the caller likes: a health Watch waits for a change of status,
a reflection stream for the next request. Served stock, any caller could hold thousands of them
(measured: 4,685 Watch streams over 150 connections, +96 MB, all still open after 25 s). Here a
stream holds one of `Limits.anonymous_streams` slots that every caller shares and takes a token
of the anonymous bucket to open (Status's, `Limits.anonymous_per_second`); each reflection
request takes another; and a stream ends after `Limits.max_poll_seconds`, as a long-poll does (a
health client watches again, as it does after any ended stream). A health Check stays free: a
dictionary lookup costs no more than refusing it would, and it is what a readiness probe calls,
which a flood must not turn into a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from byzps.server.limits import Admission
from byzps.server.service import abort
from byzps.server.validation import Rejected


@contextlib.asynccontextmanager
async def anonymous_stream(
    admission: Admission, context: grpc.aio.ServicerContext
) -> AsyncIterator[float]:
    """Hold an anonymous stream slot for the block, which gets the loop time at which the stream
    must end; a refusal (no slot, no token, here or in the block) ends the call with its status."""
    try:
        with admission.anonymous_stream():
            yield asyncio.get_running_loop().time() + admission.limits.max_poll_seconds
    except Rejected as refusal:
        await abort(context, refusal)


class BoundedHealth(health.aio.HealthServicer):
    """The stock health servicer, its Watch streams bounded (the module doc)."""

    def __init__(self, admission: Admission) -> None:
        super().__init__()
        self._admission = admission

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Any) -> None:
        async with anonymous_stream(self._admission, context) as end:
            left = end - asyncio.get_running_loop().time()
            with contextlib.suppress(asyncio.TimeoutError):  # time's up: the stream ends, OK
                await asyncio.wait_for(super().Watch(request, context), left)


class BoundedReflection(reflection.aio.ReflectionServicer):
    """The stock reflection servicer, its streams bounded and each request metered."""

    def __init__(self, service_names: Sequence[str], admission: Admission) -> None:
        super().__init__(service_names)
        self._admission = admission

    async def ServerReflectionInfo(
        self, request_iterator: AsyncIterable[reflection_pb2.ServerReflectionRequest], context: Any
    ) -> AsyncIterator[reflection_pb2.ServerReflectionResponse]:
        async with anonymous_stream(self._admission, context) as end:
            requests = self._metered(request_iterator, end)
            async for reply in super().ServerReflectionInfo(requests, context):
                yield reply

    async def _metered(
        self, requests: AsyncIterable[reflection_pb2.ServerReflectionRequest], end: float
    ) -> AsyncIterator[reflection_pb2.ServerReflectionRequest]:
        """The caller's requests until it stops sending or the stream's time is up (the stream
        then ends, OK); each after the first takes an anonymous token (the first came with the
        slot), or the stream ends RESOURCE_EXHAUSTED."""
        loop = asyncio.get_running_loop()
        incoming = aiter(requests)
        first = True
        while (left := end - loop.time()) > 0:
            try:
                request = await asyncio.wait_for(anext(incoming), left)
            except (StopAsyncIteration, asyncio.TimeoutError):
                return
            if not first:
                self._admission.take_anonymous()
            first = False
            yield request


def add_side_services(
    server: grpc.aio.Server, admission: Admission, service_names: Sequence[str]
) -> health.aio.HealthServicer:
    """Health (returned, for the daemon to set its status) and reflection of `service_names`
    (the health and reflection services' own names are added) on `server`, before it starts."""
    health_servicer = BoundedHealth(admission)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = (
        *service_names,
        health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
        reflection.SERVICE_NAME,
    )
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        BoundedReflection(names, admission), server
    )
    return health_servicer
