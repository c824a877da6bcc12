"""The egress's round trips per job (issue 17, ADR 0035): an owner that was handed every
delivery of its consumer, and settled the chat's earlier jobs itself, sends the next job
without reading the chat's queue; the order still holds (the takeover case, where another
puller holds an earlier job, is tests/channel/test_egress_takeover_order.py)."""

from __future__ import annotations

import pytest

from contracts import subjects
from contracts.codec import decode
from contracts.events import DeliveryEvent, MessageSent
from contracts.payloads import SendRecord
from services.runtime.bus import Bus
from services.runtime.settings import Delivery
from tests.channel.scripted import ScriptedTransport, owned
from tests.conftest import count_requests, wait_until
from tests.e2e.conftest import job


async def test_an_owner_that_was_handed_every_job_reads_no_queue_before_a_send(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    made = count_requests(bus, monkeypatch)
    # Given three jobs to each of two chats, queued before the owner starts
    jobs = [job("default", f"c{n % 2}@s.whatsapp.net", n) for n in range(6)]
    for queued in jobs:
        await bus.publish(subjects.outbound("whatsapp", "default", queued.chat), queued)
    transport = ScriptedTransport()

    # When the owner sends them
    async with owned(bus, transport, Delivery(backoff=(0.01,))):
        await wait_until(lambda: len(transport.network) >= 6, 30, "all six sent")

    # Then each chat's jobs went in order, each once
    for chat in ("c0@s.whatsapp.net", "c1@s.whatsapp.net"):
        sent = [o.job_id for o in transport.network if o.chat == chat]
        assert sent == [j.job_id for j in jobs if j.chat == chat]
    # and no job read its chat's queue first (one STREAM.MSG.GET per job before)
    assert [s for s in made if s.endswith("MSG.GET.OUTBOUND")] == []


async def test_a_sent_job_is_recorded_with_one_wait_and_no_request_per_write(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    requested = count_requests(bus, monkeypatch)
    # Given four jobs to two chats
    jobs = [job("default", f"c{n % 2}@s.whatsapp.net", n, "pipelined") for n in range(4)]
    for queued in jobs:
        await bus.publish(subjects.outbound("whatsapp", "default", queued.chat), queued)
    transport = ScriptedTransport()
    requested.clear()

    # When the owner sends them
    async with owned(bus, transport, Delivery(backoff=(0.01,))):
        await wait_until(lambda: len(transport.network) >= 4, 30, "all four sent")
        sends = await bus.js.key_value("sends")

        async def all_recorded_sent() -> bool:
            for j in jobs:
                entry = await sends.get(subjects.send_key("default", j.job_id))
                if decode(entry.value or b"", SendRecord).state != "sent":
                    return False
            return True

        await wait_until(all_recorded_sent, 30, "every job recorded sent")

    # Then every job has its MessageSent and its `sent` record (stored before its ack) ...
    info = await bus.js.stream_info("DELIVERY")
    stored = [await bus.js.get_msg("DELIVERY", n) for n in range(1, info.state.last_seq + 1)]
    sent = [decode(m.data or b"", DeliveryEvent) for m in stored]
    assert sorted(e.job_id for e in sent if isinstance(e, MessageSent)) == sorted(
        j.job_id for j in jobs
    )
    # ... and of its writes only the `sending` record, which must be stored before the send,
    # was a request of its own: MessageSent and `sent` went out together and were waited
    # for once (ADR 0039; before: one request each, three per job).
    records = {f"$KV.sends.{subjects.send_key('default', j.job_id)}" for j in jobs}
    assert sorted(s for s in requested if s in records) == sorted(records)
    assert [s for s in requested if s.startswith("delivery.")] == []
