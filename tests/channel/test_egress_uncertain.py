"""A send the transport cannot vouch for is reported `DeliveryUncertain` at once.

A session transport (neonize) bounds each send with its own timeout: a send that timed
out waiting for the network's ack may or may not have gone out. The session raises
`UncertainSendError`; the egress records `DeliveryUncertain` right then (with the
transport's error in the job's attempt errors) and resolves it by DELIVERY_UNCERTAIN:
`skip` settles the job as skipped (acked, never sent again), `resend` records the attempt
as failed and sends again after the backoff.
"""

from __future__ import annotations

from contracts import subjects
from contracts.events import DeliveryFailed, DeliveryUncertain, MessageSent
from contracts.streams import OUTBOUND
from services.channel.ledger import SendLedger
from services.channel.port import UncertainSendError
from services.runtime.bus import Bus
from services.runtime.settings import Delivery
from tests.channel.scripted import ScriptedTransport, owned
from tests.conftest import read_stream, wait_until
from tests.e2e.conftest import job


async def _run_one_job(bus: Bus, policy: str) -> tuple[ScriptedTransport, str]:
    # A session whose first send times out waiting for the ack (outcome unknown)
    transport = ScriptedTransport(failures={1: UncertainSendError("no server ack within 10 s")})
    delivery = Delivery(backoff=(0.01, 0.01, 0.01), uncertain=policy)  # type: ignore[arg-type]
    queued = job("default", "c1@s.whatsapp.net", 1)
    async with owned(bus, transport, delivery):
        await bus.publish(subjects.outbound("whatsapp", "default", queued.chat), queued)

        async def settled() -> bool:
            record = await SendLedger(bus, "default").get(queued.job_id)
            if record is None or record.state not in ("sent", "skipped"):
                return False
            info = await bus.js.stream_info(OUTBOUND.name)
            return info.state.messages == 0  # acked: gone from the work queue

        await wait_until(settled, what="the job settled and acked")
    return transport, queued.job_id


async def test_an_unsure_send_is_recorded_uncertain_and_skipped_by_the_skip_policy(
    bus: Bus,
) -> None:
    transport, job_id = await _run_one_job(bus, "skip")

    events = [e for _, e in await read_stream(bus, "DELIVERY")]
    uncertain = [e for e in events if isinstance(e, DeliveryUncertain)]
    assert [(e.job_id, e.resolution, e.holder) for e in uncertain] == [(job_id, "skip", "holder-1")]
    assert uncertain[0].lease_token > 0
    # Not a failure, not sent again: one call, and nothing reached the network
    assert not [e for e in events if isinstance(e, DeliveryFailed | MessageSent)]
    assert transport.sessions["default"][0].calls == 1
    assert transport.network == []
    record = await SendLedger(bus, "default").get(job_id)
    assert record is not None
    assert (record.state, record.attempt) == ("skipped", 1)
    assert [(e.attempt, e.error) for e in record.errors] == [
        (1, "outcome unknown: no server ack within 10 s")
    ]


async def test_an_unsure_send_is_recorded_uncertain_then_resent_by_the_resend_policy(
    bus: Bus,
) -> None:
    transport, job_id = await _run_one_job(bus, "resend")

    events = [e for _, e in await read_stream(bus, "DELIVERY")]
    kinds = [(type(e).__name__, getattr(e, "attempt", None)) for e in events]
    # The uncertainty is on record before the second attempt's MessageSent
    assert kinds == [("DeliveryUncertain", None), ("MessageSent", 2)]
    uncertain = events[0]
    assert isinstance(uncertain, DeliveryUncertain)
    assert uncertain.resolution == "resend"
    assert [o.job_id for o in transport.network] == [job_id]
    record = await SendLedger(bus, "default").get(job_id)
    assert record is not None
    assert (record.state, record.attempt) == ("sent", 2)
