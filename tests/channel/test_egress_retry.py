"""An egress retry in place after an unexpected error still looks at the job's record.

A send can reach the network and the handler still fail afterwards with an error that is
not a transport error (a bug, a NATS outage while recording `MessageSent`). The consumer
loop retries such a job in place, as the same delivery: that retry must see the
`sending` record and report the attempt as `DeliveryUncertain` before anything is sent
again (invariant 3), not resend silently as if it were a first attempt.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from contracts import subjects
from contracts.events import DeliveryUncertain, MessageSent
from services.channel.owner import AccountOwner
from services.channel.port import Events, Outgoing, SessionEnding
from services.runtime.bus import Bus
from services.runtime.settings import Delivery
from tests.conftest import read_stream, wait_until
from tests.e2e.conftest import job


class BrokenAfterSend(SessionEnding):
    """Sends, then fails its first send with a bug-type error (the message went out)."""

    reports_receipts = False
    send_timeout = 1.0

    def __init__(self, network: list[Outgoing]) -> None:
        super().__init__()
        self.network = network

    async def send(self, out: Outgoing) -> str:
        self.network.append(out)
        if len(self.network) == 1:
            raise RuntimeError("bug after the message left")
        return f"net-{len(self.network)}"


class BrokenTransport:
    name = "broken"
    channel = "whatsapp"
    send_timeout = 1.0
    inbound = None

    def __init__(self) -> None:
        self.network: list[Outgoing] = []

    @asynccontextmanager
    async def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AsyncIterator[BrokenAfterSend]:
        yield BrokenAfterSend(self.network)


async def test_a_job_retried_in_place_after_its_send_went_out_is_reported_uncertain(
    bus: Bus,
) -> None:
    transport = BrokenTransport()
    owner = AccountOwner(
        bus,
        transport,
        "default",
        "holder-1",
        lease_ttl=10,
        receive=False,
        delivery=Delivery(backoff=(0.01, 0.01, 0.01)),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(owner.run(stop))
    try:
        queued = job("default", "c1@s.whatsapp.net", 1)
        await bus.publish(subjects.outbound("whatsapp", "default", queued.chat), queued)

        async def settled() -> bool:
            return any(isinstance(e, MessageSent) for _, e in await read_stream(bus, "DELIVERY"))

        await wait_until(settled, what="the job sent")
    finally:
        stop.set()
        await running
    events = [e for _, e in await read_stream(bus, "DELIVERY")]
    # The network got it twice (the policy resends an uncertain job) -- and the second
    # send was preceded by the record saying the first one's outcome was unknown
    assert len(transport.network) == 2
    uncertain = [e for e in events if isinstance(e, DeliveryUncertain)]
    assert [(e.job_id, e.resolution) for e in uncertain] == [(queued.job_id, "resend")]
