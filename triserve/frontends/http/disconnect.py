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
from typing import Awaitable, Callable, TypeVar

from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope

T = TypeVar("T")

#: the scope extension triserve's HTTP protocol (``protocol.py``) puts in every request's scope:
#: ``scope["extensions"][ON_DISCONNECT](callback)`` registers a callback run when the connection
#: is lost and returns the function that unregisters it, or None when the connection is gone
ON_DISCONNECT = "triserve.on_disconnect"


async def until_disconnected(receive: Receive, work: Awaitable[T], scope: Scope | None = None) -> T:
    """The result of ``work``; raises ``ClientDisconnect`` (having cancelled ``work``)
    when the client disconnects first. Call it only after the whole body has been read.

    ``work`` runs in the caller's task, not a task of its own. Given the request's
    ``scope`` and served by triserve's own HTTP protocol (its ``triserve.on_disconnect``
    extension), the connection's end cancels the caller's task directly: no task at all.
    Otherwise a watcher task waiting on ``receive()`` does.
    """
    task = asyncio.current_task()
    on_disconnect = scope.get("extensions", {}).get(ON_DISCONNECT) if scope is not None else None
    if on_disconnect is not None:
        return await _until_lost(task, on_disconnect, work)
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


async def _until_lost(task: asyncio.Task,
                      on_disconnect: Callable[[Callable[[], None]], Callable[[], None] | None],
                      work: Awaitable[T]) -> T:
    lost = False

    def on_lost() -> None:
        nonlocal lost
        lost = True
        task.cancel()

    unregister = on_disconnect(on_lost)
    if unregister is None:  # gone already: the work never starts
        if asyncio.iscoroutine(work):
            work.close()
        raise ClientDisconnect()
    try:
        return await work
    except asyncio.CancelledError:
        if not lost:
            raise  # we were cancelled from outside
        task.uncancel()  # the cancellation was ours: the caller's task goes on
        raise ClientDisconnect() from None
    finally:
        unregister()


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
