"""The gRPC frontend: KServe v2 ``inference.GRPCInferenceService`` and ``grpc.health.v1``.

Wire-compatible with Triton's gRPC endpoint, so ``tritonclient.grpc`` (and
hand-built ``service_pb2`` requests like the seed's client) work unchanged.
Every RPC decodes with :mod:`triserve.frontends.kserve_proto`, calls the core, and maps
:class:`InferError` codes onto gRPC status codes the way Triton does.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import socket
import ssl
from typing import TYPE_CHECKING, Any, AsyncIterator, Awaitable, Callable

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc

from triserve.core import flow
from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferResponse
from triserve.frontends import kserve_proto
from triserve.frontends.auth import Gate
from triserve.frontends.faults import report_bug
from triserve.frontends.grpc.auth import AuthInterceptor
from triserve.frontends.grpc.h2 import GrpcServer
from triserve.options import Access, Limits, Tls

if TYPE_CHECKING:
    from triserve.core.api import Core

logger = logging.getLogger("triserve.grpc")

SERVICE_NAME = "inference.GRPCInferenceService"


def server_options(limits: Limits) -> list[tuple[str, int]]:
    """grpc core options: message size limits (grpc answers RESOURCE_EXHAUSTED past them,
    naming both sizes, before the message is handed to us) and no port sharing."""
    return [
        ("grpc.max_send_message_length", limits.grpc_max_message),
        ("grpc.max_receive_message_length", limits.grpc_max_message),
        # Never share the port with another process (gRPC's Linux default allows it).
        ("grpc.so_reuseport", 0),
    ]

# Triton's GrpcStatusUtil::CodeToStatus: UNSUPPORTED (e.g. ModelInfer on a
# decoupled model) is UNIMPLEMENTED on the gRPC wire.
STATUS_CODE: dict[ErrorCode, grpc.StatusCode] = {
    ErrorCode.INVALID_ARGUMENT: grpc.StatusCode.INVALID_ARGUMENT,
    ErrorCode.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    ErrorCode.UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
    ErrorCode.UNSUPPORTED: grpc.StatusCode.UNIMPLEMENTED,
    ErrorCode.ALREADY_EXISTS: grpc.StatusCode.ALREADY_EXISTS,
    ErrorCode.CANCELLED: grpc.StatusCode.CANCELLED,
    ErrorCode.INTERNAL: grpc.StatusCode.INTERNAL,
}

# Request parameter (reserved by Triton, read by the frontend, not passed to the
# model): send an empty response carrying only the final flag when a decoupled
# model ends its stream without data.
ENABLE_EMPTY_FINAL = "triton_enable_empty_final_response"
# Response parameter on every streamed response: is this the request's last one?
FINAL_RESPONSE = "triton_final_response"

Context = grpc.aio.ServicerContext
Handler = Callable[[Any, Any, Context], Awaitable[Any]]


def create_native_grpc_server(core: Core, listener: socket.socket, limits: Limits = Limits(),
                              access: Access = Access(), tls: Tls = Tls()) -> GrpcServer:
    """triserve's own gRPC server (:mod:`triserve.frontends.grpc.h2`) on a bound ``listener``,
    not started yet, serving the same servicers with the same API-key rule and TLS."""
    servicer, health = InferenceServicer(core, limits), HealthServicer(core)
    context = None
    if tls.enabled:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(tls.cert, tls.key)
        context.set_alpn_protocols(["h2"])
        if tls.client_ca is not None:
            context.verify_mode = ssl.CERT_REQUIRED
            context.load_verify_locations(cafile=tls.client_ca)
    return GrpcServer(listener, [
        functools.partial(service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server, servicer),
        functools.partial(health_pb2_grpc.add_HealthServicer_to_server, health),
    ], limits.grpc_max_message, Gate(access), context)


def create_grpc_server(core: Core, address: str, limits: Limits = Limits(),
                       access: Access = Access(), tls: Tls = Tls()) -> grpc.aio.Server:
    """A grpc.aio server bound to ``address`` ("host:port"), not started yet (``--grpc-server grpcio``).

    With an API key every call goes through :class:`AuthInterceptor`; with TLS files the
    port speaks TLS only (and requires client certificates when a client CA is given).
    """
    gate = Gate(access)
    server = grpc.aio.server(options=server_options(limits),
                             interceptors=[AuthInterceptor(gate)] if gate.enabled else None)
    service_pb2_grpc.add_GRPCInferenceServiceServicer_to_server(InferenceServicer(core, limits), server)
    health_pb2_grpc.add_HealthServicer_to_server(HealthServicer(core), server)
    if tls.enabled:
        credentials = grpc.ssl_server_credentials(
            [(tls.key.read_bytes(), tls.cert.read_bytes())],
            root_certificates=tls.client_ca.read_bytes() if tls.client_ca else None,
            require_client_auth=tls.client_ca is not None,
        )
        server.add_secure_port(address, credentials)
    else:
        server.add_insecure_port(address)
    return server


def unary(handler: Handler) -> Handler:
    """Turn :class:`InferError` (and unexpected failures) into gRPC status codes."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: Context) -> Any:
        try:
            return await handler(self, request, context)
        except InferError as error:
            await context.abort(STATUS_CODE[error.code], error.message)
        except Exception as error:  # a bug must reach the client as INTERNAL, not hang or vanish
            message = report_bug(logger, f"serving gRPC {handler.__name__}", error)
            await context.abort(grpc.StatusCode.INTERNAL, message)

    return wrapper


