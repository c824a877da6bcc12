"""A scripted transport for channel-layer tests: sends that fail as the test says, and
session signals raised on cue, under a real AccountOwner on a real nats-server."""

from __future__ import annotations

import asyncio
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

from services.channel.owner import AccountOwner
from services.channel.port import (
    Connected,
    Events,
    Outgoing,
    SessionEnding,
    SessionEvent,
    end_of,
)
from services.runtime.bus import Bus
from services.runtime.settings import Delivery


class ScriptedSession(SessionEnding):
    """Its n-th send (from 1) raises `failures[n]` if there is one -- after the message
    reached the network when `out_first` (a failure after the fact), else before -- and
    otherwise reaches the network."""

    reports_receipts = False
    send_timeout = 1.0

    def __init__(
        self,
        events: Events,
        network: list[Outgoing],
        failures: dict[int, BaseException],
        out_first: bool,
        sent_times: list[float] | None = None,
    ) -> None:
        super().__init__()
        self.events = events
        self.network = network
        self.sent_times = sent_times if sent_times is not None else []
        self.failures = failures
        self.out_first = out_first
        self.calls = 0

    def signal(self, event: SessionEvent) -> None:
        """What a network callback does: post the event; an ending one ends the session."""
        self.events.post(event)
        if end := end_of(event):
            self.end(end)

    async def send(self, out: Outgoing) -> str:
        self.calls += 1
        failure = self.failures.get(self.calls)
        if failure is None or self.out_first:
            self.network.append(out)
            self.sent_times.append(time.monotonic())
        if failure is not None:
            raise failure
        return f"net-{self.calls}"


class ScriptedTransport:
    """Every session reports Connected, then raises the next scripted signal of its
    account (if any); sends fail by `failures` (see ScriptedSession)."""

    name = "scripted"
    channel = "whatsapp"
    send_timeout = 1.0
    inbound = None

    def __init__(
        self,
        *,
        failures: dict[int, BaseException] | None = None,
        out_first: bool = False,
        signals: dict[str, list[Callable[[], SessionEvent]]] | None = None,
    ) -> None:
        self.failures = failures or {}
        self.out_first = out_first
        self.signals = signals or {}
        self.network: list[Outgoing] = []  # what reached the network, in order
        self.sent_times: list[float] = []  # when each of those reached it (monotonic)
        self.sessions: dict[str, list[ScriptedSession]] = defaultdict(list)

    @asynccontextmanager
    async def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AsyncIterator[ScriptedSession]:
        session = ScriptedSession(
            events, self.network, self.failures, self.out_first, self.sent_times
        )
        self.sessions[account].append(session)
        session.signal(Connected())
        if self.signals.get(account):
            session.signal(self.signals[account].pop(0)())
        yield session


@asynccontextmanager
async def owned(
    bus: Bus,
    transport: ScriptedTransport,
    delivery: Delivery,
    *,
    account: str = "default",
    holder: str = "holder-1",
) -> AsyncIterator[AccountOwner]:
    """A running AccountOwner of `account` for the block; stopped (drained) after it."""
    owner = AccountOwner(
        bus, transport, account, holder, lease_ttl=10, receive=False, delivery=delivery
    )
    stop = asyncio.Event()
    running = asyncio.create_task(owner.run(stop))
    try:
        yield owner
    finally:
        stop.set()
        await running
