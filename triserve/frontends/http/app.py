"""The HTTP frontend: one Starlette app assembling the routes of every dialect.

Each dialect module owns its routes; this module only puts them together (the
most specific first, ChatGLM's catch-all ``POST /`` last) and installs the shared
error handlers, so every route answers errors as ``{"error": "<message>"}``.

Two ASGI middlewares stand in front of everything: the API-key check (:mod:`.auth`, before
the body is read) and the body limits (:mod:`.limits`: size, streamed decompression, JSON
depth, read deadline). The fast path below calls the same two checks directly.

KServe inference, the one hot path, skips Starlette: :class:`TriserveApp` matches
``POST /v2/models/{model}[/versions/{version}]/infer`` on the raw ASGI scope and
answers it with :func:`kserve.infer` directly, without Request/Response objects,
routing or the exception middleware, which cost more CPU than the inference itself.
Its plain form does not even reach the app as ASGI: triserve's httptools protocol
(:mod:`.protocol`) calls :meth:`TriserveApp.answer_infer` from its own request cycle and
writes the answer to the socket. Both paths answer through that one method.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from triserve.core.errors import InferError
from triserve.frontends.auth import Gate
from triserve.frontends.http import binary, chatglm, generate, jsonio, kserve, legacy, openai, openapi, ui
from triserve.frontends.http.auth import AuthMiddleware
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.errors import error_body, unexpected_error_body
from triserve.frontends.http.refusal import EXCEPTION_HANDLERS
from triserve.frontends.http.limits import BodyLimitMiddleware
from triserve.options import Access, Limits

if TYPE_CHECKING:
    from triserve.core.api import Core

_JSON_CONTENT_TYPE = (b"content-type", b"application/json")
_HEADER_LENGTH = binary.HEADER.lower().encode()


class HttpOptions(Protocol):
    """What the HTTP app is configured with (the CLI's parsed arguments fit)."""

    chatglm_model: str | None  # the model behind ChatGLM's api.py; None: the first chat model
    limits: Limits
    access: Access


class TriserveApp(Starlette):
    """The Starlette app, with KServe's ``POST .../infer`` answered before Starlette sees it."""

    def __init__(self, core: Core, limits: Limits, access: Access, **starlette_options):
        super().__init__(**starlette_options)
        self._core = core
        self._limits = limits
        gate = Gate(access)
        self._body_limits = BodyLimitMiddleware(self._starlette, limits)
        self._auth = AuthMiddleware(self._body_limits, gate) if gate.enabled else None
        self._entry = self._auth or self._body_limits

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] == "POST":
            target = kserve.infer_path_target(scope["path"])
            if target is not None:
                await self._infer(scope, receive, send, *target)
                return
        await self._entry(scope, receive, send)

    async def _starlette(self, scope: Scope, receive: Receive, send: Send) -> None:
        await super().__call__(scope, receive, send)

    async def _infer(self, scope: Scope, receive: Receive, send: Send,
                     model: str, version: str) -> None:
        answer = await self.answer_infer(scope, receive, send, model, version)
        if answer is not None:
            status, headers, body = answer
            headers.append((b"content-length", str(len(body)).encode()))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})

    async def answer_infer(self, scope: Scope, receive: Receive, send: Send,
                           model: str, version: str) -> tuple[int, list[tuple[bytes, bytes]], bytes] | None:
        """``POST /v2/models/{model}[/versions/{version}]/infer``, whole: the API key, the body
        within the limits, decode -> core -> encode, and errors in Triton's JSON shape.

        Returns the answer's status, headers (names lower-case, no ``content-length``) and body,
        for the caller to send: the ASGI path above through ``send``, triserve's HTTP protocol
        (:class:`.protocol.FastInferCycle`) straight to the transport. A refusal (API key, body
        limits) is sent here through ``send``, closing the connection, and None returned; None
        too when the client went away (the inference, if it had started, is then cancelled).
        ``scope`` needs ``method``, ``path`` and ``headers``; its ``triserve.on_disconnect``
        extension, when present, is how a lost connection is noticed.
        """
        # the two middlewares' checks, called directly: same rules, no wrapping per request
        if self._auth is not None:
            denied = self._auth.denied(scope)
            if denied is not None:
                await self._auth.refuse(scope, send, denied)
                return None
        body = await self._body_limits.read_body(scope, receive, send)
        if body is None:
            return None  # refused (answered), or the client went away: there is no one to answer
        header_length = None
        for name, value in scope["headers"]:
            if name == _HEADER_LENGTH:
                header_length = value.decode("latin-1")
                break
        try:
            payload, headers = await until_disconnected(receive, kserve.infer(
                self._core, model, version, body, header_length, self._limits.max_tensor_elements), scope)
        except ClientDisconnect:
            return None  # the inference was cancelled: there is no one to answer
        except InferError as exc:
            return exc.code.http_status, [_JSON_CONTENT_TYPE], jsonio.dumps(error_body(exc.message))
        except Exception as exc:  # a bug: answered like Starlette's handler, the server keeps serving
            return 500, [_JSON_CONTENT_TYPE], jsonio.dumps(unexpected_error_body("POST", scope["path"], exc))
        return 200, [(name.lower().encode("latin-1"), value.encode("latin-1"))
                     for name, value in headers.items()], payload


def create_app(core: Core, options: HttpOptions) -> Starlette:
    routes = [
        *kserve.routes(core, options.limits.max_tensor_elements),
        *generate.routes(core, options.limits.max_tensor_elements),
        *openai.routes(core),
        *openapi.routes(),
        *legacy.routes(core, options.limits.max_tensor_elements),
        *ui.routes(),  # GET / and /ui: the chat page
        *chatglm.routes(core, options.chatglm_model),  # POST /
    ]
    return TriserveApp(core, options.limits, options.access, routes=routes, exception_handlers=EXCEPTION_HANDLERS)
