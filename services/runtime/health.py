"""Readiness: named checks a role must pass to serve (`GET /readyz`, ADR 0029).

Each part of a role adds the checks it knows about -- the connection, provisioning, its
consumers, its workers -- and removes them when it ends. A check returns None when met,
else one line saying what is missing. `/readyz` answers 200 when every check is met and
503 with one line per unmet one otherwise; `/healthz` stays "the process is alive".
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from services.runtime.bus import Bus

Check = Callable[[], str | None]


class Readiness:
    """The process's readiness checks, by name (a name added again replaces the check)."""

    def __init__(self) -> None:
        self._checks: dict[str, Check] = {}

    def add(self, name: str, check: Check) -> Callable[[], None]:
        """Add `check` under `name`; returns its removal (a no-op once replaced)."""
        self._checks[name] = check

        def remove() -> None:
            if self._checks.get(name) is check:
                del self._checks[name]

        return remove

    def unmet(self) -> list[str]:
        """One line per unmet check, in the order they were added; [] when ready."""
        lines = []
        for name, check in list(self._checks.items()):
            try:
                why = check()
            except Exception as exc:  # a broken check is unmet, never a 500
                why = f"check failed: {type(exc).__name__}: {exc}"
            if why is not None:
                lines.append(f"{name}: {why}")
        return lines


READINESS = Readiness()  # process-wide: the one HTTP server of a role reads it


class Flag:
    """A condition that is unmet (with `why`) until `met()`; as a check: `flag.check`."""

    def __init__(self, why: str) -> None:
        self.why: str | None = why

    def met(self) -> None:
        self.why = None

    def unmet(self, why: str) -> None:
        self.why = why

    def check(self) -> str | None:
        return self.why


def tasks_alive(tasks: Iterable[asyncio.Task[None]]) -> Check:
    """Met while every task runs (a task that ended is a worker that stopped)."""
    held = list(tasks)

    def check() -> str | None:
        ended = [t.get_name() for t in held if t.done()]
        return f"stopped: {', '.join(ended)}" if ended else None

    return check


def connected(bus: Bus) -> Check:
    """Met while the NATS connection is up (not while it reconnects)."""

    def check() -> str | None:
        if bus.nc.is_connected:
            return None
        return "closed" if bus.nc.is_closed else "not connected (reconnecting)"

    return check
