"""Stop a unary request's work when its HTTP client goes away.

A unary route answers only when the model has finished, so nothing is sent while
it works and a client that gave up (a timeout, a closed tab) would otherwise leave
an LLM generating up to its full length for no one. Once the body has been read,
the only message ASGI's ``receive`` can still deliver is ``http.disconnect``:
racing the work against it, and cancelling the work when it comes, cancels the
request in the backend (the core cancels the job when its awaiting task is cancelled).
"""

from __future__ import annotations

import asyncio
from typing import Awaitable, TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive

T = TypeVar("T")


async def until_disconnected(receive: Receive, work: Awaitable[T]) -> T:
    """The result of ``work``; raises ``ClientDisconnect`` (having cancelled ``work``)
    when the client disconnects first. Call it only after the whole body has been read."""
    work_task = asyncio.ensure_future(work)
    watcher = asyncio.create_task(_disconnected(receive))
    try:
        await asyncio.wait((work_task, watcher), return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        work_task.cancel()  # a no-op once done; otherwise the client left, or we are cancelled
    if not work_task.done():
        # Wait for the cancellation to run its cleanup (the job's cancel) before answering.
        await asyncio.wait((work_task,))
        raise ClientDisconnect()
    return work_task.result()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
