"""A streamed request's responses on their way to a client that may stop reading them.

A frontend pulls a request's responses from :meth:`InferenceServer.stream` only as fast as
its client takes them: the SSE writer waits for the socket to drain, the gRPC stream for
room in its outbox. What the model sends meanwhile waits here, in one
:class:`ResponseBuffer` per request, bounded:

- past :data:`HIGH_WATER_BYTES` (or :data:`HIGH_WATER_RESPONSES`) held, the buffer asks the
  backend to hold the request's responses back (``Job.pause``): the Python backend stops
  reading its instance's socket, so the model's ``response_sender.send`` blocks, and the
  server's memory stays flat; below half of it, ``Job.resume``;
- a request whose client read nothing for ``stall_timeout`` seconds while paused, or whose
  buffer reaches :data:`HARD_LIMIT_FACTOR` times the high-water mark (a backend that cannot
  hold back keeps sending), is cancelled in the backend and ends with a CANCELLED error
  that says why, after the responses already held (nothing sent is dropped before it).
"""

from __future__ import annotations

import asyncio
from collections import deque

from triserve.core.backend import Job
from triserve.core.errors import ErrorCode, InferError
from triserve.core.types import InferResponse

HIGH_WATER_BYTES = 16 << 20
HIGH_WATER_RESPONSES = 1024
HARD_LIMIT_FACTOR = 4
_OVERHEAD = 256  # bytes counted per response besides its tensors' data


def response_size(response: InferResponse) -> int:
    """About how many bytes a response holds (its tensors' data, BYTES items by length)."""
    size = _OVERHEAD
    for tensor in response.outputs:
        data = tensor.data
        if data.dtype.hasobject:
            size += sum(len(item) if isinstance(item, (bytes, str)) else 8 for item in data.flat)
        else:
            size += data.nbytes
    return size


class ResponseBuffer:
    """The responses of one request that its reader has not taken yet (``put`` is the
    request's sink, ``get`` the reader's side)."""

    def __init__(self, stall_timeout: float):
        self.job: Job | None = None  # set once the request is submitted
        self._stall_timeout = stall_timeout
        self._responses: deque[tuple[InferResponse, int]] = deque()
        self._bytes = 0
        self._paused = False
        self._stall_timer: asyncio.TimerHandle | None = None
        self._ready: asyncio.Future | None = None  # the reader waits on it while empty

    def put(self, response: InferResponse) -> None:
        size = response_size(response) if response.outputs else _OVERHEAD
        self._responses.append((response, size))
        self._bytes += size
        if self._ready is not None and not self._ready.done():
            self._ready.set_result(None)
        if response.final:
            self._set_paused(False)
        elif (self._bytes > HARD_LIMIT_FACTOR * HIGH_WATER_BYTES
              or len(self._responses) > HARD_LIMIT_FACTOR * HIGH_WATER_RESPONSES):
            self._give_up(f"its client did not read {len(self._responses)} responses "
                          f"({self._bytes >> 20} MiB) the model sent")
        elif self._bytes > HIGH_WATER_BYTES or len(self._responses) > HIGH_WATER_RESPONSES:
            self._set_paused(True)

    async def get(self) -> InferResponse:
        while not self._responses:
            self._ready = asyncio.get_running_loop().create_future()
            await self._ready
        response, size = self._responses.popleft()
        self._bytes -= size
        if self._paused:
            if self._bytes <= HIGH_WATER_BYTES // 2 and len(self._responses) <= HIGH_WATER_RESPONSES // 2:
                self._set_paused(False)
            elif self._stall_timer is not None:  # the reader is slow, not gone: its clock starts again
                self._stall_timer.cancel()
                self._arm_stall_timer()
        return response

    def close(self) -> None:
        self._set_paused(False)

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused or self.job is None:
            return
        self._paused = paused
        if paused:
            self.job.pause()
            self._arm_stall_timer()
        else:
            if self._stall_timer is not None:
                self._stall_timer.cancel()
                self._stall_timer = None
            self.job.resume()

    def _arm_stall_timer(self) -> None:
        if self._stall_timeout > 0:
            self._stall_timer = asyncio.get_running_loop().call_later(self._stall_timeout, self._stalled)

    def _stalled(self) -> None:
        self._stall_timer = None
        self._give_up(f"its client read none of its responses for {self._stall_timeout:g} s while "
                      f"{len(self._responses)} ({self._bytes >> 20} MiB) waited (--stream-stall-timeout)")

    def _give_up(self, why: str) -> None:
        job = self.job
        if job is None or job.done:
            return
        self._set_paused(False)
        job.cancel()
        job.fail(InferError(ErrorCode.CANCELLED, f"the server cancelled the request: {why}"))