def not_supported(feature: str) -> Handler:
    """A handler for an RPC triserve does not offer, answering UNIMPLEMENTED with a reason."""

    async def handler(self: Any, request: Any, context: Context) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, f"{feature} is not supported by triserve")

    return handler


class _ByteBudget:
    """Bytes a stream's outbox may hold: ``take`` waits while others hold them (a reply larger
    than the whole budget goes alone), ``give`` returns them once written."""

    def __init__(self, limit: int):
        self._limit = limit
        self._used = 0
        self._waiters: collections.deque[asyncio.Future] = collections.deque()

    async def take(self, size: int) -> None:
        while self._used and self._used + size > self._limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            await waiter
        self._used += size

    def give(self, size: int) -> None:
        self._used -= size
        while self._waiters:  # each waiter checks again whether it fits now
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)


def is_bare_final_flag(response: InferResponse) -> bool:
    """A decoupled model's "no more responses" flag, sent without any data of its own."""
    return response.final and response.error is None and not response.outputs and not response.parameters


class InferenceServicer(service_pb2_grpc.GRPCInferenceServiceServicer):
    """``inference.GRPCInferenceService`` over the core."""

    def __init__(self, core: Core, limits: Limits = Limits()):
        self.core = core
        self.limits = limits

    # --- health and metadata -------------------------------------------------

    @unary
    async def ServerLive(
        self, request: service_pb2.ServerLiveRequest, context: Context
    ) -> service_pb2.ServerLiveResponse:
        return service_pb2.ServerLiveResponse(live=self.core.live)

    @unary
    async def ServerReady(
        self, request: service_pb2.ServerReadyRequest, context: Context
    ) -> service_pb2.ServerReadyResponse:
        return service_pb2.ServerReadyResponse(ready=self.core.ready)

    @unary
    async def ModelReady(
        self, request: service_pb2.ModelReadyRequest, context: Context
    ) -> service_pb2.ModelReadyResponse:
        # Like Triton: an unknown or unloaded model is simply not ready.
        try:
            ready = self.core.get_model(request.name, request.version).ready
        except InferError as error:
            if error.code not in (ErrorCode.NOT_FOUND, ErrorCode.UNAVAILABLE):
                raise
            ready = False
        return service_pb2.ModelReadyResponse(ready=ready)

    @unary
    async def ServerMetadata(
        self, request: service_pb2.ServerMetadataRequest, context: Context
    ) -> service_pb2.ServerMetadataResponse:
        return kserve_proto.server_metadata_to_proto(self.core.metadata())

    @unary
    async def ModelMetadata(
        self, request: service_pb2.ModelMetadataRequest, context: Context
    ) -> service_pb2.ModelMetadataResponse:
        model = self.core.get_model(request.name, request.version)
        return kserve_proto.model_metadata_to_proto(model.metadata())

    @unary
    async def ModelConfig(
        self, request: service_pb2.ModelConfigRequest, context: Context
    ) -> service_pb2.ModelConfigResponse:
        model = self.core.get_model(request.name, request.version)
        return kserve_proto.model_config_to_proto(model.config)

    @unary
    async def ModelStatistics(
        self, request: service_pb2.ModelStatisticsRequest, context: Context
    ) -> service_pb2.ModelStatisticsResponse:
        return kserve_proto.statistics_to_proto(self.core.statistics(request.name, request.version))

    # --- inference -----------------------------------------------------------

    @unary
    async def ModelInfer(
        self, request: service_pb2.ModelInferRequest, context: Context
    ) -> service_pb2.ModelInferResponse:
        infer_request = kserve_proto.request_from_proto(request, self.limits.max_tensor_elements)
        response = await self.core.infer(infer_request)
        return kserve_proto.response_to_proto(response)

    async def ModelStreamInfer(
        self, request_iterator: AsyncIterator[service_pb2.ModelInferRequest], context: Context
    ) -> None:
        """Bidirectional stream: every request runs concurrently, responses interleave.

        Each response carries its request's id. Errors go into ``error_message``
        and the stream goes on. When the client cancels or disconnects, this
        coroutine is cancelled and closes every in-flight core stream, which
        cancels those requests in the backends.

        Bounded both ways: at most ``--grpc-max-stream-in-flight`` requests run at once
        (a request past it gets an error reply at once and the stream goes on), and the
        outbox holds at most as many replies, and at most ``flow.HIGH_WATER_BYTES`` of them
        (one larger reply alone): when the client stops reading, the requests stop pulling
        responses from the core, which holds the models back (:mod:`triserve.core.flow`),
        instead of queueing them here without end.
        """
        limit = self.limits.grpc_max_stream_in_flight
        outbox: asyncio.Queue[tuple[service_pb2.ModelStreamInferResponse, int] | None] = asyncio.Queue()
        room = asyncio.Semaphore(limit)  # replies queued or being written, at most ``limit``
        budget = _ByteBudget(flow.HIGH_WATER_BYTES)  # and their bytes
        in_flight: set[asyncio.Task] = set()

        async def emit(reply: service_pb2.ModelStreamInferResponse) -> None:
            size = reply.ByteSize()
            await room.acquire()
            await budget.take(size)
            outbox.put_nowait((reply, size))

        async def read_requests() -> None:
            try:
                async for message in request_iterator:
                    if len(in_flight) >= limit:
                        await emit(_stream_error(
                            message, f"too many requests in flight on this stream: the limit is {limit} "
                                     "(--grpc-max-stream-in-flight); wait for responses before sending more"))
                        continue
                    task = asyncio.create_task(self._stream_one(message, emit))
                    in_flight.add(task)
                    task.add_done_callback(in_flight.discard)
                if in_flight:
                    await asyncio.wait(set(in_flight))
            finally:
                outbox.put_nowait(None)  # the end mark needs no room: it never waits

        reader = asyncio.create_task(read_requests())
        try:
            while (item := await outbox.get()) is not None:
                reply, size = item
                await context.write(reply)
                budget.give(size)
                room.release()
            await reader  # surfaces a failure to read the request stream
        finally:
            for task in (reader, *in_flight):
                task.cancel()
            await asyncio.gather(reader, *in_flight, return_exceptions=True)

    async def _stream_one(
        self,
        message: service_pb2.ModelInferRequest,
        emit: Callable[[service_pb2.ModelStreamInferResponse], Awaitable[None]],
    ) -> None:
        """Run one streamed request, emitting each of its responses (or its error)."""
        try:
            request = kserve_proto.request_from_proto(message, self.limits.max_tensor_elements)
            send_empty_final = _pop_enable_empty_final(request.parameters)
            decoupled = self.core.get_model(request.model_name, request.model_version).decoupled
            async with contextlib.aclosing(self.core.stream(request)) as responses:
                async for response in responses:
                    if decoupled and is_bare_final_flag(response) and not send_empty_final:
                        continue
                    await emit(_stream_reply(response))
        except InferError as error:
            await emit(_stream_error(message, error.message))
        except Exception as error:  # keep the stream alive for the client's other requests
            await emit(_stream_error(message, report_bug(
                logger, f"serving gRPC ModelStreamInfer request {message.id!r}", error)))

    # --- model repository ----------------------------------------------------

    @unary
    async def RepositoryIndex(
        self, request: service_pb2.RepositoryIndexRequest, context: Context
    ) -> service_pb2.RepositoryIndexResponse:
        _check_no_repository_name(request.repository_name)
        return kserve_proto.repository_index_to_proto(self.core.repository_index(ready_only=request.ready))

    @unary
    async def RepositoryModelLoad(
        self, request: service_pb2.RepositoryModelLoadRequest, context: Context
    ) -> service_pb2.RepositoryModelLoadResponse:
        _check_no_repository_name(request.repository_name)
        parameters = kserve_proto.parameters_from_proto(request.parameters)
        config_json = parameters.pop("config", None)
        if config_json is not None and not isinstance(config_json, str):
            raise InferError.invalid(
                "RepositoryModelLoad parameter 'config' must be a string_param holding JSON"
            )
        file_overrides = [key for key in parameters if key.startswith("file:")]
        if file_overrides:
            raise InferError(
                ErrorCode.UNSUPPORTED,
                "loading a model from files sent in the request "
                f"({', '.join(file_overrides)}) is not supported",
            )
        _check_no_parameters_left("RepositoryModelLoad", parameters, supported="config")
        await self.core.load_model(request.model_name, config_json)
        return service_pb2.RepositoryModelLoadResponse()

    @unary
    async def RepositoryModelUnload(
        self, request: service_pb2.RepositoryModelUnloadRequest, context: Context
    ) -> service_pb2.RepositoryModelUnloadResponse:
        _check_no_repository_name(request.repository_name)
        parameters = kserve_proto.parameters_from_proto(request.parameters)
        # triserve has no ensembles, so a model never has dependents to unload with it.
        parameters.pop("unload_dependents", None)
        _check_no_parameters_left("RepositoryModelUnload", parameters, supported="unload_dependents")
        await self.core.unload_model(request.model_name)
        return service_pb2.RepositoryModelUnloadResponse()

    # --- not offered ---------------------------------------------------------

    SystemSharedMemoryStatus = not_supported("system shared memory")
    SystemSharedMemoryRegister = not_supported("system shared memory")
    SystemSharedMemoryUnregister = not_supported("system shared memory")
    CudaSharedMemoryStatus = not_supported("CUDA shared memory")
    CudaSharedMemoryRegister = not_supported("CUDA shared memory")
    CudaSharedMemoryUnregister = not_supported("CUDA shared memory")
    TraceSetting = not_supported("trace settings")
    LogSettings = not_supported("changing log settings over gRPC")


