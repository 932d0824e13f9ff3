"""triserve's own gRPC server: HTTP/2 framing on the event loop, serving grpcio servicers.

Why not grpc.aio: its completion-queue poller runs in a thread of its own and hands every
event of every call to the event loop through a socket, with GIL hand-offs on both sides;
that alone costs 350-450 µs of CPU a call on this kind of machine (bench/PROFILE.md), more
than the real Triton spends on a whole request. Here the transport is an
:class:`asyncio.Protocol`: frames are parsed in ``data_received``, a unary call's handler
runs in a task of the same loop, and its answer (HEADERS, DATA and the trailers) leaves
in one ``transport.write``.

What it serves is unchanged: the servicers are the grpcio ones (``service.py``'s KServe
servicer, ``grpc.health.v1``), registered through grpcio's generated
``add_*Servicer_to_server`` functions (:class:`_Registry` collects their method
handlers), and called with a :class:`CallContext` that offers the part of
``grpc.aio.ServicerContext`` they use.

HTTP/2 (RFC 9113) as gRPC needs it: SETTINGS, PING, WINDOW_UPDATE both ways (the
client's windows and frame size are respected when sending; what we receive is given
back as it is read), HEADERS with CONTINUATION, RST_STREAM (the call's task is
cancelled, which cancels its inference in the core), GOAWAY on shutdown (calls in
flight finish; new streams are refused). Header blocks are decoded by ``hpack``; a
block made only of indexed fields (what a gRPC client sends from its second call on)
is decoded once and remembered until the dynamic table changes. gRPC
(https://github.com/grpc/grpc/blob/master/doc/PROTOCOL-HTTP2.md): length-prefixed
messages, ``grpc-encoding`` gzip/deflate requests, ``grpc-timeout`` deadlines,
status and message in the trailers, the message-size limits worded as grpc words them.
"""

from __future__ import annotations

import asyncio
import collections
import inspect
import logging
import socket
import ssl
import struct
import time
import zlib
from typing import Any, AsyncIterator, Callable

import grpc
import hpack
from hpack.exceptions import HPACKError

from triserve.frontends.auth import Gate, bearer_token
from triserve.frontends.faults import report_bug
from triserve.frontends.grpc.auth import REFUSAL_STATUS, call_kind

logger = logging.getLogger("triserve.grpc")

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_FRAME = struct.Struct(">IBI")  # (length << 8 | type), flags, stream id: the 9-byte frame header
_SETTING = struct.Struct(">HI")
_U32 = struct.Struct(">I")
_MESSAGE = struct.Struct(">BI")  # a gRPC message's prefix: compressed flag, length

DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
# error codes
NO_ERROR, PROTOCOL_ERROR, FLOW_CONTROL_ERROR = 0x0, 0x1, 0x3
FRAME_SIZE_ERROR, REFUSED_STREAM, COMPRESSION_ERROR = 0x6, 0x7, 0x9
# settings
HEADER_TABLE_SIZE, ENABLE_PUSH, MAX_CONCURRENT_STREAMS, INITIAL_WINDOW_SIZE, MAX_FRAME_SIZE = 1, 2, 3, 4, 5
MAX_HEADER_LIST_SIZE = 6

DEFAULT_WINDOW = 65535
MAX_WINDOW = 2**31 - 1
RECEIVE_WINDOW = 16 * 1024 * 1024  # what each stream may send before we read it
OUR_MAX_FRAME = 1024 * 1024  # the largest frame we accept
STREAMS_LIMIT = 1024  # concurrent streams a client may open on one connection
HEADER_LIST_LIMIT = 64 * 1024  # a call's metadata (RFC 7541 sizes): a larger list refuses that call
HEADER_BLOCK_LIMIT = 1024 * 1024  # a header block still decoded (to keep HPACK's table); larger ends the connection
_CACHED_BLOCKS = 64


def _frame(kind: int, flags: int, stream_id: int, payload: bytes = b"") -> bytes:
    return _FRAME.pack(len(payload) << 8 | kind, flags, stream_id) + payload


def _hpack_int(value: int, prefix_bits: int, first: int) -> bytes:
    """An HPACK integer (RFC 7541 5.1) whose first byte carries ``first``'s high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes([first | value])
    out = [first | limit]
    value -= limit
    while value >= 128:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(name: bytes, value: bytes) -> bytes:
    """A header as a literal without indexing, new name, no Huffman: our blocks never touch
    the client's dynamic table, so they can be built once and sent on any connection."""
    return b"\x00" + _hpack_int(len(name), 7, 0) + name + _hpack_int(len(value), 7, 0) + value


