"""A session between connections sends nothing, and the job waits in its place.

A session transport (neonize) whose socket dropped reconnects by itself; meanwhile its
sends fail with `NotConnectedError` before anything reaches the network. The egress keeps
the job (the chat's later jobs stay behind it), tries again after a short capped wait,
and spends neither an attempt nor the account's send budget: an outage longer than the
whole DELIVERY_BACKOFF dead-letters nothing, and the first send after it goes out at once.
"""

from __future__ import annotations

from contracts import subjects
from contracts.events import DeliveryDeadLettered, DeliveryFailed, MessageSent
from contracts.streams import OUTBOUND
from services.channel.port import NotConnectedError
from services.runtime.bus import Bus
from services.runtime.settings import Delivery, RateLimit
from tests.channel.scripted import ScriptedTransport, owned
from tests.conftest import read_stream, wait_until
from tests.e2e.conftest import job

CHAT = "c1@s.whatsapp.net"


async def test_jobs_wait_out_a_disconnect_in_order_spending_no_attempt_nor_budget(
    bus: Bus,
) -> None:
    # Given a session that is not connected for its first 3 sends: more than the 2
    # attempts a job gets here, and a budget of 1 send a minute (burst 1) that a spent
    # token would empty for a minute
    offline = NotConnectedError("websocket not connected")
    transport = ScriptedTransport(failures=dict.fromkeys((1, 2, 3), offline))
    delivery = Delivery(backoff=(0.01,), rate_limit=RateLimit(per_minute=1, burst=1))
    first, second = job("default", CHAT, 1), job("default", CHAT, 2)
    async with owned(bus, transport, delivery):
        for queued in (first, second):
            await bus.publish(subjects.outbound("whatsapp", "default", CHAT), queued)
        # When the session comes back, the first job goes out at once
        await wait_until(lambda: len(transport.network) >= 1, 30, "the first job sent")

    # Then it went out on its first attempt, after the tries that found no connection
    assert transport.sessions["default"][0].calls == 4
    assert [o.job_id for o in transport.network] == [first.job_id]
    events = [e for _, e in await read_stream(bus, "DELIVERY")]
    assert [(type(e).__name__, getattr(e, "attempt", None)) for e in events] == [("MessageSent", 1)]
    assert not [e for e in events if isinstance(e, DeliveryFailed | DeliveryDeadLettered)]
    assert isinstance(events[0], MessageSent)
    assert events[0].job_id == first.job_id
    # and the chat's second job is still queued behind it (the budget holds it), not lost
    info = await bus.js.stream_info(OUTBOUND.name)
    assert info.state.messages == 1
