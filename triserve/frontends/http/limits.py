"""Request body limits, in front of every HTTP route (ASGI middleware).

Every request body is read here, once, as it arrives, and handed on whole to the
route (``request.body()`` and the KServe fast path read it as usual):

- its size is counted while it is read: a ``Content-Length`` over ``--max-request-body``
  is refused before one byte is read, a chunked body as soon as it passes the limit;
- a ``Content-Encoding: gzip``/``deflate`` body is inflated step by step as it
  arrives, at most 1 MiB of output per step, and refused as soon as its inflated size
  passes ``--max-decompressed-body`` (a 1 MB gzip of 1 GiB of spaces costs the server
  64 MiB, not 1 GiB); the route then sees the plain body and no ``Content-Encoding``;
- the JSON part is refused when it nests deeper than ``--max-json-depth``, checked on
  the raw text before any parser builds objects;
- the whole body must arrive within ``--request-body-timeout`` (a trickled body is
  refused with 408, so it cannot hold its connection and buffers forever).

A refused body is never read further: the answer says ``Connection: close``, so the
server drops the connection instead of draining the rest. Each refusal names the limit,
its value and the option that sets it.
"""

from __future__ import annotations

import asyncio
import zlib

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from triserve.frontends.http import binary, jsonio
from triserve.frontends.http.deadlines import Deadlines
from triserve.frontends.http.refusal import refuse
from triserve.options import Limits

_CONTENT_LENGTH = b"content-length"
_CONTENT_ENCODING = b"content-encoding"
_HEADER_LENGTH = binary.HEADER.lower().encode()
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}
_INFLATE_STEP = 1 << 20  # bytes of inflated output per step; the loop runs others in between
_THREAD_CHECK_BYTES = 1 << 20  # JSON parts larger than this are depth-checked in a worker thread


