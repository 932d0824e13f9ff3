"""Server-sent events: the one streaming path of every HTTP dialect (OpenAI's chat and text
completions, Triton's ``generate_stream``).

One disconnect rule for all of them: until the first response, the request races the
client's ``http.disconnect`` (:func:`first_response`), so a client that leaves while its
request waits in a queue cancels it; once streaming, :class:`EventStreamResponse` closes
the event generator however the stream ends (shielded from the cancellation Starlette
uses when the client goes away), and the generator's ``finally`` closes the core's
response stream, which cancels the request in the backend.
"""

from __future__ import annotations

from typing import Any, AsyncIterator

import anyio
from starlette.responses import StreamingResponse
from starlette.types import Receive, Send

from triserve.core.errors import InferError
from triserve.core.types import InferResponse
from triserve.frontends.http.disconnect import until_disconnected
from triserve.frontends.http.jsonio import sse_event

__all__ = ["DONE", "EventStreamResponse", "closing", "event", "first_response", "next_response"]

DONE = b"data: [DONE]\n\n"
event = sse_event


class EventStreamResponse(StreamingResponse):
    """An SSE response whose event generator is closed however the stream ends."""

    media_type = "text/event-stream"

    def __init__(self, events: AsyncIterator[bytes]):
        super().__init__(events, headers={"Cache-Control": "no-cache"})

    async def stream_response(self, send: Send) -> None:
        try:
            await super().stream_response(send)
        finally:
            with anyio.CancelScope(shield=True):
                await self.body_iterator.aclose()


async def next_response(responses: AsyncIterator[InferResponse]) -> InferResponse:
    """The next response; an error response raises; a stream that ends without a final
    response is a server fault."""
    try:
        response = await anext(responses)
    except StopAsyncIteration:
        raise InferError.internal("the model's response stream ended without a final response") from None
    if response.error is not None:
        raise response.error
    return response


async def first_response(receive: Receive, responses: AsyncIterator[InferResponse]) -> InferResponse | None:
    """The first response (None if the stream ended without one), awaited before answering so
    that a request that fails early gets its HTTP status; the client leaving first cancels it.
    The stream is closed if this raises."""
    try:
        return await until_disconnected(receive, anext(responses, None))
    except BaseException:
        with anyio.CancelScope(shield=True):
            await responses.aclose()
        raise


async def closing(responses: AsyncIterator[Any]) -> None:
    """Close a response stream, shielded (a ``finally`` of an event generator calls it)."""
    with anyio.CancelScope(shield=True):
        await responses.aclose()
