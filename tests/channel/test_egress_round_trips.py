"""The egress's round trips per job (issue 17, ADR 0035): an owner that was handed every
delivery of its consumer, and settled the chat's earlier jobs itself, sends the next job
without reading the chat's queue; the order still holds (the takeover case, where another
puller holds an earlier job, is tests/channel/test_egress_takeover_order.py)."""

from __future__ import annotations

from typing import Any

import pytest

from contracts import subjects
from services.runtime.bus import Bus
from services.runtime.settings import Delivery
from tests.channel.scripted import ScriptedTransport, owned
from tests.conftest import wait_until
from tests.e2e.conftest import job


async def test_an_owner_that_was_handed_every_job_reads_no_queue_before_a_send(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    made: list[str] = []
    original = bus.nc.request

    async def request(subject: str, *args: Any, **kwargs: Any) -> Any:
        made.append(subject)
        return await original(subject, *args, **kwargs)

    monkeypatch.setattr(bus.nc, "request", request)
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
