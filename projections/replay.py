"""Pure helpers of `svc replay projection`: reading a point in time, progress arithmetic
and the lines shown to the operator. Standard library only."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

_FRACTION = re.compile(r"(\.\d{6})\d+")  # nanoseconds (as NATS prints them) -> micro


def parse_time(text: str) -> datetime:
    """An RFC 3339 time (`2026-11-26T10:00:00Z`, an offset, or naive = UTC), in UTC;
    ValueError with a one-line reason otherwise. Resolution is the microsecond."""
    cleaned = _FRACTION.sub(r"\1", text.strip())
    try:
        when = datetime.fromisoformat(cleaned)
    except ValueError:
        raise ValueError(f"{text!r} is not an RFC 3339 time (e.g. 2026-11-26T10:00:00Z)") from None
    if when.tzinfo is None:
        return when.replace(tzinfo=UTC)
    return when.astimezone(UTC)


_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def parse_when(text: str, now: datetime | None = None) -> datetime:
    """`parse_time`, or an age like `90s`, `15m`, `2h`, `1.5d` (that long before `now`);
    ValueError naming both forms otherwise."""
    text = text.strip()
    if text[-1:] in _UNITS and text[:-1].replace(".", "", 1).isdigit():
        return (now or datetime.now(UTC)) - timedelta(seconds=float(text[:-1]) * _UNITS[text[-1]])
    try:
        return parse_time(text)
    except ValueError:
        raise ValueError(
            f"{text!r} is not a time: use RFC 3339 (2026-11-26T10:00:00Z) or an age (15m, 2h, 7d)"
        ) from None


def duration(seconds: float) -> str:
    """`0.4s`, `12s`, `3m05s`, `1h02m`."""
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


@dataclass(frozen=True)
class Progress:
    """How far a rebuild is: `done` of `total` events after `elapsed` seconds."""

    done: int
    total: int
    elapsed: float

    @property
    def rate(self) -> float:
        """Events per second so far."""
        return self.done / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the current rate (None before there is a rate)."""
        return (self.total - self.done) / self.rate if self.rate > 0 else None

    def line(self, width: int = 24) -> str:
        """`[#######.....]  41%  410,000/1,000,000 events  45,210 ev/s  ETA 13s`."""
        share = min(1.0, self.done / self.total) if self.total > 0 else 1.0
        filled = round(share * width)
        eta = "--" if self.eta is None else duration(self.eta)
        return (
            f"[{'#' * filled}{'.' * (width - filled)}] {share:4.0%}  "
            f"{self.done:,}/{self.total:,} events  {self.rate:,.0f} ev/s  ETA {eta}"
        )
