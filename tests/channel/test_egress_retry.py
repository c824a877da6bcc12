"""An egress retry in place after an unexpected error still looks at the job's record.

A send can reach the network and the handler still fail afterwards with an error that is
not a transport error (a bug, a NATS outage while recording `MessageSent`). The consumer
loop retries such a job in place, as the same delivery: that retry must see the
`sending` record and report the attempt as `DeliveryUncertain` before anything is sent
again (invariant 3), not resend silently as if it were a first attempt.
"""

from __future__ import annotations

from contracts import subjects
from contracts.events import DeliveryUncertain, MessageSent
from services.runtime.bus import Bus
from services.runtime.settings import Delivery
from tests.channel.scripted import ScriptedTransport, owned
from tests.conftest import read_stream, wait_until
from tests.e2e.conftest import job


async def test_a_job_retried_in_place_after_its_send_went_out_is_reported_uncertain(
    bus: Bus,
) -> None:
    # A session whose first send fails with a bug-type error after the message went out
    transport = ScriptedTransport(
        failures={1: RuntimeError("bug after the message left")}, out_first=True
    )
    async with owned(bus, transport, Delivery(backoff=(0.01, 0.01, 0.01))):
        queued = job("default", "c1@s.whatsapp.net", 1)
        await bus.publish(subjects.outbound("whatsapp", "default", queued.chat), queued)

        async def settled() -> bool:
            return any(isinstance(e, MessageSent) for _, e in await read_stream(bus, "DELIVERY"))

        await wait_until(settled, what="the job sent")
    events = [e for _, e in await read_stream(bus, "DELIVERY")]
    # The network got it twice (the policy resends an uncertain job) -- and the second
    # send was preceded by the record saying the first one's outcome was unknown
    assert len(transport.network) == 2
    uncertain = [e for e in events if isinstance(e, DeliveryUncertain)]
    assert [(e.job_id, e.resolution) for e in uncertain] == [(queued.job_id, "resend")]
