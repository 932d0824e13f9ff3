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

Each request's scope also carries the ``triserve.on_disconnect`` extension: a function that
registers a callback run when the connection is lost (and returns the function that
unregisters it), so :func:`.disconnect.until_disconnected` notices a client going away
without a task of its own waiting on ``receive()``.
"""

from __future__ import annotations

from typing import Callable

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from triserve.frontends.http.deadlines import Deadlines
from triserve.frontends.http.disconnect import ON_DISCONNECT
from triserve.frontends.http.refusal import refusal_body

# Request line and headers; nginx allows 4 x 8 KiB, Node 16 KiB: 64 KiB leaves room for long tokens.
MAX_REQUEST_HEAD = 64 * 1024

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}



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

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.deadlines.unwatch(self)
        self.scope["extensions"] = {ON_DISCONNECT: self._on_disconnect}
        super().on_headers_complete()

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


def bounded_protocol(head_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for one uvicorn server (its deadlines are its own)."""
    def expire(protocol: BoundedHttpToolsProtocol) -> None:
        protocol.refuse(408, f"the request head did not arrive within the limit of {head_timeout:g} s "
                             "(--request-body-timeout)")

    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"deadlines": Deadlines(head_timeout, expire)})
