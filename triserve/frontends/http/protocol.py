"""uvicorn's httptools protocol with a bounded request head.

uvicorn reads a request's line and headers without a size or time limit, and httptools
grows a header value by concatenation: a client sending megabytes of one header keeps
the event loop copying (quadratic time) and the memory growing, and a client sending a
header byte now and then holds its connection forever. This protocol refuses a head
larger than :data:`MAX_REQUEST_HEAD` with 431, and one that has not arrived within the
request timeout (``--request-body-timeout``, which then covers head and body) with 408,
closing the connection in both cases. The body is bounded by :mod:`.limits`.

Deadlines are kept in one dict scanned by one watcher task, not a timer per request.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from triserve.frontends.http import jsonio
from triserve.frontends.http.errors import error_body

# Request line and headers; nginx allows 4 x 8 KiB, Node 16 KiB: 64 KiB leaves room for long tokens.
MAX_REQUEST_HEAD = 64 * 1024

_REASONS = {408: b"Request Timeout", 431: b"Request Header Fields Too Large"}


class _HeadDeadlines:
    def __init__(self, timeout: float):
        self.timeout = timeout
        self._period = max(0.05, min(1.0, timeout / 4))  # deadlines are kept to within a period
        self._heads: dict[BoundedHttpToolsProtocol, float] = {}
        self._watcher: asyncio.Task | None = None

    def watch(self, protocol: BoundedHttpToolsProtocol) -> None:
        loop = asyncio.get_running_loop()
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch())
        self._heads[protocol] = loop.time() + self.timeout

    def unwatch(self, protocol: BoundedHttpToolsProtocol) -> None:
        self._heads.pop(protocol, None)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._period)
            now = loop.time()
            for protocol, deadline in list(self._heads.items()):
                if deadline <= now:
                    del self._heads[protocol]
                    protocol.refuse(408, f"the request head did not arrive within the limit of "
                                         f"{self.timeout:g} s (--request-body-timeout)")


class BoundedHttpToolsProtocol(HttpToolsProtocol):
    deadlines: _HeadDeadlines  # set by :func:`bounded_protocol`
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

    def on_headers_complete(self) -> None:
        self._in_head = False
        self.deadlines.unwatch(self)
        super().on_headers_complete()

    def connection_lost(self, exc: Exception | None) -> None:
        self.deadlines.unwatch(self)
        super().connection_lost(exc)

    def refuse(self, status: int, message: str) -> None:
        """Answer a request whose head never completed, and close the connection."""
        self._in_head = False
        self.deadlines.unwatch(self)
        if self.transport is None or self.transport.is_closing():
            return
        body = jsonio.dumps(error_body(message))
        self.transport.write(b"HTTP/1.1 %d %s\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                             b"connection: close\r\n\r\n" % (status, _REASONS[status], len(body)) + body)
        self.transport.close()


def bounded_protocol(head_timeout: float) -> type[BoundedHttpToolsProtocol]:
    """The protocol class for one uvicorn server (its deadlines are its own)."""
    return type("BoundedHttpToolsProtocol", (BoundedHttpToolsProtocol,),
                {"deadlines": _HeadDeadlines(head_timeout)})