def format_size(size: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale and size % scale == 0:
            return f"{size // scale} {unit}"
    return f"{size} bytes"


class Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


class _Inflater:
    """Streaming gzip/deflate decoding with a cap on the output (multi-member gzip included)."""

    def __init__(self, encoding: str, limit: int):
        self.encoding = encoding
        self.limit = limit
        self.size = 0
        self._decoder = zlib.decompressobj(_WBITS[encoding])

    def _too_large(self) -> Refused:
        return Refused(413, f"request body inflates to more than the limit of {format_size(self.limit)} "
                            f"(--max-decompressed-body)")

    async def feed(self, data: bytes, parts: list[bytes]) -> None:
        """Inflate ``data`` into ``parts``, one bounded step at a time."""
        while True:
            if self._decoder.eof:
                if self.encoding == "gzip" and data.strip(b"\0"):
                    self._decoder = zlib.decompressobj(_WBITS["gzip"])  # the next gzip member
                elif data.strip(b"\0"):
                    raise Refused(400, f"request body has data after the end of its {self.encoding} stream")
                else:
                    return
            step = min(_INFLATE_STEP, self.limit - self.size + 1)
            try:
                out = self._decoder.decompress(data, step)
            except zlib.error as exc:
                raise Refused(400, f"request body is not valid {self.encoding} data: {exc}") from None
            self.size += len(out)
            if self.size > self.limit:
                raise Refused(413, f"request body inflates to more than the limit of "
                                   f"{format_size(self.limit)} (--max-decompressed-body)")
            if out:
                parts.append(out)
            data = self._decoder.unused_data if self._decoder.eof else self._decoder.unconsumed_tail
            if not data and not self._decoder.eof and len(out) < step:
                return  # all input consumed and no output held back
            await asyncio.sleep(0)  # let other requests run between steps

    def finish(self) -> None:
        if not self._decoder.eof:
            raise Refused(400, f"request body is not valid {self.encoding} data: the stream is truncated")


class _OverdueReads:
    """Body reads past their deadline: their tasks are cancelled (the cancellation lands in
    the read loop, where the task is suspended) and remembered, so the read answers 408."""

    def __init__(self, timeout: float):
        self._deadlines: Deadlines[asyncio.Task] = Deadlines(timeout, self._expire)
        self._expired: set[asyncio.Task] = set()
        self.watch = self._deadlines.watch
        self.unwatch = self._deadlines.unwatch

    def _expire(self, task: asyncio.Task) -> None:
        self._expired.add(task)
        task.cancel()

    def expired(self, task: asyncio.Task) -> bool:
        """Whether ``task`` was cancelled for being overdue (asked once, in its CancelledError)."""
        if task in self._expired:
            self._expired.discard(task)
            task.uncancel()
            return True
        return False


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, limits: Limits):
        self.app = app
        self.limits = limits
        self._deadlines = _OverdueReads(limits.request_body_timeout)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await self.read_body(scope, receive, send)
        if body is None:
            return  # refused, or the client went away while sending: no one to answer
        message: Message = {"type": "http.request", "body": body, "more_body": False}
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return message

        await self.app(scope, replay, send)

    async def read_body(self, scope: Scope, receive: Receive, send: Send,
                        check_depth: bool = True) -> bytes | None:
        """The whole plain body within the limits; None when it was refused (answered here,
        closing the connection) or the client left. The app's KServe fast path calls this
        directly instead of going through the middleware, and checks the JSON depth itself
        (``check_depth=False``) with :meth:`check_depth`, as triserve's HTTP protocol does."""
        try:
            body = await self._read(scope, receive)
            if body is not None and check_depth:
                await self.check_depth(body, _header_length(scope["headers"]))
            return body
        except Refused as refused:
            await refuse(scope, send, refused.status, refused.message, close=True)
            return None

    async def _read(self, scope: Scope, receive: Receive) -> bytes | None:
        """The whole body, or None when the client left."""
        limits = self.limits
        encoding = None
        headers = scope["headers"]
        for name, value in headers:
            if name == _CONTENT_LENGTH:
                declared = int(value) if value.isdigit() else 0
                if declared > limits.max_request_body:
                    raise Refused(413, f"request body of {declared} bytes is over the limit of "
                                       f"{format_size(limits.max_request_body)} (--max-request-body)")
            elif name == _CONTENT_ENCODING:
                encoding = value.decode("latin-1").strip().lower()
        inflater = None
        if encoding not in (None, "", "identity"):
            if encoding not in _WBITS:
                raise Refused(400, f"unsupported Content-Encoding '{encoding:.40}'; use gzip or deflate")
            inflater = _Inflater(encoding, limits.max_decompressed_body)
            # the route sees the plain body, as if it had been sent so
            scope["headers"] = [(n, v) for n, v in headers if n != _CONTENT_ENCODING]

        parts: list[bytes] = []
        received = 0
        task = asyncio.current_task()
        self._deadlines.watch(task)
        try:
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return None
                chunk = message.get("body", b"")
                received += len(chunk)
                if received > limits.max_request_body:
                    raise Refused(413, f"request body is over the limit of "
                                       f"{format_size(limits.max_request_body)} (--max-request-body)")
                if inflater is None:
                    if chunk:
                        parts.append(chunk)
                else:
                    await inflater.feed(chunk, parts)
                if not message.get("more_body", False):
                    break
        except asyncio.CancelledError:
            if self._deadlines.expired(task):
                raise Refused(408, f"the request body did not arrive within the limit of "
                                   f"{limits.request_body_timeout:g} s (--request-body-timeout)") from None
            raise
        finally:
            self._deadlines.unwatch(task)
        if inflater is not None:
            inflater.finish()
        body = parts[0] if len(parts) == 1 else b"".join(parts)
        parts.clear()
        return body

    async def check_depth(self, body: bytes, header_length: bytes | str | None) -> None:
        """Raises :class:`Refused` when the body's JSON part nests deeper than ``--max-json-depth``
        (``header_length``: the binary extension's ``Inference-Header-Content-Length``); a JSON
        part over 1 MiB is checked in a worker thread."""
        json_part = _json_part(body, header_length)
        if len(json_part) > _THREAD_CHECK_BYTES:
            exceeds = await asyncio.to_thread(jsonio.nesting_exceeds, json_part, self.limits.max_json_depth)
            if exceeds:
                raise self._too_deep()
        else:
            self.check_depth_now(json_part, None)

    def check_depth_now(self, body: bytes | memoryview, header_length: bytes | str | None) -> None:
        """:meth:`check_depth` on the event loop, for a body small enough."""
        json_part = _json_part(body, header_length)
        if json_part and jsonio.nesting_exceeds(json_part, self.limits.max_json_depth):
            raise self._too_deep()

    def _too_deep(self) -> Refused:
        return Refused(400, f"request JSON nests deeper than the limit of {self.limits.max_json_depth} levels "
                            "(--max-json-depth)")


def _json_part(body: bytes | memoryview, header_length: bytes | str | None) -> bytes | memoryview:
    if header_length is not None and header_length.isdigit():
        return memoryview(body)[:int(header_length)]  # the binary tensor part is not JSON
    return body


def _header_length(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    for name, value in headers:
        if name == _HEADER_LENGTH:
            return value
    return None
