"""Zombie sessions (issue 14 item 3, ADR 0025): a session that says it is connected but
hears nothing is reported and recycled once under the same lease; a second silence
within the cap is reported, never looped.

A real AccountOwner on the real sim transport and a real nats-server; the silence is the
sim network's own fault (`SimControl(event="silence")` on the account's control subject).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest

from contracts import subjects
from contracts.codec import encode
from contracts.events import LeaseAcquired, LeaseReleased, SessionZombie
from contracts.payloads import SimControl
from services.channel.owner import AccountOwner
from services.channel.port import (
    Events,
    Fence,
    NotConnectedError,
    Outgoing,
    SessionEvent,
    StreamReplaced,
    TemporaryBan,
)
from services.channel.watchdog import RecyclableSession
from services.runtime.bus import Bus
from services.runtime.settings import SessionWatch, SimFaults
from services.whatsapp.sim import SimSession, SimTransport
from tests.channel.scripted import ScriptedTransport
from tests.channel.test_owner_park import account_events, lease_value
from tests.conftest import session_board, wait_until
from tests.e2e.conftest import SimNetwork, job

ACCOUNT = "zombie"
AFTER = 2.0  # SVC_ZOMBIE_AFTER for the test: the cap window is 2 x 2 s


class CountingSim(SimTransport):
    """The sim transport, keeping every session it opened (to see a recycle)."""

    def __init__(self, bus: Bus) -> None:
        super().__init__(bus, SimFaults())
        self.opened: list[SimSession] = []

    @asynccontextmanager
    async def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AsyncIterator[SimSession]:
        async with super().session(account, events, receive=receive) as session:
            self.opened.append(session)  # subscribed to its control subject already
            yield session


async def silence(bus: Bus) -> None:
    """The sim network stops talking to the account's current session."""
    await bus.nc.publish(subjects.sim_control(ACCOUNT), encode(SimControl(event="silence")))
    await bus.nc.flush()


async def zombies(bus: Bus) -> list[SessionZombie]:
    return [e for e in await account_events(bus, ACCOUNT) if isinstance(e, SessionZombie)]


async def test_a_silent_session_is_recycled_once_under_the_same_lease_then_only_reported(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    transport = CountingSim(bus)
    owner = AccountOwner(
        bus,
        transport,
        ACCOUNT,
        "holder-z",
        lease_ttl=10,
        receive=False,
        watch=SessionWatch(zombie_after=AFTER),
    )
    stop = asyncio.Event()
    running = asyncio.create_task(owner.run(stop))
    try:
        # Given an owned, connected account
        await wait_until(lambda: owner.owning.is_set() and len(transport.opened) == 1)
        await wait_until(lambda: _state(bus, "connected"), what="the board to say connected")
        token = (await lease_value(bus, ACCOUNT)).token  # type: ignore[union-attr]
        first = transport.opened[0]

        # When the network goes silent on it for longer than SVC_ZOMBIE_AFTER
        await silence(bus)

        # Then it is reported (event, log) and recycled: a new session, the same lease
        await wait_until(
            lambda: len(transport.opened) == 2, timeout=AFTER * 10, what="a recycled session"
        )
        await wait_until(lambda: _count(bus, 1), what="SessionZombie recorded")
        (report,) = await zombies(bus)
        assert report.recycled
        assert report.silent_for > AFTER
        assert report.token == token
        assert report.holder == "holder-z"
        assert any("zombie session" in r.getMessage() for r in caplog.records)
        assert transport.opened[1] is not first
        lease = await lease_value(bus, ACCOUNT)
        assert lease is not None
        assert (lease.token, lease.holder) == (token, "holder-z")
        assert not [e for e in await account_events(bus, ACCOUNT) if isinstance(e, LeaseReleased)]
        acquired = [e for e in await account_events(bus, ACCOUNT) if isinstance(e, LeaseAcquired)]
        assert len(acquired) == 1
        await wait_until(lambda: _state(bus, "connected"), what="the new session connected")

        # When the new session goes silent too, within the cap window (2 x AFTER)
        await silence(bus)

        # (the new session sends meanwhile, under the same token: a silent socket may
        # still send; only what it hears is missing)
        async with SimNetwork(bus, ACCOUNT) as network:
            reply = job(ACCOUNT, "alice@s.whatsapp.net", 1, "zombie")
            await bus.publish(subjects.outbound("whatsapp", ACCOUNT, reply.chat), reply)
            await network.wait(lambda: network.job_ids() == {reply.job_id}, 20, "the send")
        assert network.seen[0].lease_token == token

        # Then that silence is reported, not recycled
        await wait_until(lambda: _count(bus, 2), timeout=AFTER * 10, what="a second report")
        second = (await zombies(bus))[1]
        assert not second.recycled
        status = await session_board(bus, ACCOUNT)
        assert status is not None
        assert status.state == "zombie"
        assert "recycle cap reached" in status.reason
        # ... and never looped: well past the cap window, still one recycle, two reports
        watch = owner.zombie_watch
        assert watch is not None
        looked = watch.checks
        await wait_until(
            lambda: watch.checks >= looked + int(3 * AFTER / watch.interval),
            timeout=AFTER * 20,
            what="the watch to look on for three more windows",
        )
        assert len(transport.opened) == 2
        assert len(await zombies(bus)) == 2
        assert owner.owning.is_set()
    finally:
        stop.set()
        await running


async def _state(bus: Bus, state: str) -> bool:
    status = await session_board(bus, ACCOUNT)
    return status is not None and status.state == state


async def _count(bus: Bus, n: int) -> bool:
    return len(await zombies(bus)) >= n


class _NoEvents:
    def post(self, event: SessionEvent) -> None:
        pass

    async def deliver(self, event: SessionEvent) -> None:
        pass


async def test_after_a_recycle_the_new_session_s_end_counts_and_sends_wait_meanwhile() -> None:
    # Given a recyclable session over the scripted transport
    transport = ScriptedTransport()
    async with RecyclableSession(transport, "a", _NoEvents(), receive=False) as session:
        old = transport.sessions["a"][0]
        ending = asyncio.create_task(session.ended())
        # When it is recycled
        assert await session.recycle()
        new = transport.sessions["a"][1]
        # Then the old session's end no longer counts (it was closed by its owner) ...
        old.signal(StreamReplaced())
        for _ in range(10):  # let the watcher run: it must not return
            await asyncio.sleep(0)
        assert not ending.done()
        # ... but the new one's does
        new.signal(TemporaryBan(reason="code 101"))
        end = await asyncio.wait_for(ending, 5)
        assert end.state == "banned"
        # And sends go to the new session
        fence = Fence("h", 1)
        assert await session.send(Outgoing("c@s.whatsapp.net", "hi", "j1", fence)) == "net-1"
        assert new.calls == 1
        assert old.calls == 0


async def test_a_send_during_a_recycle_is_not_connected_and_keeps_its_place() -> None:
    transport = ScriptedTransport()
    async with RecyclableSession(transport, "a", _NoEvents(), receive=False) as session:
        session._inner = None  # the moment between closing the old and opening the new
        with pytest.raises(NotConnectedError):
            await session.send(Outgoing("c@s.whatsapp.net", "hi", "j1", Fence("h", 1)))
