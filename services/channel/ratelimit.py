"""A token bucket that serves waiters in arrival order (the send budget's buckets)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.runtime.settings import RateLimit


class TokenBucket:
    """`per_minute` sends on average, bursts of up to `burst`; FIFO, so order holds."""

    def __init__(self, limit: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = limit.per_minute / 60.0
        self.burst = float(limit.burst)
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()
        self._lock = asyncio.Lock()  # asyncio.Lock wakes waiters first come, first served

    def wait_time(self) -> float:
        """Seconds until one token is available (0 if one is now)."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        return 0.0 if self.tokens >= 1 else (1 - self.tokens) / self.rate

    async def acquire(self) -> None:
        """Take one token, waiting for it if the budget is spent."""
        async with self._lock:
            delay = self.wait_time()
            if delay > 0:
                await asyncio.sleep(delay)  # exactly until the next token is due
                self.wait_time()  # refill for the time slept
            self.tokens -= 1

    def refund(self) -> None:
        """Give back a token taken for a send that never happened."""
        self.tokens = min(self.burst, self.tokens + 1)

    def resize(self, limit: RateLimit) -> None:
        """Change the rate and burst in place (a ban cut, a restore step): what was earned
        at the old rate is kept, never more than the new burst. A waiter already asleep
        wakes at its old time; the next take waits by the new rate."""
        self.wait_time()  # settle what accrued at the old rate
        self.rate = limit.per_minute / 60.0
        self.burst = float(limit.burst)
        self.tokens = min(self.tokens, self.burst)
