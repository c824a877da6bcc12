"""A chat's jobs reach the network in order across a lease handover (invariant 4, ADR 0033).

Around a takeover two processes can pull from an account's egress consumer: a stale
owner's late pull request is served by the consumer the new owner made under the same
name, and a stale owner that found the consumer deleted used to recreate it. Whoever holds
a chat's earlier job, the owner holds the chat's later job until the earlier one is
settled: it checks the chat's queue (the stream leader's copy) before each send. And an
egress loop whose consumer is deleted under it stops instead of recreating it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from contracts import subjects
from contracts.events import LeaseAcquired, LeaseReleased
from contracts.streams import ACCOUNTS, OUTBOUND
from services.channel.egress import egress_consumer_spec
from services.channel.port import Events
from services.runtime.bus import Bus
from services.runtime.settings import Delivery
from tests.channel.scripted import ScriptedSession, ScriptedTransport, owned
from tests.conftest import read_stream, wait_until
from tests.e2e.conftest import job

CHAT = "c1@s.whatsapp.net"
WAITS = "job waits for an earlier job of its chat"


class GatedTransport(ScriptedTransport):
    """Opening a session waits for `go`; `opening` says the owner got that far (it has
    deleted its predecessor's consumer and not yet made its own)."""

    def __init__(self) -> None:
        super().__init__()
        self.opening = asyncio.Event()
        self.go = asyncio.Event()

    @asynccontextmanager
    async def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AsyncIterator[ScriptedSession]:
        self.opening.set()
        await self.go.wait()
        async with super().session(account, events, receive=receive) as session:
            yield session


async def test_a_chats_later_job_waits_while_a_stale_puller_holds_its_earlier_one(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="services.channel.egress")
    first, second = job("default", CHAT, 1), job("default", CHAT, 2)
    for queued in (first, second):
        await bus.publish(subjects.outbound("whatsapp", "default", CHAT), queued)
    spec = egress_consumer_spec("whatsapp", "default")
    transport = GatedTransport()
    async with owned(bus, transport, Delivery(backoff=(0.01,))):
        # Given the new owner between deleting its predecessor's consumer and making its
        # own, and a stale owner that makes it again under the same name (what the loop's
        # self-heal did) and pulls the chat's first job -- or whose late pull request the
        # new consumer serves: the same thing
        await asyncio.wait_for(transport.opening.wait(), 30)
        await bus.js.add_consumer(OUTBOUND.name, config=spec.config())
        stale = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=OUTBOUND.name)
        held = await stale.fetch(1, timeout=5)
        assert [m.metadata.sequence.stream for m in held] == [1]

        # When the new owner runs and is handed the chat's second job
        transport.go.set()
        await wait_until(
            lambda: transport.network or any(WAITS in r.getMessage() for r in caplog.records),
            30,
            "the second job sent or waiting",
        )
        # and the stale owner gives the first one back (it could not prove its lease)
        await held[0].nak()
        await wait_until(lambda: len(transport.network) >= 2, 30, "both jobs sent")

    # Then the first reached the network before the second, each once
    assert [o.job_id for o in transport.network] == [first.job_id, second.job_id]


async def test_an_egress_consumer_deleted_under_its_owner_is_not_recreated_by_it(
    bus: Bus,
) -> None:
    transport = ScriptedTransport()
    spec = egress_consumer_spec("whatsapp", "default")
    async with owned(bus, transport, Delivery(backoff=(0.01,))) as owner:
        await asyncio.wait_for(owner.owning.wait(), 30)
        await wait_until(lambda: _exists(bus, spec.durable), 30, "the egress consumer")
        # When the consumer is deleted under the running owner (a takeover does that)
        await bus.js.delete_consumer(OUTBOUND.name, spec.durable)

        # Then its loop stops instead of pulling from a consumer it made again: the owner
        # gives the lease up, and only a new holding (a higher token) makes the consumer
        await wait_until(lambda: _released(bus), 30, "the lease released")
        await wait_until(lambda: _acquired(bus, 2), 30, "a second holding")
        await wait_until(lambda: _exists(bus, spec.durable), 30, "the egress consumer again")
        # and the account keeps sending
        later = job("default", CHAT, 3)
        await bus.publish(subjects.outbound("whatsapp", "default", CHAT), later)
        await wait_until(lambda: len(transport.network) >= 1, 30, "the job sent")
    assert [o.job_id for o in transport.network] == [later.job_id]
    events = [e for _, e in await read_stream(bus, ACCOUNTS.name)]
    released = [e for e in events if isinstance(e, LeaseReleased)]
    acquired = [e for e in events if isinstance(e, LeaseAcquired)]
    assert released[0].reason == "egress consumer deleted"
    assert released[0].token == acquired[0].token < acquired[1].token


async def _exists(bus: Bus, durable: str) -> bool:
    try:
        await bus.js.consumer_info(OUTBOUND.name, durable)
    except Exception:
        return False
    return True


async def _released(bus: Bus) -> bool:
    return any(isinstance(e, LeaseReleased) for _, e in await read_stream(bus, ACCOUNTS.name))


async def _acquired(bus: Bus, count: int) -> bool:
    events = await read_stream(bus, ACCOUNTS.name)
    return sum(isinstance(e, LeaseAcquired) for _, e in events) >= count