def _pop_enable_empty_final(parameters: dict[str, Any]) -> bool:
    value = parameters.pop(ENABLE_EMPTY_FINAL, False)
    if not isinstance(value, bool):
        raise InferError.invalid(
            f"invalid value type for '{ENABLE_EMPTY_FINAL}' parameter, expected bool_param"
        )
    return value


def _stream_reply(response: InferResponse) -> service_pb2.ModelStreamInferResponse:
    if response.error is not None:
        reply = service_pb2.ModelStreamInferResponse(
            error_message=response.error.message,
            infer_response=service_pb2.ModelInferResponse(
                model_name=response.model_name, model_version=response.model_version, id=response.id
            ),
        )
    else:
        reply = service_pb2.ModelStreamInferResponse()
        kserve_proto.response_to_proto(response, reply.infer_response)
    reply.infer_response.parameters[FINAL_RESPONSE].bool_param = response.final
    return reply


def _stream_error(message: service_pb2.ModelInferRequest, error: str) -> service_pb2.ModelStreamInferResponse:
    """The reply for a request that failed before or while running: its id, so the client can match it."""
    reply = service_pb2.ModelStreamInferResponse(
        error_message=error,
        infer_response=service_pb2.ModelInferResponse(
            model_name=message.model_name, model_version=message.model_version, id=message.id
        ),
    )
    reply.infer_response.parameters[FINAL_RESPONSE].bool_param = True
    return reply


