"""triserve's HTTP/1.1 protocol: uvicorn's httptools protocol with a bounded request head, and
KServe inference in its plain form answered by triserve itself.

**Bounded head.** uvicorn reads a request's line and headers without a size or time limit, and
httptools grows a header value by concatenation: a client sending megabytes of one header keeps
the event loop copying (quadratic time) and the memory growing, and a client sending a header
byte now and then holds its connection forever. This protocol refuses a head larger than
:data:`MAX_REQUEST_HEAD` with 431, and one that has not arrived within the request timeout
(``--request-body-timeout``, which then covers head and body) with 408, closing the connection
in both cases, in the path's dialect (:mod:`.refusal`) when the request line arrived. The body
is bounded by :mod:`.limits`. Deadlines are :class:`.deadlines.Deadlines`: one dict and one
watcher task, no timer per request.

**The plain path.** KServe's ``POST /v2/models/{model}[/versions/{version}]/infer``, the one hot
route, is answered without httptools, uvicorn's request cycle or ASGI messages when it comes in
its plain form: HTTP/1.1, a visible-ASCII path without ``%``, well-formed header lines, a
``Content-Length`` within ``--max-request-body``, no ``Transfer-Encoding``, ``Content-Encoding``,
``Expect`` or ``Upgrade``, and an API key the server accepts. While the connection is between two
requests, the bytes it reads go to :meth:`BoundedHttpToolsProtocol._next_plain`: one regular
expression matches the whole head, the body is sliced from the same buffer, and
:meth:`TriserveApp.start_infer <.app.TriserveApp.start_infer>` (JSON depth, decode, then
``Core.start_infer``) answers it through a callback: no task, no future, the whole request in
two ``data_received`` calls (the client's, the model's). A body over 1 MiB, checked and decoded
in worker threads, gets a task and :meth:`TriserveApp.answer_infer
<.app.TriserveApp.answer_infer>`, the function the ASGI path calls too. Status line, headers and
body leave in one write. Anything else, from the first byte that cannot be the plain form, is fed to
httptools as if it had just arrived, and uvicorn answers it as usual (the ASGI app then refuses
what must be refused, with the same messages); the plain path takes the connection back once
uvicorn's answer is complete and httptools is between two requests.

What uvicorn's cycle gave is kept on the plain path: one request answered at a time, in order
(pipelined bytes wait, reading pauses past :data:`_READ_AHEAD`), keep-alive and its idle timeout,
``Connection: close``, write flow control, the server's task set (graceful shutdown waits for the
answer, then closes), the lost-connection cancel, and the access log.

Each request's scope also carries the ``triserve.on_disconnect`` extension: a function that
registers a callback run when the connection is lost (and returns the function that
unregisters it), so :func:`.disconnect.until_disconnected` notices a client going away
without a task of its own waiting on ``receive()``.
"""

from __future__ import annotations

import asyncio
import re
from typing import Any, Callable

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from triserve.frontends.http.app import Answer, TriserveApp
from triserve.frontends.http.deadlines import Deadlines
from triserve.frontends.http.disconnect import ON_DISCONNECT
from triserve.frontends.http.kserve import THREAD_DECODE_BYTES, infer_path_target
from triserve.frontends.http.refusal import refusal_body
from triserve.options import Limits

