"""The parent's side of the instance-process wire: length-prefixed pickle frames.

A frame is a 4-byte little-endian length and a pickle (protocol 5) of a tuple whose
first item names the message (``stub/runner.py`` has the child's side). Numeric
numpy arrays travel as they are, with no JSON on the per-request path; object
arrays (BYTES tensors) travel as ``(shape, flat list of their items)``
(``stub/triserve_wire.py``, which both sides import): pickling a list of ``bytes``
costs a fraction of numpy's object-array reduce, on both sides.

Messages, parent -> child: ``initialize``, ``execute``, ``finalize``, which the
child's main thread reads itself, and on the control socket ``cancel`` and
``bls_response``, which its reader thread takes while ``execute`` runs;
child -> parent: ``ready`` / ``load_failed``, ``response``, ``done``, ``bls``,
``log``, ``finalized``.
"""

from __future__ import annotations

import asyncio
import pickle
import struct
from typing import Any, Callable

from triserve.backends.python.stub.triserve_wire import (
    CANCELLED_WHILE_QUEUED, QUEUE_TIMEOUT_EXPIRED, pack_array, unpack_array,
)
from triserve.core import busypoll, datatypes, scheduler
from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferRequest, InferTensor

HEADER = struct.Struct("<I")


class FrameProtocol(asyncio.Protocol):
    """The parent's end of an instance socket: length-prefixed pickle frames both ways.

    Every frame complete in one read is handed to ``on_message`` there and then, so
    the child's response and ``done`` for a batch (written together) cost one wakeup.
    A frame larger than one read waits in a buffer until it is whole, copied once.
    Sending is one ``transport.write`` per message; :meth:`writable` waits only
    while the socket's buffer is above its high-water mark. End of file (the child
    died or closed its end) calls ``on_closed`` at once: that is how a dead
    instance process is noticed.
    """

    def __init__(self, on_message: Callable[[tuple], None], on_closed: Callable[[], None]):
        self._on_message = on_message
        self._on_closed = on_closed
        self._transport: asyncio.Transport | None = None
        self._pending = bytearray()  # the start of a frame not yet complete
        self._needed = 0  # bytes _pending must reach before the next frame can be read
        self._resumed: asyncio.Future | None = None  # set while writing is paused

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        busypoll.touch()
        if self._pending:
            self._pending += data
            if len(self._pending) < self._needed:
                return
            data = bytes(self._pending)
            self._pending.clear()
        view = memoryview(data)
        offset, size = 0, len(data)
        self._needed = HEADER.size
        while size - offset >= HEADER.size:
            (length,) = HEADER.unpack_from(view, offset)
            start = offset + HEADER.size
            if start + length > size:
                self._needed = HEADER.size + length
                break
            offset = start + length
            self._on_message(pickle.loads(view[start:offset]))
        if offset < size:
            self._pending += view[offset:]

    def connection_lost(self, exc: Exception | None) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._on_closed()

    def pause_writing(self) -> None:
        self._resumed = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)
        self._resumed = None

    def send(self, message: tuple) -> None:
        busypoll.touch()
        data = pickle.dumps(message, protocol=5)
        self._transport.write(HEADER.pack(len(data)) + data)

    def hold_reading(self, hold: bool) -> None:
        """Stop (True) or go on (False) reading the child's frames: while held, the child's writes
        fill the socket buffer and then block, which holds a model's response sender back."""
        if self._transport is None or self._transport.is_closing():
            return
        if hold:
            self._transport.pause_reading()
        else:
            self._transport.resume_reading()

    async def writable(self) -> None:
        """Return once the socket buffer has room (at once, unless the child is slow to read)."""
        if self._resumed is not None:
            await self._resumed

    def close(self) -> None:
        self._transport.close()


def request_payload(job_id: int, request: InferRequest, deadline_ns: int = 0) -> tuple:
    """What the model's pb_utils.InferenceRequest is built from, in the child; ``deadline_ns``:
    the end of its queue timeout, which the child checks before it runs the request."""
    parameters = request.parameters
    flags = (1 if parameters.get("sequence_start") else 0) | (2 if parameters.get("sequence_end") else 0)
    return (job_id, request.id, parameters.get("sequence_id", 0), parameters,
            [(tensor.name, pack_array(tensor.data)) for tensor in request.inputs],
            [output.name for output in request.outputs], flags, deadline_ns)


def output_tensors(outputs: list[tuple[str, Any]]) -> list[InferTensor]:
    """The model's outputs as InferTensors (the core keeps only the requested ones)."""
    tensors = []
    for name, data in outputs:
        array = unpack_array(data)
        tensors.append(InferTensor(name, datatypes.kserve_datatype(array.dtype), list(array.shape), array))
    return tensors


def to_error(code_name: str, message: str) -> InferError:
    """An error the child sent as ``(code name, message)``; a request it refused before its
    execute gets the core's own error for that."""
    if code_name == CANCELLED_WHILE_QUEUED:
        return InferError(ErrorCode.CANCELLED, scheduler.CANCELLED_WHILE_QUEUED)
    if code_name == QUEUE_TIMEOUT_EXPIRED:
        return InferError.unavailable(scheduler.TIMEOUT_EXPIRED)
    return InferError(ErrorCode(code_name), message)