# ":status: 200" (static index 8) and "content-type: application/grpc" (static name 31)
_RESPONSE_HEADERS = b"\x88" + _hpack_int(31, 4, 0) + _hpack_int(16, 7, 0) + b"application/grpc"
_OK_TRAILERS = _literal(b"grpc-status", b"0")


def _status_block(code: int, message: str) -> bytes:
    block = _literal(b"grpc-status", str(code).encode())
    if message:
        # grpc's percent-encoding: printable ASCII but '%' as it is, the rest as %XX of UTF-8
        encoded = "".join(chr(b) if 0x20 <= b <= 0x7E and b != 0x25 else f"%{b:02X}"
                          for b in message.encode("utf-8"))
        block += _literal(b"grpc-message", encoded.encode("ascii"))
    return block


def _indexed_only(block: bytes) -> bool:
    """Whether a header block holds only indexed fields (which leave the dynamic table as it is)."""
    i, n = 0, len(block)
    while i < n:
        byte = block[i]
        if not byte & 0x80:
            return False
        i += 1
        if byte & 0x7F == 0x7F:  # a multi-byte index
            while i < n and block[i] & 0x80:
                i += 1
            i += 1
    return True


_TIMEOUT_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}


def _timeout_seconds(value: str) -> float | None:
    """``grpc-timeout`` ("100m", "5S", ...) in seconds; None when malformed."""
    if len(value) < 2 or value[-1] not in _TIMEOUT_UNITS or not value[:-1].isdigit() or len(value) > 9:
        return None
    return int(value[:-1]) * _TIMEOUT_UNITS[value[-1]]


class _Details(collections.namedtuple("_Details", ("method", "invocation_metadata"))):
    """A ``grpc.HandlerCallDetails``: what a generic handler is asked about."""


class _Registry:
    """Stands in for a ``grpc.Server`` while grpcio's ``add_*Servicer_to_server`` registers
    a servicer, and finds a method's ``RpcMethodHandler`` by its path as grpc does: the
    registered ones first, then each generic handler (older generated code, tritonclient's
    included, registers only those). Answers are remembered, unknown paths in a bounded set."""

    def __init__(self) -> None:
        self.handlers: dict[str, grpc.RpcMethodHandler] = {}
        self._generic: list[grpc.GenericRpcHandler] = []
        self._unknown: set[str] = set()

    def add_generic_rpc_handlers(self, handlers: Any) -> None:
        self._generic.extend(handlers)

    def add_registered_method_handlers(self, service: str, handlers: dict[str, grpc.RpcMethodHandler]) -> None:
        for method, handler in handlers.items():
            self.handlers[f"/{service}/{method}"] = handler

    def find(self, path: str) -> grpc.RpcMethodHandler | None:
        handler = self.handlers.get(path)
        if handler is not None or path in self._unknown:
            return handler
        details = _Details(path, ())
        for generic in self._generic:
            handler = generic.service(details)
            if handler is not None:
                self.handlers[path] = handler
                return handler
        if len(self._unknown) < 1024:
            self._unknown.add(path)
        return None


class Abort(Exception):
    """Raised by :meth:`CallContext.abort`: ends the call with this status (as grpc.aio's AbortError)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        super().__init__(details)
        self.code = code
        self.details = details


class CallContext:
    """What a servicer sees of its call: grpc.aio's ``ServicerContext`` as far as triserve uses it."""

    __slots__ = ("_call",)

    def __init__(self, call: "_Call"):
        self._call = call

    async def abort(self, code: grpc.StatusCode, details: str = "", trailing_metadata: Any = None) -> None:
        raise Abort(code, details)

    async def write(self, message: Any) -> None:
        await self._call.write(message)

    def invocation_metadata(self) -> tuple[tuple[str, str | bytes], ...]:
        return self._call.metadata

    def peer(self) -> str:
        return self._call.connection.peer

    def time_remaining(self) -> float | None:
        deadline = self._call.deadline
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    def cancelled(self) -> bool:
        return self._call.reset

    def done(self) -> bool:
        return self._call.closed


