"""Per-key rate limiting: a token bucket per key id, refilled continuously; a key may carry its own rate. In this
process; state.py has the same bucket in Redis for a fleet."""

from __future__ import annotations

import math
import threading
import time


class RateLimiter:
    """`per_minute` requests per key (unless the key has its own rate), with bursts up to the same number; 0 disables
    the limit."""

    def __init__(self, per_minute: int, clock=time.monotonic):
        self.per_minute = per_minute
        self.clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def limit_of(self, per_minute: int | None) -> int:
        """The limit that applies: the key's own rate when it has one, else the service's."""
        return self.per_minute if per_minute is None else per_minute

    def check(self, key_id: str, per_minute: int | None = None) -> float:
        """0 if the request may go ahead, else seconds to wait before retrying; `per_minute` is the key's own rate."""
        limit = self.limit_of(per_minute)
        if limit <= 0:
            return 0.0
        rate, capacity = limit / 60.0, float(limit)
        now = self.clock()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (capacity, now))
            tokens = min(capacity, tokens + (now - last) * rate)
            if tokens >= 1.0:
                self._buckets[key_id] = (tokens - 1.0, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return (1.0 - tokens) / rate


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))
