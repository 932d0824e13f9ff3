"""Deadlines for many pending things with one timer: a dict scanned by one watcher task.

Registering and clearing a deadline is a dict entry, far cheaper per request than a
timeout context or a timer handle each; deadlines are kept to within the watcher's
period (at most a quarter of the timeout, at least 50 ms).
"""

from __future__ import annotations

import asyncio
from typing import Callable, Generic, Hashable, TypeVar

Key = TypeVar("Key", bound=Hashable)


class Deadlines(Generic[Key]):
    def __init__(self, timeout: float, on_expiry: Callable[[Key], None]):
        self.timeout = timeout
        self._on_expiry = on_expiry
        self._period = max(0.05, min(1.0, timeout / 4))
        self._pending: dict[Key, float] = {}
        self._watcher: asyncio.Task | None = None

    def watch(self, key: Key) -> None:
        """Start ``key``'s deadline (``timeout`` from now); call from the event loop."""
        loop = asyncio.get_running_loop()
        if self._watcher is None or self._watcher.done():
            self._watcher = loop.create_task(self._watch())
        self._pending[key] = loop.time() + self.timeout

    def unwatch(self, key: Key) -> None:
        self._pending.pop(key, None)

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(self._period)
            now = loop.time()
            for key, deadline in list(self._pending.items()):
                if deadline <= now:
                    del self._pending[key]
                    self._on_expiry(key)