class _Call:
    """One stream: a gRPC call, from its headers to its trailers."""

    __slots__ = ("connection", "stream_id", "path", "handler", "metadata", "deadline", "encoding", "task",
                 "inbox", "buffer", "send_window", "pending", "headers_sent", "closed", "reset",
                 "flushed", "request_ended", "timer", "unread", "owed")

    def __init__(self, connection: "_Connection", stream_id: int, path: str, handler: grpc.RpcMethodHandler,
                 metadata: tuple, deadline: float | None, encoding: str | None):
        self.connection = connection
        self.stream_id = stream_id
        self.path = path
        self.handler = handler
        self.metadata = metadata
        self.deadline = deadline
        self.encoding = encoding
        self.task: asyncio.Task | None = None
        self.inbox: asyncio.Queue | None = None  # streamed requests: decoded messages, None at the end
        self.buffer = bytearray()  # request bytes not yet a whole message
        self.send_window = connection.peer_initial_window
        # (is the trailers, bytes): DATA payloads, then the trailers, waiting for the client's window
        self.pending: collections.deque[tuple[bool, bytes]] = collections.deque()
        self.headers_sent = False
        self.closed = False  # our side ended the stream (trailers or RST_STREAM sent)
        self.reset = False  # the client reset the stream (cancelled the call)
        self.flushed: asyncio.Future | None = None  # a write waiting for window
        self.request_ended = False
        self.timer: asyncio.TimerHandle | None = None
        self.unread = 0  # bytes received on a streamed call but not yet read by its handler
        self.owed = 0  # window not given back yet because of them

    # --- requests ---------------------------------------------------------------------------

    def take_messages(self, limit: int) -> list[bytes]:
        """Whole messages from the buffer (decompressed); raises :class:`Abort` on a bad one."""
        messages = []
        buffer = self.buffer
        offset = 0
        while len(buffer) - offset >= 5:
            compressed, length = _MESSAGE.unpack_from(buffer, offset)
            if length > limit:
                raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                            f"Received message larger than max ({length} vs. {limit})")
            end = offset + 5 + length
            if len(buffer) < end:
                break
            body = bytes(buffer[offset + 5:end])
            offset = end
            if compressed:
                body = self._decompress(body, limit)
            messages.append(body)
        if offset:
            del buffer[:offset]
        return messages

    def _decompress(self, body: bytes, limit: int) -> bytes:
        if self.encoding not in ("gzip", "deflate"):
            raise Abort(grpc.StatusCode.UNIMPLEMENTED,
                        f"Compressed message with grpc-encoding {self.encoding or '(none)'!r}: "
                        "this server takes gzip and deflate")
        decompressor = zlib.decompressobj(31 if self.encoding == "gzip" else 15)
        try:
            plain = decompressor.decompress(body, limit + 1)
        except zlib.error as exc:
            raise Abort(grpc.StatusCode.INTERNAL, f"Could not decompress the message: {exc}") from None
        if len(plain) > limit:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"Received message larger than max (more than {limit} bytes once decompressed "
                        f"vs. {limit})")
        return plain

    async def requests(self) -> AsyncIterator[Any]:
        """A streamed call's requests, as the handler reads them (the window is given back then)."""
        deserialize = self.handler.request_deserializer
        while (item := await self.inbox.get()) is not None:
            if isinstance(item, Abort):
                raise item
            self.connection.consumed(self, len(item) + 5)
            yield deserialize(item)

    # --- responses --------------------------------------------------------------------------

    async def write(self, message: Any) -> None:
        """A streamed response; waits while the client's window or the socket is full."""
        if self.closed:
            raise asyncio.CancelledError("the call has ended")
        payload = self.handler.response_serializer(message)
        self.connection.check_send_size(len(payload))
        self.connection.send_message(self, payload)
        if self.pending:
            self.flushed = self.connection.loop.create_future()
            await self.flushed
        await self.connection.drained()


