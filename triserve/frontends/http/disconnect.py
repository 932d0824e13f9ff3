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
    when the client disconnects first. Call it only after the whole body has been read.

    ``work`` runs in the caller's task, not a task of its own: a watcher task cancels
    the caller's task when the disconnect comes. That costs one task per request, not
    two plus an ``asyncio.wait``, on the hot path of every unary route.
    """
    task = asyncio.current_task()
    state = {"running": True, "disconnected": False}

    def on_watcher_done(watcher: asyncio.Task) -> None:
        if watcher.cancelled() or not state["running"]:
            return
        watcher.exception()  # retrieved: a failing receive() ends the work like a disconnect
        state["disconnected"] = True
        task.cancel()

    watcher = asyncio.create_task(_disconnected(receive))
    watcher.add_done_callback(on_watcher_done)
    try:
        return await work
    except asyncio.CancelledError:
        if not state["disconnected"]:
            raise  # we were cancelled from outside
        task.uncancel()  # the cancellation was ours: the caller's task goes on
        raise ClientDisconnect() from None
    finally:
        state["running"] = False
        watcher.cancel()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
