"""uvicorn's httptools protocol with a bounded request head.

uvicorn reads a request's line and headers without a size or time limit, and httptools
grows a header value by concatenation: a client sending megabytes of one header keeps
the event loop copying (quadratic time) and the memory growing, and a client sending a
header byte now and then holds its connection forever. This protocol refuses a head
larger than :data:`MAX_REQUEST_HEAD` with 431, and one that has not arrived within the
request timeout (``--request-body-timeout``, which then covers head and body) with 408,
closing the connection in both cases, in the path's dialect (:mod:`.refusal`) when the
request line arrived. The body is bounded by :mod:`.limits`.

Deadlines are :class:`.deadlines.Deadlines`: one dict and one watcher task, no timer per request.

KServe's ``POST /v2/models/{model}[/versions/{version}]/infer`` in its plain form (HTTP/1.1,
no ``Expect``, no upgrade, no ``Transfer-Encoding`` or ``Content-Encoding``, a plain ASCII path)
skips the ASGI app: :class:`FastInferCycle` takes the place of uvicorn's request cycle and
calls :meth:`TriserveApp.answer_infer <.app.TriserveApp.answer_infer>` (the same function the
app's ASGI path calls: API key, body limits, decode -> core -> encode) and writes its answer to
the transport itself, without ASGI messages. It is still a uvicorn cycle: the protocol's
pipelining (one request answered at a time, in order, reading paused meanwhile), keep-alive,
flow control, the server's task set (graceful shutdown waits for it), disconnect and access
log work as for any other request. Every other request takes uvicorn's ASGI path unchanged.

Each request's scope also carries the ``triserve.on_disconnect`` extension: a function that
registers a callback run when the connection is lost (and returns the function that
unregisters it), so :func:`.disconnect.until_disconnected` notices a client going away
without a task of its own waiting on ``receive()``.
"""

from __future__ import annotations

import asyncio
from typing import Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from starlette.types import Receive, Scope, Send
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from triserve.frontends.http.app import TriserveApp
from triserve.frontends.http.deadlines import Deadlines
from triserve.frontends.http.disconnect import ON_DISCONNECT
from triserve.frontends.http.kserve import infer_path_target
from triserve.frontends.http.refusal import refusal_body

# Request line and headers; nginx allows 4 x 8 KiB, Node 16 KiB: 64 KiB leaves room for long tokens.
MAX_REQUEST_HEAD = 64 * 1024

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
# request headers that send an infer request the ASGI way (the body limits decode them there too)
_ASGI_HEADERS = frozenset({b"transfer-encoding", b"content-encoding"})
# a response body larger than this is written apart from its head rather than copied after it
_JOIN_BYTES = 64 * 1024


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    deadlines: Deadlines[BoundedHttpToolsProtocol]  # set by :func:`bounded_protocol`
    _in_head = False
    _head_bytes = 0

    def data_received(self, data: bytes) -> None:
        # Bytes of a head that began in an earlier read count toward the limit (the read that
        # begins it is bounded by the transport's read size).
        counting = self._in_head
        super().data_received(data)
        if counting and self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_REQUEST_HEAD:
                self.refuse(431, f"the request line and headers are over the limit of "
                                 f"{MAX_REQUEST_HEAD // 1024} KiB")

    def on_message_begin(self) -> None:
        self._in_head = True
        self._head_bytes = 0
        self.deadlines.watch(self)
        super().on_message_begin()

    _lost_callbacks: list[Callable[[], None]] | None = None

    #: the app whose ``answer_infer`` the fast path calls; None: every request goes the ASGI way
    _infer_app: TriserveApp | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn's root_path and limit_concurrency act in its own on_headers_complete: keep it then
        if isinstance(self.app, TriserveApp) and not self.root_path and self.limit_concurrency is None:
            self._infer_app = self.app

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.deadlines.unwatch(self)
        self.scope["extensions"] = {ON_DISCONNECT: self._on_disconnect}
        if self._infer_app is None or not self._start_fast_infer(self._infer_app):
            super().on_headers_complete()

    def _start_fast_infer(self, app: TriserveApp) -> bool:
        """Start (or queue behind the request being answered) a :class:`FastInferCycle` when
        this request is a plain KServe infer; False leaves it to uvicorn's ASGI cycle."""
        parser = self.parser
        if (self.expect_100_continue or parser.get_method() != b"POST" or parser.get_http_version() != "1.1"
                or parser.should_upgrade()):
            return False
        raw_path, _, query = self.url.partition(b"?")
        if b"%" in raw_path or b"#" in self.url or not raw_path.isascii():
            return False  # uvicorn's URL parsing and unquoting decide those
        path = raw_path.decode("ascii")
        target = infer_path_target(path)
        if target is None:
            return False
        for name, _ in self.headers:
            if name in _ASGI_HEADERS:
                return False
        scope = self.scope
        scope["method"] = "POST"
        scope["path"] = path
        scope["raw_path"] = raw_path
        scope["query_string"] = query
        # as uvicorn's on_headers_complete: answer now, or queue behind the request in progress
        existing = self.cycle
        self.cycle = cycle = FastInferCycle(self, *target)
        if existing is None or existing.response_complete:
            self._start_asgi_task(cycle, app)
        else:
            self.flow.pause_reading()
            self.pipeline.appendleft((cycle, app))
        return True

    def _on_disconnect(self, callback: Callable[[], None]) -> Callable[[], None] | None:
        """Run ``callback`` when the connection is lost; None if it already was (then it never runs)."""
        if self.transport is None or self.transport.is_closing():
            return None
        # the end of the connection is only seen while reading (a large body may have paused
        # it), as ASGI's receive() would resume it
        self.flow.resume_reading()
        if self._lost_callbacks is None:
            self._lost_callbacks = []
        callbacks = self._lost_callbacks
        callbacks.append(callback)
        return lambda: callback in callbacks and callbacks.remove(callback)

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadlines.unwatch(self)
        super().connection_lost(exc)
        callbacks, self._lost_callbacks = self._lost_callbacks, None
        for callback in callbacks or ():
            callback()

    def refuse(self, status: int, message: str) -> None:
        """Answer a request whose head never completed, and close the connection."""
        self._in_head = False
        self.deadlines.unwatch(self)
        if self.transport is None or self.transport.is_closing():
            return
        # in the dialect of the path when the request line got that far (OpenAI's under /v1/)
        path = bytes(getattr(self, "url", b"")).partition(b"?")[0].decode("latin-1")
        body = refusal_body(path, message)
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)) + body)
        self.transport.close()


