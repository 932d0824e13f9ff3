"""When the engine thread's loop fails: restart it with backoff, or give up.

A fault that escapes the engine's step loop (a bug, a failed allocation) ends
every request in flight with the error, then the loop starts again on fresh
caches. A model whose engine keeps failing (``max_restarts`` faults within
``window_s``) is given up on: it stops taking requests and reports why, so
readiness turns false instead of the server failing request after request.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field


@dataclass
class RestartPolicy:
    max_restarts: int = 3  # faults tolerated within window_s; one more and the engine gives up
    window_s: float = 60.0
    first_backoff_s: float = 0.1  # doubles with every fault in the window
    max_backoff_s: float = 5.0
    _faults: deque[float] = field(default_factory=deque)
    restarts: int = 0

    def next_backoff(self, now: float | None = None) -> float | None:
        """Record a fault; the seconds to wait before restarting, or None to give up."""
        now = time.monotonic() if now is None else now
        self._faults.append(now)
        while self._faults and now - self._faults[0] > self.window_s:
            self._faults.popleft()
        if len(self._faults) > self.max_restarts:
            return None
        self.restarts += 1
        return min(self.first_backoff_s * 2 ** (len(self._faults) - 1), self.max_backoff_s)
