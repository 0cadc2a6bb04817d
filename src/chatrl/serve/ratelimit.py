"""Per-key request rate limit of `chatrl serve --rate-limit N` (requests per minute, sliding window).

Counted in this process's memory: several server processes behind one address each allow N per key.
"""

from __future__ import annotations

import collections
import math
import threading
import time


class RateLimited(Exception):
    def __init__(self, retry_after: float):
        super().__init__(f"retry after {retry_after:.0f} s")
        self.retry_after = retry_after


class RateLimiter:
    """`check(who)` counts one request of `who` (an API key, or a client address) or raises `RateLimited`."""

    WINDOW_S = 60.0

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._hits: dict[str, collections.deque[float]] = {}
        self._lock = threading.Lock()

    def check(self, who: str) -> None:
        if self.per_minute <= 0:
            return
        now = self.clock()
        with self._lock:
            hits = self._hits.setdefault(who, collections.deque())
            while hits and hits[0] <= now - self.WINDOW_S:
                hits.popleft()
            if len(hits) >= self.per_minute:
                raise RateLimited(max(1.0, math.ceil(hits[0] + self.WINDOW_S - now)))
            hits.append(now)
            if len(self._hits) > 10_000:  # forget idle callers so the table stays small
                self._hits = {k: v for k, v in self._hits.items() if v and v[-1] > now - self.WINDOW_S}