class _Connection(asyncio.Protocol):
    """One client connection: HTTP/2 frames in, calls dispatched, answers out."""

    def __init__(self, server: "GrpcServer"):
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.peer = "unknown"
        self.buffer = bytearray()
        self.preface = False
        self.decoder = hpack.Decoder(max_header_list_size=HEADER_BLOCK_LIMIT)
        self.block_cache: dict[bytes, list[tuple[bytes, bytes]]] = {}
        self.calls: dict[int, _Call] = {}
        self.last_stream = 0
        self.continued: tuple[int, int, bytearray] | None = None  # (stream, flags, block) until END_HEADERS
        self.peer_initial_window = DEFAULT_WINDOW
        self.peer_max_frame = 16384
        self.send_window = DEFAULT_WINDOW
        self.received = 0  # connection-level bytes received and not yet given back
        self.going_away = False
        self.paused: asyncio.Future | None = None
        self.out: list[bytes] = []  # frames gathered while a read is handled, written once at its end
        self.reading = False
        self.idle: asyncio.Event = asyncio.Event()

    # --- asyncio.Protocol -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            self.peer = f"ipv6:[{peer[0]}]:{peer[1]}" if ":" in peer[0] else f"ipv4:{peer[0]}:{peer[1]}"
        self.server.connections.add(self)
        settings = b"".join(_SETTING.pack(key, value) for key, value in (
            (MAX_CONCURRENT_STREAMS, STREAMS_LIMIT), (INITIAL_WINDOW_SIZE, RECEIVE_WINDOW),
            (MAX_FRAME_SIZE, OUR_MAX_FRAME), (ENABLE_PUSH, 0), (MAX_HEADER_LIST_SIZE, HEADER_LIST_LIMIT)))
        transport.write(_frame(SETTINGS, 0, 0, settings)
                        + _frame(WINDOW_UPDATE, 0, 0, _U32.pack(MAX_WINDOW - DEFAULT_WINDOW)))
        if self.server.closing:
            self.go_away()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.connections.discard(self)
        for call in list(self.calls.values()):
            self._reset(call)
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)
        self.idle.set()

    def pause_writing(self) -> None:
        if self.paused is None or self.paused.done():
            self.paused = self.loop.create_future()

    def resume_writing(self) -> None:
        if self.paused is not None and not self.paused.done():
            self.paused.set_result(None)

    async def drained(self) -> None:
        if self.paused is not None and not self.paused.done():
            await asyncio.shield(self.paused)

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer
        buffer += data
        offset = 0
        self.reading = True
        try:
            if not self.preface:
                if len(buffer) < len(PREFACE):
                    if not PREFACE.startswith(bytes(buffer)):
                        raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                    return
                if not buffer.startswith(PREFACE):
                    raise _ConnectionError(PROTOCOL_ERROR, "not an HTTP/2 connection preface")
                self.preface = True
                offset = len(PREFACE)
            end = len(buffer)
            while end - offset >= 9:
                head, flags, stream_id = _FRAME.unpack_from(buffer, offset)
                length = head >> 8
                if length > OUR_MAX_FRAME:
                    raise _ConnectionError(FRAME_SIZE_ERROR, f"a frame of {length} bytes")
                if end - offset - 9 < length:
                    break
                payload = bytes(buffer[offset + 9:offset + 9 + length])
                offset += 9 + length
                self._frame(head & 0xFF, flags, stream_id & 0x7FFFFFFF, payload)
        except _ConnectionError as error:
            self._fail(error)
            return
        finally:
            self.reading = False
            if offset:
                del buffer[:offset]
            self._flush_out()

    # --- frames -----------------------------------------------------------------------------

    def _frame(self, kind: int, flags: int, stream_id: int, payload: bytes) -> None:
        if self.continued is not None and kind != CONTINUATION:
            raise _ConnectionError(PROTOCOL_ERROR, "a header block was interrupted")
        if kind == DATA:
            self._data(flags, stream_id, payload)
        elif kind == HEADERS:
            if stream_id == 0:
                raise _ConnectionError(PROTOCOL_ERROR, "HEADERS on stream 0")
            payload = self._unpad(flags, payload)
            if flags & PRIORITY_FLAG:
                payload = payload[5:]
            if flags & END_HEADERS:
                self._headers(stream_id, flags, payload)
            else:
                self.continued = (stream_id, flags, bytearray(payload))
        elif kind == CONTINUATION:
            if self.continued is None or self.continued[0] != stream_id:
                raise _ConnectionError(PROTOCOL_ERROR, "an unexpected CONTINUATION")
            block = self.continued[2]
            block += payload
            if len(block) > HEADER_BLOCK_LIMIT:
                raise _ConnectionError(PROTOCOL_ERROR, "a header block too large")
            if flags & END_HEADERS:
                stream_id, first_flags, _ = self.continued
                self.continued = None
                self._headers(stream_id, first_flags, bytes(block))
        elif kind == SETTINGS:
            if stream_id != 0 or len(payload) % 6:
                raise _ConnectionError(PROTOCOL_ERROR if stream_id else FRAME_SIZE_ERROR, "a bad SETTINGS frame")
            if not flags & ACK:
                self._settings(payload)
                self._write(_frame(SETTINGS, ACK, 0))
        elif kind == PING:
            if len(payload) != 8:
                raise _ConnectionError(FRAME_SIZE_ERROR, "a PING frame not of 8 bytes")
            if not flags & ACK:
                self._write(_frame(PING, ACK, 0, payload))
        elif kind == WINDOW_UPDATE:
            if len(payload) != 4:
                raise _ConnectionError(FRAME_SIZE_ERROR, "a WINDOW_UPDATE frame not of 4 bytes")
            self._window_update(stream_id, _U32.unpack(payload)[0] & 0x7FFFFFFF)
        elif kind == RST_STREAM:
            call = self.calls.get(stream_id)
            if call is not None:
                self._reset(call)
        elif kind == GOAWAY:
            self.going_away = True  # the client opens no more streams; those running finish
        elif kind == PUSH_PROMISE:
            raise _ConnectionError(PROTOCOL_ERROR, "a client cannot push")
        # PRIORITY and unknown frame types are ignored, as RFC 9113 says

    @staticmethod
    def _unpad(flags: int, payload: bytes) -> bytes:
        if not flags & PADDED:
            return payload
        if not payload or payload[0] >= len(payload):
            raise _ConnectionError(PROTOCOL_ERROR, "bad padding")
        return payload[1:len(payload) - payload[0]]

    def _settings(self, payload: bytes) -> None:
        for offset in range(0, len(payload), 6):
            key, value = _SETTING.unpack_from(payload, offset)
            if key == INITIAL_WINDOW_SIZE:
                if value > MAX_WINDOW:
                    raise _ConnectionError(FLOW_CONTROL_ERROR, "INITIAL_WINDOW_SIZE above 2^31-1")
                delta = value - self.peer_initial_window
                self.peer_initial_window = value
                for call in self.calls.values():
                    call.send_window += delta
                if delta > 0:
                    self.loop.call_soon(self._flush_all)
            elif key == MAX_FRAME_SIZE:
                if not 16384 <= value <= 2**24 - 1:
                    raise _ConnectionError(PROTOCOL_ERROR, f"MAX_FRAME_SIZE {value}")
                self.peer_max_frame = value
            # HEADER_TABLE_SIZE: our blocks never use the client's dynamic table

    def _window_update(self, stream_id: int, increment: int) -> None:
        if stream_id == 0:
            self.send_window += increment
            if self.send_window > MAX_WINDOW:
                raise _ConnectionError(FLOW_CONTROL_ERROR, "the connection window overflowed")
            self._flush_all()
            return
        call = self.calls.get(stream_id)
        if call is not None:
            call.send_window += increment
            self._flush(call)

    def _headers(self, stream_id: int, flags: int, block: bytes) -> None:
        headers, size = self._decode(block)
        call = self.calls.get(stream_id)
        if call is not None:  # the client's trailers: its request stream ends
            self._request_end(call)
            return
        if stream_id % 2 == 0 or stream_id <= self.last_stream:
            raise _ConnectionError(PROTOCOL_ERROR, f"a client stream with id {stream_id}")
        self.last_stream = stream_id
        if self.going_away or self.server.closing or len(self.calls) >= STREAMS_LIMIT:
            self._write(_frame(RST_STREAM, 0, stream_id, _U32.pack(REFUSED_STREAM)))
            return
        if size > HEADER_LIST_LIMIT:  # this call only: the connection and its other calls go on
            self._trailers_only(stream_id, grpc.StatusCode.RESOURCE_EXHAUSTED,
                                f"the call's metadata is {size} bytes, more than this server's limit "
                                f"of {HEADER_LIST_LIMIT}")
            if not flags & END_STREAM:
                self._write(_frame(RST_STREAM, 0, stream_id, _U32.pack(NO_ERROR)))
            return
        self._open(stream_id, headers, bool(flags & END_STREAM))

    def _decode(self, block: bytes) -> tuple[list[tuple[bytes, bytes]], int]:
        """The headers of a block and their list size (RFC 7541: name + value + 32 each)."""
        decoded = self.block_cache.get(block)
        if decoded is not None:
            return decoded
        try:
            headers = self.decoder.decode(block, raw=True)
        except HPACKError as exc:
            raise _ConnectionError(COMPRESSION_ERROR, f"a header block could not be decoded: {exc}") from None
        decoded = headers, sum(len(name) + len(value) + 32 for name, value in headers)
        if _indexed_only(block):  # the same bytes mean the same headers until the table changes
            if len(self.block_cache) >= _CACHED_BLOCKS:
                self.block_cache.clear()
            self.block_cache[block] = decoded
        else:
            self.block_cache.clear()
        return decoded

    def _open(self, stream_id: int, headers: list[tuple[bytes, bytes]], ended: bool) -> None:
        path = content_type = timeout = encoding = authorization = None
        metadata = []
        for name, value in headers:
            if name[:1] == b":":
                if name == b":path":
                    path = value.decode("latin-1")
            elif name == b"content-type":
                content_type = value
            elif name == b"grpc-timeout":
                timeout = value.decode("latin-1")
            elif name == b"grpc-encoding":
                encoding = value.decode("latin-1")
            elif name == b"te" or name.startswith(b"grpc-"):
                continue
            else:
                key = name.decode("latin-1")
                text = value if key.endswith("-bin") else value.decode("latin-1")
                if key == "authorization":
                    authorization = text
                metadata.append((key, text))
        if content_type is None or not content_type.startswith(b"application/grpc"):
            # ":status: 415" (Unsupported Media Type): the static name 8 with a literal value
            self._write(_frame(HEADERS, END_HEADERS | END_STREAM, stream_id, b"\x08\x03415"))
            return
        deadline = None
        if timeout is not None:
            seconds = _timeout_seconds(timeout)
            if seconds is None:
                self._trailers_only(stream_id, grpc.StatusCode.INTERNAL, f"malformed grpc-timeout {timeout!r}")
                return
            deadline = time.monotonic() + seconds
        handler = self.server.registry.find(path or "")
        if handler is None:
            self._trailers_only(stream_id, grpc.StatusCode.UNIMPLEMENTED, "Method not found!")
            return
        gate = self.server.gate
        if gate.enabled:
            denied = gate.check(call_kind(path), bearer_token(authorization))
            if denied is not None:
                self._trailers_only(stream_id, REFUSAL_STATUS[denied.refusal], denied.message)
                return
        call = _Call(self, stream_id, path, handler, tuple(metadata), deadline, encoding)
        self.calls[stream_id] = call
        self.idle.clear()
        if deadline is not None:
            call.timer = self.loop.call_later(deadline - time.monotonic(), self._deadline_passed, call)
        if handler.request_streaming:
            call.inbox = asyncio.Queue()
            call.task = self.loop.create_task(self._run(call))
        if ended:
            self._request_end(call)

    def _data(self, flags: int, stream_id: int, payload: bytes) -> None:
        size = len(payload)  # padding counts against the windows too
        self.received += size
        if self.received >= RECEIVE_WINDOW:
            self._write(_frame(WINDOW_UPDATE, 0, 0, _U32.pack(self.received)))
            self.received = 0
        payload = self._unpad(flags, payload) if flags & PADDED else payload
        call = self.calls.get(stream_id)
        if call is None or call.request_ended:
            return  # a stream we ended or reset: its data is dropped (the window was given back)
        call.buffer += payload
        limit = self.server.max_message
        try:
            if call.inbox is not None:
                for message in call.take_messages(limit):
                    call.unread += len(message) + 5
                    call.inbox.put_nowait(message)
                if call.unread > RECEIVE_WINDOW:  # the handler is behind: hold the window until it reads
                    call.owed += size
                elif size and not flags & END_STREAM:
                    self._write(_frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(size)))
            elif len(call.buffer) > limit + 5:
                # more than one message's worth: the first is too large (take_messages raises), or
                # a second one follows it
                call.take_messages(limit)
                raise Abort(grpc.StatusCode.INTERNAL, "a unary call takes exactly one request message")
        except Abort as abort:
            self._refuse(call, abort)
            return
        if call.inbox is None and size and not flags & END_STREAM:
            # a unary request is buffered whole (bounded by the message limit): give it room at once
            self._write(_frame(WINDOW_UPDATE, 0, stream_id, _U32.pack(size)))
        if flags & END_STREAM:
            self._request_end(call)

    def consumed(self, call: _Call, size: int) -> None:
        """A streamed call's handler read ``size`` bytes: window held back is given back once it caught up."""
        call.unread -= size
        if call.owed and call.unread <= RECEIVE_WINDOW and not call.request_ended and not call.closed:
            self._write(_frame(WINDOW_UPDATE, 0, call.stream_id, _U32.pack(call.owed)))
            call.owed = 0

    def _request_end(self, call: _Call) -> None:
        if call.request_ended:
            return
        call.request_ended = True
        if call.inbox is not None:
            if call.buffer:
                call.inbox.put_nowait(Abort(grpc.StatusCode.INTERNAL, "the request stream ended inside a message"))
            call.inbox.put_nowait(None)
            return
        try:
            messages = call.take_messages(self.server.max_message)
            if len(messages) != 1 or call.buffer:
                raise Abort(grpc.StatusCode.UNIMPLEMENTED if len(messages) > 1 else grpc.StatusCode.INTERNAL,
                            "a unary call takes exactly one request message")
        except Abort as abort:
            self._refuse(call, abort)
            return
        call.task = self.loop.create_task(self._run(call, messages[0]))

    def _refuse(self, call: _Call, abort: Abort) -> None:
        """End a call now with ``abort``'s status (and reset it if the client is still sending)."""
        if call.task is not None:
            call.task.cancel()
        self._send_status(call, abort.code, abort.details)
        if not call.request_ended:
            call.request_ended = True
            self._write(_frame(RST_STREAM, 0, call.stream_id, _U32.pack(NO_ERROR)))

    def _reset(self, call: _Call) -> None:
        """The client reset the stream or went away: nothing more to read, nothing to answer, and
        the call's task is cancelled (which cancels its inference in the core)."""
        call.reset = call.request_ended = True
        self._end(call)
        if call.task is not None:
            call.task.cancel()

    def _deadline_passed(self, call: _Call) -> None:
        call.timer = None
        if call.closed:
            return
        if call.task is not None:
            call.task.cancel()
        self._send_status(call, grpc.StatusCode.DEADLINE_EXCEEDED, "Deadline Exceeded")

    # --- running calls ----------------------------------------------------------------------

    async def _run(self, call: _Call, body: bytes = b"") -> None:
        """A call's handler, from its request (or request stream) to its status."""
        handler = call.handler
        try:
            if handler.request_streaming:
                request = call.requests()
            else:
                try:
                    request = handler.request_deserializer(body)
                except Exception:
                    raise Abort(grpc.StatusCode.INTERNAL, "Exception deserializing request!") from None
            context = CallContext(call)
            answer_once = handler.unary_unary or handler.stream_unary
            if answer_once is not None:
                payload = handler.response_serializer(await answer_once(request, context))
                self.check_send_size(len(payload))
                self.send_message(call, payload, last=True)
            else:
                await self._stream_out(call, (handler.unary_stream or handler.stream_stream)(request, context))
        except Abort as abort:
            self._send_status(call, abort.code, abort.details)
        except asyncio.CancelledError:
            if not call.closed:  # our shutdown cancelled it: the client learns why
                self._send_status(call, grpc.StatusCode.CANCELLED, "the server is shutting down")
        except Exception as error:
            self._send_status(call, grpc.StatusCode.UNKNOWN,
                              report_bug(logger, f"serving gRPC {call.path}", error))

    async def _stream_out(self, call: _Call, result: Any) -> None:
        """A response-streaming handler: a coroutine writing through the context, or an async generator."""
        if inspect.isasyncgen(result):
            async for message in result:
                await call.write(message)
        else:
            await result
        self._send_status(call, grpc.StatusCode.OK, "")

    # --- sending ----------------------------------------------------------------------------

    def check_send_size(self, size: int) -> None:
        limit = self.server.max_message
        if size > limit:
            raise Abort(grpc.StatusCode.RESOURCE_EXHAUSTED, f"Sent message larger than max ({size} vs. {limit})")

    def send_message(self, call: _Call, payload: bytes, last: bool = False) -> None:
        """One response message (with the OK trailers when ``last``): in one write when the windows allow."""
        if call.closed:
            return
        data = _MESSAGE.pack(0, len(payload)) + payload
        size = len(data)
        head = b"" if call.headers_sent else _frame(HEADERS, END_HEADERS, call.stream_id, _RESPONSE_HEADERS)
        call.headers_sent = True
        if (not call.pending and size <= self.send_window and size <= call.send_window
                and size <= self.peer_max_frame):
            self.send_window -= size
            call.send_window -= size
            out = head + _frame(DATA, 0, call.stream_id, data)
            if last:
                out += _frame(HEADERS, END_HEADERS | END_STREAM, call.stream_id, _OK_TRAILERS)
            self._write(out)
            if last:
                self._end(call)  # after the answer: it may reset a request stream still open
            return
        if head:
            self._write(head)
        call.pending.append((False, data))
        if last:
            call.pending.append((True, _OK_TRAILERS))
        self._flush(call)

    def _send_status(self, call: _Call, code: grpc.StatusCode, message: str) -> None:
        if call.closed:
            return
        block = _OK_TRAILERS if code is grpc.StatusCode.OK else _status_block(code.value[0], message)
        if not call.headers_sent:  # trailers-only
            call.headers_sent = True
            call.pending.clear()
            self._write(_frame(HEADERS, END_HEADERS | END_STREAM, call.stream_id, _RESPONSE_HEADERS + block))
            self._end(call)
            return
        call.pending.append((True, block))
        self._flush(call)

    def _trailers_only(self, stream_id: int, code: grpc.StatusCode, message: str) -> None:
        self._write(_frame(HEADERS, END_HEADERS | END_STREAM, stream_id,
                           _RESPONSE_HEADERS + _status_block(code.value[0], message)))

    def _flush(self, call: _Call) -> None:
        """Send what the windows allow of a call's pending DATA, then its trailers."""
        pending = call.pending
        while pending and not call.closed:
            trailers, item = pending[0]
            if not trailers:
                room = min(self.send_window, call.send_window, self.peer_max_frame)
                if room <= 0:
                    break
                chunk = item[:room]
                if len(chunk) == len(item):
                    pending.popleft()
                else:
                    pending[0] = (False, item[room:])
                self.send_window -= len(chunk)
                call.send_window -= len(chunk)
                self._write(_frame(DATA, 0, call.stream_id, chunk))
            else:  # the trailers
                pending.popleft()
                self._write(_frame(HEADERS, END_HEADERS | END_STREAM, call.stream_id, item))
                self._end(call)
        if not pending and call.flushed is not None and not call.flushed.done():
            call.flushed.set_result(None)

    def _flush_all(self) -> None:
        for call in list(self.calls.values()):
            if call.pending:
                self._flush(call)
        self._flush_out()

    def _end(self, call: _Call) -> None:
        """Our side of the stream is over: forget it (its task may still be unwinding)."""
        call.closed = True
        call.pending.clear()
        if call.timer is not None:
            call.timer.cancel()
            call.timer = None
        if call.flushed is not None and not call.flushed.done():
            call.flushed.set_result(None)
        if self.calls.get(call.stream_id) is call:
            del self.calls[call.stream_id]
            if call.inbox is not None and not call.request_ended:
                # the client is still sending: tell it to stop, as grpc does after the status
                call.request_ended = True
                self._write(_frame(RST_STREAM, 0, call.stream_id, _U32.pack(NO_ERROR)))
        if not self.calls:
            self.idle.set()
            if self.going_away and self.server.closing and self.transport is not None:
                self.loop.call_soon(self._close_if_idle)

    def _close_if_idle(self) -> None:
        if not self.calls and self.transport is not None:
            self.transport.close()

    def _write(self, data: bytes) -> None:
        """While a read is handled, frames are gathered and leave in one write at its end."""
        if self.reading:
            self.out.append(data)
        elif self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _flush_out(self) -> None:
        if self.out and self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(self.out))
        self.out.clear()

    # --- ending -----------------------------------------------------------------------------

    def go_away(self) -> None:
        """Graceful shutdown: no new streams (GOAWAY names the last one taken); those running finish."""
        if self.transport is None or self.transport.is_closing():
            return
        self.going_away = True
        self._write(_frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(NO_ERROR)))
        if not self.calls:
            self.transport.close()

    def _fail(self, error: "_ConnectionError") -> None:
        logger.info("gRPC connection from %s closed: %s", self.peer, error.reason)
        self.out.append(_frame(GOAWAY, 0, 0, _U32.pack(self.last_stream) + _U32.pack(error.code)
                               + error.reason.encode("utf-8", "replace")[:256]))
        self._flush_out()
        self.buffer.clear()
        if self.transport is not None:
            self.transport.close()