class FastInferCycle(RequestResponseCycle):
    """uvicorn's request cycle for one plain ``POST .../infer``, answered without ASGI messages.

    The protocol treats it as any cycle (the body arrives through ``on_body``, the pipeline
    starts it through ``run_asgi``, ``connection_lost`` marks it disconnected, ``shutdown``
    clears its keep-alive); only the answer differs: :meth:`TriserveApp.answer_infer
    <.app.TriserveApp.answer_infer>` reads the body through the cycle's ``receive`` and sends
    refusals through its ``send`` as uvicorn does, and its answer is written to the
    transport in one piece by :meth:`_write`.
    """

    def __init__(self, protocol: BoundedHttpToolsProtocol, model: str, version: str):
        super().__init__(
            scope=protocol.scope, transport=protocol.transport, flow=protocol.flow, logger=protocol.logger,
            access_logger=protocol.access_logger, access_log=protocol.access_log,
            default_headers=protocol.server_state.default_headers, message_event=asyncio.Event(),
            expect_100_continue=False, keep_alive=protocol.parser.should_keep_alive(),
            on_response=protocol.on_response_complete)
        self._model = model
        self._version = version

    async def run_asgi(self, app: TriserveApp) -> None:  # type: ignore[override]
        """Answer the request (``app`` is the :class:`TriserveApp` the protocol queued it with);
        uvicorn's ``run_asgi`` around the answer logs a failure and answers 500 as for any app."""
        self._app = app
        await super().run_asgi(self._answer)

    async def _answer(self, scope: Scope, receive: Receive, send: Send) -> None:
        answer = await self._app.answer_infer(scope, receive, send, self._model, self._version)
        if answer is None:
            return  # refused (sent through send) or the client left
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()  # the previous answer on this connection still fills the socket
        if self.disconnected:
            return
        self._write(*answer)

    def _write(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        """What uvicorn's ``send`` writes for a start and a complete body message, and the
        same bookkeeping after it (access log, keep-alive, the next pipelined request)."""
        scope = self.scope
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), scope["method"],
                                    get_path_with_query_string(scope), scope["http_version"], status)
        content = [STATUS_LINE[status]]
        for name, value in (*self.default_headers, *headers):
            content += (name, b": ", value, b"\r\n")
        content.append(b"content-length: %d\r\n" % len(body))
        if not self.keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        self.response_started = True
        if len(body) > _JOIN_BYTES:
            self.transport.write(b"".join(content))
            self.transport.write(body)
        else:
            content.append(body)
            self.transport.write(b"".join(content))
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()


def bounded_protocol(head_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for one uvicorn server (its deadlines are its own)."""
    def expire(protocol: BoundedHttpToolsProtocol) -> None:
        protocol.refuse(408, f"the request head did not arrive within the limit of {head_timeout:g} s "
                             "(--request-body-timeout)")

    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"deadlines": Deadlines(head_timeout, expire)})