# Request line and headers; nginx allows 4 x 8 KiB, Node 16 KiB: 64 KiB leaves room for long tokens.
MAX_REQUEST_HEAD = 64 * 1024

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
_TOKEN = rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"  # a header name (RFC 9110 token)
# The plain form of a KServe infer request's head: the request line, then header lines whose
# values are tabs and printable ASCII, then the empty line.
_PLAIN_HEAD = re.compile(rb"POST (/v2/models/[!-~]*) HTTP/1\.1\r\n((?:" + _TOKEN + rb":[\t -~]*\r\n)*)\r\n")
_PLAIN_START = b"POST /v2/models/"
_PLAIN_PATH = "/v2/models/"  # what a refusal of a plain request knows of its path: KServe's dialect
# request headers that send an infer request the httptools way (uvicorn and the ASGI app handle them)
_ASGI_HEADERS = frozenset({b"transfer-encoding", b"content-encoding", b"expect", b"upgrade"})
_CONTENT_LENGTH = b"content-length"
_CONNECTION = b"connection"
_KEEP_ALIVE = b"keep-alive"
# bytes of requests read ahead while a plain request is answered, before reading pauses
_READ_AHEAD = 256 * 1024
# a response body larger than this is written apart from its head rather than copied after it
_JOIN_BYTES = 64 * 1024


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    # set by :func:`bounded_protocol`, one of each per server
    deadlines: Deadlines[BoundedHttpToolsProtocol]  # the request head's, and a plain body's
    idle: Deadlines[BoundedHttpToolsProtocol]  # keep-alive between two plain requests
    max_request_body: int

    _in_head = False  # httptools is reading a request head
    _head_bytes = 0
    _lost_callbacks: list[Callable[[], None]] | None = None
    #: the app that answers the plain path; None: every request goes the httptools way
    _infer_app: TriserveApp | None = None
    _plain: bytearray | None = None  # bytes read on the plain path, not (yet) fed to httptools
    _head: tuple | None = None  # the parsed head of a plain request whose body is still arriving
    _head_watched = False  # the deadline of a plain head still arriving runs
    _answering = False  # a plain request is being answered
    _request: tuple | None = None  # (scope, keep-alive) of the plain request answered without a task
    _cancel: Callable[[], None] | None = None  # cancels that request's inference
    _starting = False  # within start_infer (an answer may come before it returns)
    _close_after = False  # shutdown asked while a plain request was answered
    _at_boundary = True  # httptools is between two requests: its next byte would begin one

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        # uvicorn's root_path and limit_concurrency act in its own on_headers_complete: keep it then
        if isinstance(self.app, TriserveApp) and not self.root_path and self.limit_concurrency is None:
            self._infer_app = self.app
            self._plain = bytearray()

    def data_received(self, data: bytes) -> None:
        plain = self._plain
        if plain is not None and (self._answering or plain or (
                self._at_boundary and (self.cycle is None or self.cycle.response_complete) and not self.pipeline)):
            self._unset_keepalive_if_required()  # uvicorn's timer, after an answer of its own
            self.idle.unwatch(self)
            plain += data
            if not self._answering:
                self._next_plain()
            elif len(plain) > _READ_AHEAD:
                self.flow.pause_reading()
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Bytes for httptools (uvicorn's way)."""
        # Bytes of a head that began in an earlier read count toward the limit (the read that
        # begins it is bounded by the transport's read size).
        counting = self._in_head
        super().data_received(data)
        if counting and self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > MAX_REQUEST_HEAD:
                self.refuse(431, f"the request line and headers are over the limit of "
                                 f"{MAX_REQUEST_HEAD // 1024} KiB")

    # -- the plain path --------------------------------------------------------------

    def _next_plain(self) -> None:
        """Start answering the plain request at the start of the buffered bytes, wait for the
        rest of it, or hand the bytes to httptools."""
        if self._answering or self.transport.is_closing():
            return  # one at a time: called again once the answer is written
        plain = self._plain
        head = self._head
        if head is None:
            if not plain:
                return
            head = self._parse_head(plain)
            if head is None:
                return  # waiting for the rest of the head, handed to httptools, or refused
        end = head[0]
        if len(plain) < end:
            if self._head is None:
                self._head = head
                self.deadlines.watch(self)  # the body's own time, from the end of the head
            return
        self._head = None
        self.deadlines.unwatch(self)
        _, body_start, scope, model, version, keep_alive = head
        body = bytes(plain[body_start:end])
        del plain[:end]
        self._answering = True
        if len(body) > THREAD_DECODE_BYTES:  # checked and decoded in worker threads: a task waits for them
            task = self.loop.create_task(self._answer_in_task(scope, body, model, version, keep_alive))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        # no task: the core calls back with the answer (in this call already, for some errors)
        self._request = scope, keep_alive
        self._starting = True
        cancel = self._infer_app.start_infer(scope, body, model, version, self._answered)
        self._starting = False
        if self._answering:
            self._cancel = cancel

    def _parse_head(self, plain: bytearray) -> tuple | None:
        """The plain request's head: (end of its body, start of its body, scope, model, version,
        keep-alive); None when more bytes are needed, or the bytes went to httptools."""
        match = _PLAIN_HEAD.match(plain)
        self._head_watched = match is None and self._head_watched
        if match is None:
            start = plain[:len(_PLAIN_START)]
            if plain.find(b"\r\n\r\n") < 0 and _PLAIN_START.startswith(start):
                if len(plain) > MAX_REQUEST_HEAD:
                    self.refuse(431, f"the request line and headers are over the limit of "
                                     f"{MAX_REQUEST_HEAD // 1024} KiB", _PLAIN_PATH)
                elif not self._head_watched:
                    self._head_watched = True
                    self.deadlines.watch(self)  # from the head's first bytes, not reset by later ones
                return None
            return self._to_httptools()
        target = match.group(1)
        raw_path, _, query = target.partition(b"?")
        if b"%" in raw_path or b"#" in target:
            return self._to_httptools()  # uvicorn's URL parsing and unquoting decide those
        path = raw_path.decode("ascii")
        model_version = infer_path_target(path)
        if model_version is None:
            return self._to_httptools()
        headers = []
        length = -1
        keep_alive = True
        for line in match.group(2).split(b"\r\n")[:-1]:
            name, _, value = line.partition(b":")
            name = name.lower()
            value = value.strip(b" \t")
            if name == _CONTENT_LENGTH:
                if length >= 0 or not value.isdigit():
                    return self._to_httptools()
                length = int(value)
            elif name == _CONNECTION and value != _KEEP_ALIVE:
                tokens = [token.strip().lower() for token in value.split(b",")]
                if b"upgrade" in tokens:
                    return self._to_httptools()
                if b"close" in tokens:
                    keep_alive = False
            elif name in _ASGI_HEADERS:
                return self._to_httptools()
            headers.append((name, value))
        if not 0 <= length <= self.max_request_body:
            return self._to_httptools()  # no length, or too long: the ASGI way words the refusal
        scope: dict[str, Any] = {
            "type": "http", "http_version": "1.1", "method": "POST", "scheme": self.scheme,
            "path": path, "raw_path": raw_path, "query_string": query, "root_path": "",
            "headers": headers, "server": self.server, "client": self.client,
            "extensions": {ON_DISCONNECT: self._on_disconnect},
        }
        if self._infer_app.denies(scope):
            return self._to_httptools()  # the ASGI way answers the refusal, before reading the body
        body_start = match.end()
        return body_start + length, body_start, scope, *model_version, keep_alive

    def _to_httptools(self) -> None:
        """The buffered bytes are not a plain request: httptools reads them, as if just arrived."""
        data = bytes(self._plain)
        self._plain.clear()
        self._head = None
        self._head_watched = False
        self.deadlines.unwatch(self)
        self._feed(data)
        return None

    def _answered(self, answer: Answer) -> None:
        """The core's answer to the plain request answered without a task."""
        self._cancel = None
        scope, keep_alive = self._request
        self._request = None
        if self.flow.write_paused and not self.transport.is_closing():
            # the previous answer on this connection still fills the socket: wait in a task
            task = self.loop.create_task(self._finish_later(scope, answer, keep_alive))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
            return
        self._finish(scope, answer, keep_alive)

    async def _finish_later(self, scope: dict[str, Any], answer: Answer, keep_alive: bool) -> None:
        await self.flow.drain()
        self._finish(scope, answer, keep_alive)

    async def _answer_in_task(self, scope: dict[str, Any], body: bytes, model: str, version: str,
                              keep_alive: bool) -> None:
        try:
            answer = await self._infer_app.answer_infer(scope, None, body, model, version)
        except Exception as exc:  # a bug: logged and answered 500, as uvicorn does for an app
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            answer = 500, [(b"content-type", b"text/plain; charset=utf-8")], b"Internal Server Error", True
        if answer is not None and self.flow.write_paused and not self.transport.is_closing():
            await self.flow.drain()  # the previous answer on this connection still fills the socket
        self._finish(scope, answer, keep_alive)

    def _finish(self, scope: dict[str, Any], answer: Answer | None, keep_alive: bool) -> None:
        """Write the answer (None: the client left) and go on with the connection's next request."""
        self._answering = False
        self.server_state.total_requests += 1
        transport = self.transport
        if transport.is_closing():
            return
        if answer is not None:
            status, headers, payload, close = answer
            keep_alive = keep_alive and not close and not self._close_after
            self._write(scope, status, headers, payload, keep_alive)
        if not keep_alive or self._close_after:
            transport.close()
            return
        self.flow.resume_reading()
        if not self._plain:
            self.idle.watch(self)
        elif self._starting:  # answered within start_infer: the next request starts from the loop
            self.loop.call_soon(self._next_plain)
        else:
            self._next_plain()

    def _write(self, scope: dict[str, Any], status: int, headers: list[tuple[bytes, bytes]], body: bytes,
               keep_alive: bool) -> None:
        """What uvicorn's ``send`` writes for a start and a complete body message."""
        if self.access_log:
            self.access_logger.info('%s - "%s %s HTTP/%s" %d', get_client_addr(scope), scope["method"],
                                    get_path_with_query_string(scope), scope["http_version"], status)
        content = [STATUS_LINE[status]]
        for name, value in (*self.server_state.default_headers, *headers):
            content += (name, b": ", value, b"\r\n")
        content.append(b"content-length: %d\r\n" % len(body))
        if not keep_alive:
            content.append(b"connection: close\r\n")
        content.append(b"\r\n")
        if len(body) > _JOIN_BYTES:
            self.transport.write(b"".join(content))
            self.transport.write(body)
        else:
            content.append(body)
            self.transport.write(b"".join(content))

    def close_if_idle(self) -> None:
        """The keep-alive timeout passed with the connection between two plain requests."""
        if not self._answering and not self._plain and (self.cycle is None or self.cycle.response_complete):
            self.transport.close()

    def shutdown(self) -> None:
        if self._answering:
            self._close_after = True  # closed once its answer is written
        else:
            super().shutdown()

    # -- httptools' callbacks (uvicorn's way) ---------------------------------------

    def on_message_begin(self) -> None:
        self._at_boundary = False
        self._in_head = True
        self._head_bytes = 0
        self.deadlines.watch(self)
        super().on_message_begin()

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.deadlines.unwatch(self)
        self.scope["extensions"] = {ON_DISCONNECT: self._on_disconnect}
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._at_boundary = True
        super().on_message_complete()

    # -- the connection ---------------------------------------------------------------

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
        self.idle.unwatch(self)
        super().connection_lost(exc)
        cancel, self._cancel = self._cancel, None
        self._request = None
        if cancel is not None:
            cancel()  # the plain request answered without a task: no one is left to answer
        callbacks, self._lost_callbacks = self._lost_callbacks, None
        for callback in callbacks or ():
            callback()

    def refuse(self, status: int, message: str, path: str | None = None) -> None:
        """Answer a request whose head or plain body never completed, and close the connection."""
        self._in_head = False
        self.deadlines.unwatch(self)
        if self.transport is None or self.transport.is_closing():
            return
        if path is None:
            # in the dialect of the path when the request line got that far (OpenAI's under /v1/)
            path = bytes(getattr(self, "url", b"")).partition(b"?")[0].decode("latin-1")
        body = refusal_body(path, message)
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)) + body)
        self.transport.close()


def bounded_protocol(limits: Limits, keep_alive_timeout: float = 5.0) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for one uvicorn server (its deadlines are its own); ``keep_alive_timeout``
    is uvicorn's ``timeout_keep_alive``, which the plain path keeps too."""
    timeout = limits.request_body_timeout

    def expire(protocol: BoundedHttpToolsProtocol) -> None:
        what = "body" if protocol._head is not None else "head"
        protocol.refuse(408, f"the request {what} did not arrive within the limit of {timeout:g} s "
                             "(--request-body-timeout)", _PLAIN_PATH if protocol._plain else None)

    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,), {
        "deadlines": Deadlines(timeout, expire),
        "idle": Deadlines(keep_alive_timeout, BoundedHttpToolsProtocol.close_if_idle),
        "max_request_body": limits.max_request_body,
    })
