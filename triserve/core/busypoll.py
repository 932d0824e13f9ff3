"""Busy polling: the event loop keeps polling, without sleeping, for a short window after a
Python-backend model process was written to or answered.

Between a request and its answer the server waits for the model process, then for the
client's next request. A loop that sleeps in ``epoll_wait`` meanwhile pays a wake-up for each
(on this project's virtual machines a blocking round trip between two processes costs 77 µs,
31 µs when one side polls: an idle vCPU halts, and waking it goes through the host). With
``--busy-poll-us`` > 0, each :func:`touch` keeps the loop awake that long: a callback that
reschedules itself makes every poll of the loop return at once. Past the window the loop
sleeps as usual, so an idle server spends nothing, and a busy one has work anyway; the CPU
it costs is at most one core while requests flow, and buys the lone request's latency
(bench/PROFILE.md, round 6).

Only the Python backend's model-process wire touches it: an LLM engine thread in the same
process competes with the loop for the GIL, so its requests never make the loop spin.
"""

from __future__ import annotations

import asyncio

_loop: asyncio.AbstractEventLoop | None = None
_window = 0.0
_until = 0.0
_spinning = False


def enable(loop: asyncio.AbstractEventLoop | None, window_s: float) -> None:
    """Busy-poll ``loop`` for ``window_s`` seconds after each :func:`touch`; 0 or None: never."""
    global _loop, _window
    _loop, _window = (loop, window_s) if loop is not None and window_s > 0 else (None, 0.0)


def touch() -> None:
    """The loop will wait for I/O soon: keep it awake for the window from now."""
    global _until, _spinning
    loop = _loop
    if loop is None:
        return
    _until = loop.time() + _window
    if not _spinning:
        _spinning = True
        loop.call_soon(_spin)


def _spin() -> None:
    global _spinning
    if _loop is not None and _loop.time() < _until:
        _loop.call_soon(_spin)
    else:
        _spinning = False
