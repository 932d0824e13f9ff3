"""API-key check for the gRPC port: a server interceptor in front of every RPC.

The key travels in the ``authorization`` metadata as ``Bearer <key>`` (tritonclient:
``headers={"authorization": "Bearer <key>"}``). The rule itself is
:mod:`triserve.frontends.auth`; a refused call ends with UNAUTHENTICATED (no or wrong
key) or PERMISSION_DENIED (model control the server does not allow) before its
handler runs.
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable

import grpc

from triserve.frontends.auth import CallKind, Gate, Refusal, bearer_token

_SERVICE = "/inference.GRPCInferenceService/"
_HEALTH_METHODS = frozenset({_SERVICE + "ServerLive", _SERVICE + "ServerReady",
                             "/grpc.health.v1.Health/Check", "/grpc.health.v1.Health/Watch"})
_CONTROL_METHODS = frozenset({_SERVICE + "RepositoryModelLoad", _SERVICE + "RepositoryModelUnload"})
REFUSAL_STATUS = {Refusal.UNAUTHENTICATED: grpc.StatusCode.UNAUTHENTICATED,
                  Refusal.FORBIDDEN: grpc.StatusCode.PERMISSION_DENIED}


def call_kind(method: str) -> CallKind:
    if method in _HEALTH_METHODS:
        return CallKind.HEALTH
    if method in _CONTROL_METHODS:
        return CallKind.CONTROL
    return CallKind.API


def _refusing(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, details: str) -> grpc.RpcMethodHandler:
    """A handler of the same shape as ``handler`` that only ends the call with ``code``."""

    async def abort(request: Any, context: grpc.aio.ServicerContext) -> None:
        await context.abort(code, details)

    async def abort_stream(request: Any, context: grpc.aio.ServicerContext):
        await context.abort(code, details)
        yield  # never reached: makes this an async generator, as a streaming handler must be

    kwargs = {"request_deserializer": handler.request_deserializer,
              "response_serializer": handler.response_serializer}
    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(abort, **kwargs)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(abort_stream, **kwargs)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(abort, **kwargs)
    return grpc.stream_stream_rpc_method_handler(abort_stream, **kwargs)


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: Gate):
        self.gate = gate

    async def intercept_service(
        self, continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        authorization = None
        for key, value in details.invocation_metadata or ():
            if key == "authorization":
                authorization = value if isinstance(value, str) else value.decode("latin-1")
                break
        denied = self.gate.check(call_kind(details.method), bearer_token(authorization))
        handler = await continuation(details)
        if denied is None or handler is None:
            return handler
        return _refusing(handler, REFUSAL_STATUS[denied.refusal], denied.message)