class _ConnectionError(Exception):
    def __init__(self, code: int, reason: str):
        super().__init__(reason)
        self.code = code
        self.reason = reason


class GrpcServer:
    """The gRPC port: ``start()``, ``stop(grace)`` as ``grpc.aio.Server`` has them."""

    def __init__(self, listener: socket.socket, registrations: list[Callable[[Any], None]],
                 max_message: int, gate: Gate, ssl_context: ssl.SSLContext | None = None):
        self.registry = _Registry()
        for register in registrations:
            register(self.registry)
        self.max_message = max_message
        self.gate = gate
        self.connections: set[_Connection] = set()
        self.closing = False
        self._listener = listener
        self._ssl = ssl_context
        self._server: asyncio.AbstractServer | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=self._listener,
                                                ssl=self._ssl, backlog=1024)

    async def stop(self, grace: float | None) -> None:
        """Refuse new connections and streams; calls in flight get ``grace`` seconds, then are cancelled."""
        self.closing = True
        if self._server is not None:
            self._server.close()
        connections = list(self.connections)
        for connection in connections:
            connection.go_away()
        waiting = [asyncio.ensure_future(c.idle.wait()) for c in connections if c.calls]
        if waiting:
            _, late = await asyncio.wait(waiting, timeout=grace)
            for task in late:
                task.cancel()
        tasks = [call.task for connection in self.connections for call in connection.calls.values()
                 if call.task is not None]
        for task in tasks:
            task.cancel()  # each ends its call with CANCELLED "the server is shutting down"
        if tasks:
            await asyncio.wait(tasks, timeout=1.0)
        for connection in list(self.connections):
            if connection.transport is not None:
                connection.transport.close()  # after what was written to it