def _check_no_repository_name(repository_name: str) -> None:
    if repository_name:
        raise InferError(ErrorCode.UNSUPPORTED, "'repository_name' specification is not supported")


def _check_no_parameters_left(rpc: str, parameters: dict[str, Any], supported: str) -> None:
    if parameters:
        raise InferError.invalid(
            f"{rpc} got unknown parameter(s) {', '.join(sorted(parameters))}; supported: {supported}"
        )


class HealthServicer(health_pb2_grpc.HealthServicer):
    """``grpc.health.v1``: SERVING exactly when the core is ready.

    Status is read from the core on every call, so it follows model loading
    and shutdown without anyone having to push updates.
    """

    SERVICES = ("", SERVICE_NAME)
    WATCH_POLL_SECONDS = 0.5

    def __init__(self, core: Core):
        self.core = core

    def _status(self, service: str) -> health_pb2.HealthCheckResponse.ServingStatus:
        if service not in self.SERVICES:
            return health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
        if self.core.ready:
            return health_pb2.HealthCheckResponse.SERVING
        return health_pb2.HealthCheckResponse.NOT_SERVING

    async def Check(
        self, request: health_pb2.HealthCheckRequest, context: Context
    ) -> health_pb2.HealthCheckResponse:
        status = self._status(request.service)
        if status == health_pb2.HealthCheckResponse.SERVICE_UNKNOWN:
            await context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service '{request.service}'")
        return health_pb2.HealthCheckResponse(status=status)

    async def Watch(self, request: health_pb2.HealthCheckRequest, context: Context) -> None:
        last = None
        while True:
            status = self._status(request.service)
            if status != last:
                await context.write(health_pb2.HealthCheckResponse(status=status))
                last = status
            await asyncio.sleep(self.WATCH_POLL_SECONDS)
