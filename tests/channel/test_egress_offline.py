"""A session between connections sends nothing, and the job waits in its place.

A session transport (neonize) whose socket dropped reconnects by itself; meanwhile its
sends fail with `NotConnectedError` before anything reaches the network. The egress keeps
the job (the chat's later jobs stay behind it), tries again after a short capped wait,
and spends neither an attempt nor the account's send budget: an outage longer than the
whole DELIVERY_BACKOFF dead-letters nothing, and the first send after it goes out at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from contracts import subjects
from contracts.events import DeliveryDeadLettered, DeliveryFailed, MessageSent
from contracts.streams import OUTBOUND
from services.channel.owner import AccountOwner
from services.channel.port import Events, NotConnectedError, Outgoing, SessionEnding
from services.runtime.bus import Bus
from services.runtime.settings import Delivery, RateLimit
from tests.conftest import read_stream, wait_until
from tests.e2e.conftest import job

CHAT = "c1@s.whatsapp.net"


class ReconnectingSession(SessionEnding):
    """Not connected for its first `offline` sends; then every send goes out."""

    reports_receipts = False
    send_timeout = 1.0

    def __init__(self, offline: int, network: list[Outgoing]) -> None:
        super().__init__()
        self.offline = offline
        self.network = network
        self.calls = 0

    async def send(self, out: Outgoing) -> str:
        self.calls += 1
        if self.calls <= self.offline:
            raise NotConnectedError("websocket not connected")
        self.network.append(out)
        return f"net-{self.calls}"


class ReconnectingTransport:
    name = "reconnecting"
    channel = "whatsapp"
    send_timeout = 1.0
    inbound = None

    def __init__(self, offline: int) -> None:
        self.offline = offline
        self.network: list[Outgoing] = []
        self.sessions: list[ReconnectingSession] = []

    @asynccontextmanager
    async def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AsyncIterator[ReconnectingSession]:
        session = ReconnectingSession(self.offline, self.network)
        self.sessions.append(session)
        yield session


async def test_jobs_wait_out_a_disconnect_in_order_spending_no_attempt_nor_budget(
    bus: Bus,
) -> None:
    # Given a session that is not connected for its first 3 sends: more than the 2
    # attempts a job gets here, and a budget of 1 send a minute (burst 1) that a spent
    # token would empty for a minute
    transport = ReconnectingTransport(offline=3)
    owner = AccountOwner(
        bus,
        transport,
        "default",
        "holder-1",
        lease_ttl=10,
        receive=False,
        delivery=Delivery(backoff=(0.01,), rate_limit=RateLimit(per_minute=1, burst=1)),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(owner.run(stop))
    first, second = job("default", CHAT, 1), job("default", CHAT, 2)
    try:
        for queued in (first, second):
            await bus.publish(subjects.outbound("whatsapp", "default", CHAT), queued)
        # When the session comes back, the first job goes out at once
        await wait_until(lambda: len(transport.network) >= 1, 30, "the first job sent")
    finally:
        stop.set()
        await running

    # Then it went out on its first attempt, after the tries that found no connection
    assert transport.sessions[0].calls == 4
    assert [o.job_id for o in transport.network] == [first.job_id]
    events = [e for _, e in await read_stream(bus, "DELIVERY")]
    assert [(type(e).__name__, getattr(e, "attempt", None)) for e in events] == [("MessageSent", 1)]
    assert not [e for e in events if isinstance(e, DeliveryFailed | DeliveryDeadLettered)]
    assert isinstance(events[0], MessageSent)
    assert events[0].job_id == first.job_id
    # and the chat's second job is still queued behind it (the budget holds it), not lost
    info = await bus.js.stream_info(OUTBOUND.name)
    assert info.state.messages == 1
