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
Its plain form does not even reach the app as ASGI: triserve's HTTP protocol
(:mod:`.protocol`) reads it itself and calls :meth:`TriserveApp.start_infer`, which answers
through a callback (no task), or :meth:`TriserveApp.answer_infer` for a body large enough to be
decoded in a worker thread, and writes the answer to the socket. The three share the checks,
the codec and the error answers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Protocol

from starlette.applications import Starlette
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from triserve.core.errors import InferError
from triserve.core.types import InferResponse
from triserve.frontends.auth import Gate
from triserve.frontends.http import binary, chatglm, generate, jsonio, kserve, legacy, openai, openapi, ui
from triserve.frontends.http.auth import AuthMiddleware
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.errors import error_body, unexpected_error_body
from triserve.frontends.http.limits import BodyLimitMiddleware, Refused
from triserve.frontends.http.refusal import EXCEPTION_HANDLERS, refusal_body
from triserve.options import Access, Limits

if TYPE_CHECKING:
    from triserve.core.api import Core

_JSON_CONTENT_TYPE = (b"content-type", b"application/json")
# status, headers (lower-case names, no content-length), body, close the connection after it
Answer = tuple[int, list[tuple[bytes, bytes]], bytes, bool]
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
        # the two middlewares' checks, called directly: same rules, no wrapping per request
        if self._auth is not None:
            denied = self._auth.denied(scope)
            if denied is not None:
                await self._auth.refuse(scope, send, denied)
                return
        body = await self._body_limits.read_body(scope, receive, send, check_depth=False)
        if body is None:
            return  # refused (answered), or the client went away: there is no one to answer
        answer = await self.answer_infer(scope, receive, body, model, version)
        if answer is not None:
            status, headers, payload, close = answer
            headers.append((b"content-length", str(len(payload)).encode()))
            if close:
                headers.append((b"connection", b"close"))
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": payload})

    def denies(self, scope: Scope) -> bool:
        """Whether the API key check refuses this request (the ASGI way then answers it)."""
        return self._auth is not None and self._auth.denied(scope) is not None

    async def answer_infer(self, scope: Scope, receive: Receive | None, body: bytes,
                           model: str, version: str) -> Answer | None:
        """``POST /v2/models/{model}[/versions/{version}]/infer`` once its API key passed and its
        plain body was read within the size limit: the JSON depth limit, decode -> core ->
        encode, and errors in Triton's JSON shape.

        Returns the answer's status, headers (names lower-case, no ``content-length``), body,
        and whether the connection closes after it (a refused body), for the caller to send:
        the ASGI path above through ``send``, triserve's HTTP protocol (:mod:`.protocol`)
        straight to the transport. None when the client went away (the inference, if it had
        started, is then cancelled). ``scope`` needs ``method``, ``path`` and ``headers``; its
        ``triserve.on_disconnect`` extension, when present, is how a lost connection is
        noticed, else ``receive``.
        """
        header_length = _header_length(scope)
        try:
            await self._body_limits.check_depth(body, header_length)
        except Refused as refused:
            return _refused(scope, refused)
        try:
            payload, headers = await until_disconnected(receive, kserve.infer(
                self._core, model, version, body, header_length, self._limits.max_tensor_elements), scope)
        except ClientDisconnect:
            return None  # the inference was cancelled: there is no one to answer
        except Exception as exc:
            return _failed(scope, exc)
        return _ok(payload, headers)

    def start_infer(self, scope: Scope, body: bytes, model: str, version: str,
                    done: Callable[[Answer], None]) -> Callable[[], None] | None:
        """:meth:`answer_infer` without a task, for a body small enough to check and decode on the
        event loop (up to ``kserve.THREAD_DECODE_BYTES``): ``done`` gets the answer, once, maybe
        before this returns. Returns the function that cancels the inference (the client left),
        or None when ``done`` has run already."""
        header_length = _header_length(scope)
        try:
            self._body_limits.check_depth_now(body, header_length)
        except Refused as refused:
            done(_refused(scope, refused))
            return None
        try:
            request, encoding = kserve.decode_infer_request(
                model, version, body, header_length, self._limits.max_tensor_elements)

            def on_answer(result: InferResponse | Exception) -> None:
                if isinstance(result, Exception):
                    done(_failed(scope, result))
                    return
                try:
                    answer = _ok(*kserve.encode_infer_response(result, encoding))
                except Exception as exc:
                    answer = _failed(scope, exc)
                done(answer)

            return self._core.start_infer(request, on_answer)
        except Exception as exc:
            done(_failed(scope, exc))
            return None


def _header_length(scope: Scope) -> str | None:
    for name, value in scope["headers"]:
        if name == _HEADER_LENGTH:
            return value.decode("latin-1")
    return None


def _ok(payload: bytes, headers: dict[str, str]) -> Answer:
    return 200, [(name.lower().encode("latin-1"), value.encode("latin-1"))
                 for name, value in headers.items()], payload, False


def _refused(scope: Scope, refused: Refused) -> Answer:
    """A body over a limit: the connection closes after the answer."""
    return refused.status, [_JSON_CONTENT_TYPE], refusal_body(scope["path"], refused.message), True


def _failed(scope: Scope, exc: Exception) -> Answer:
    """An ``InferError`` in Triton's JSON shape; anything else is a bug, answered as Starlette's
    handler would (500), and the server keeps serving."""
    if isinstance(exc, InferError):
        return exc.code.http_status, [_JSON_CONTENT_TYPE], jsonio.dumps(error_body(exc.message)), False
    return 500, [_JSON_CONTENT_TYPE], jsonio.dumps(unexpected_error_body("POST", scope["path"], exc)), False


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
