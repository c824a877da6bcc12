"""A chat's inbound rate, decided from arrival times alone (pure; no I/O).

The budget is a GCRA (a token bucket kept as one number): `tat`, the theoretical arrival
time of the chat's next message, lives in the chat's record (`ChatState.rate_tat`), so
every replica and every replay decides the same. Message k of a burst sent at once may run
at `first + (k - burst + 1) * 60 / per_minute`: the first `burst` at once, then one per
interval. Arrival times, not processing times, decide: a backlog the core works through
after an outage is not refused for arriving late.
"""

from __future__ import annotations

from dataclasses import dataclass

from services.runtime.settings import RateLimit


@dataclass(frozen=True)
class Gate:
    """What the chat's budget says about one message."""

    allowed_at: float  # when the message may run (epoch seconds)
    conforming: bool  # it arrived within the budget (allowed_at <= arrival)
    tat_after: float  # the chat's `rate_tat` once this message has run


def gate(tat: float, arrival: float, limit: RateLimit) -> Gate:
    """Judge a message that arrived at `arrival` against the chat's state `tat`."""
    interval = 60.0 / limit.per_minute
    tolerance = (limit.burst - 1) * interval
    start = max(tat, arrival)
    allowed_at = start - tolerance
    return Gate(allowed_at=allowed_at, conforming=arrival >= allowed_at, tat_after=start + interval)
