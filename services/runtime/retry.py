"""One retry policy per consumer: how many attempts a message gets, how long each retry
waits, and that the last failed attempt dead-letters (ADR 0017).

Pure (no I/O): the consumer loop, the egress's durable send attempts and the core's model
retries all ask the same object, so attempts and backoff are decided in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts per message and the wait before each retry; the last attempt dead-letters."""

    attempts: int = 5
    # Wait before retry n (after attempt n failed); the last entry repeats.
    delays: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)
    # No wait is longer, including one a server asked for (Retry-After).
    max_delay: float = 3600.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"RetryPolicy.attempts must be >= 1, got {self.attempts}")
        if not self.delays:
            raise ValueError("RetryPolicy.delays must name at least one wait (seconds)")
        for d in (*self.delays, self.max_delay):
            if not math.isfinite(d) or d < 0:
                raise ValueError(f"RetryPolicy waits must be finite seconds >= 0, got {d!r}")

    @classmethod
    def from_backoff(cls, backoff: tuple[float, ...]) -> RetryPolicy:
        """A policy with one retry per backoff step: attempts = len(backoff) + 1 (no
        backoff: one attempt)."""
        return cls(attempts=len(backoff) + 1, delays=backoff or (0.0,))

    def delay(self, attempt: int, requested: float = 0.0) -> float:
        """The wait after failed attempt `attempt` (1-based): its scheduled step, or longer
        if the failure asked for longer (`requested`, e.g. Retry-After), at most max_delay."""
        scheduled = self.delays[min(max(attempt, 1), len(self.delays)) - 1]
        if not math.isfinite(requested):
            requested = self.max_delay
        return min(max(scheduled, requested), self.max_delay)

    def last(self, attempt: int) -> bool:
        """True if `attempt` (1-based) is the last one: failing it dead-letters."""
        return attempt >= self.attempts
