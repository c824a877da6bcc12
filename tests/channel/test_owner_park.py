"""What the owner does with the lease when its session ends by itself.

- A temporary ban parks the lease with its end (`until`); once that has passed a standby
  clears the marker (revision-checked: of two standbys one clears it), records
  `AccountResumed(actor="auto")` and acquires with a higher token, without an operator.
  A park without an end stays parked.
- A session that ends (replaced) after its lease was already taken over never writes a
  parked marker over the new holder's lease: the old owner records `LeaseLost`.
- The status board (`sessions` bucket) follows: connecting, connected, the end state.
"""

from __future__ import annotations

import asyncio
from datetime import datetime, timedelta

import pytest

from contracts import subjects
from contracts.events import (
    AccountResumed,
    LeaseAcquired,
    LeaseLost,
    SessionBanned,
    utcnow,
)
from contracts.streams import LEASES
from services.channel.owner import AccountOwner
from services.channel.port import (
    SessionEvent,
    StreamReplaced,
    TemporaryBan,
)
from services.runtime.bus import Bus
from services.runtime.lease import Lease, LeaseValue, read_lease
from tests.channel.scripted import ScriptedTransport
from tests.conftest import read_stream, session_board, wait_until


def owners(bus: Bus, transport: ScriptedTransport, account: str, n: int) -> list[AccountOwner]:
    return [
        AccountOwner(bus, transport, account, f"{account}-holder-{i}", lease_ttl=10, receive=False)
        for i in range(1, n + 1)
    ]


async def lease_value(bus: Bus, account: str) -> LeaseValue | None:
    found = await read_lease(await bus.js.key_value(LEASES.name), f"whatsapp.{account}")
    return found[0] if found else None


async def account_events(bus: Bus, account: str) -> list[object]:
    return [
        e for _, e in await read_stream(bus, "ACCOUNTS", subjects.accounts("whatsapp", account))
    ]


async def test_a_temporary_ban_parks_until_its_end_then_one_standby_resumes_by_itself(
    bus: Bus,
) -> None:
    ends: list[datetime] = []

    def ban() -> SessionEvent:
        ends.append(utcnow() + timedelta(seconds=2))
        return TemporaryBan(reason="code 101", until=ends[-1])

    # Given two workers competing for "banned" (whose first session is banned for 2 s)
    # and two for "gone" (whose first session is replaced: no end)
    transport = ScriptedTransport(signals={"banned": [ban], "gone": [StreamReplaced]})
    workers = owners(bus, transport, "banned", 2) + owners(bus, transport, "gone", 2)
    stop = asyncio.Event()
    running = [asyncio.create_task(w.run(stop)) for w in workers]
    try:
        # Then the ban parks the lease with its state and end, and the board says so
        async def parked_with_end() -> bool:
            value = await lease_value(bus, "banned")
            return value is not None and value.state == "banned"

        await wait_until(parked_with_end, what="the banned account parked")
        value = await lease_value(bus, "banned")
        assert value is not None
        assert value.parked == "banned: code 101"
        # stored to the millisecond, rounded up: the park never ends before the ban does
        until = value.parked_until()
        assert until is not None
        assert ends[0] <= until < ends[0] + timedelta(milliseconds=1), (until, ends[0])

        async def board_says_banned() -> bool:
            status = await session_board(bus, "banned")
            return status is not None and status.state == "banned"

        await wait_until(board_says_banned, what="the board showing the ban")
        status = await session_board(bus, "banned")
        assert status is not None
        assert (status.reason, status.until) == ("banned: code 101", ends[0])

        # When its end passes, one standby clears it and the account is owned again
        async def acquired_twice() -> bool:
            kinds = await account_events(bus, "banned")
            return len([e for e in kinds if isinstance(e, LeaseAcquired)]) == 2

        await wait_until(acquired_twice, timeout=20, what="the banned account re-acquired")

        async def board_connected_again() -> bool:
            status = await session_board(bus, "banned")
            return status is not None and status.state == "connected"

        await wait_until(board_connected_again, what="the board showing the new session")
    finally:
        stop.set()
        await asyncio.gather(*running)

    events = await account_events(bus, "banned")
    acquired = [e for e in events if isinstance(e, LeaseAcquired)]
    resumed = [e for e in events if isinstance(e, AccountResumed)]
    banned = [e for e in events if isinstance(e, SessionBanned)]
    assert acquired[1].token > acquired[0].token
    assert [(e.actor, e.reason) for e in resumed] == [("auto", "ban expired")]
    assert [(e.reason, e.until) for e in banned] == [("code 101", ends[0])]
    # Resumed after the end, not long after (measured: 2-4 ms late; 10 s would be the old
    # parked poll). A generous bound for a loaded machine.
    lateness = (resumed[0].at - ends[0]).total_seconds()
    assert 0 <= lateness < 5, lateness
    assert [type(e).__name__ for e in events].index("AccountResumed") < [
        type(e).__name__ for e in events
    ].index("LeaseAcquired", 1)

    # And the park without an end is still parked: one acquisition, never resumed
    gone = await account_events(bus, "gone")
    assert len([e for e in gone if isinstance(e, LeaseAcquired)]) == 1
    assert not [e for e in gone if isinstance(e, AccountResumed)]
    left = await lease_value(bus, "gone")
    assert left is not None
    assert (left.parked, left.state, left.until) == ("stream replaced", "replaced", "")
    assert len(transport.sessions["gone"]) == 1


async def test_a_session_replaced_after_a_takeover_never_parks_over_the_new_lease(
    bus: Bus,
) -> None:
    # Given an owner with a live session
    transport = ScriptedTransport()
    (owner,) = owners(bus, transport, "acct", 1)
    stop = asyncio.Event()
    running = asyncio.create_task(owner.run(stop))
    try:
        await wait_until(lambda: bool(transport.sessions["acct"]), what="the session open")
        old_token = owner.lease.token
        # When its lease is taken over behind its back (deleted, then acquired by another)
        kv = await bus.js.key_value(LEASES.name)
        await kv.delete("whatsapp.acct")
        other = Lease(bus, "whatsapp", "acct", "new-holder", 30)
        assert await other.try_acquire()
        # and its session then reports the stream replaced (the new owner connected)
        transport.sessions["acct"][0].signal(StreamReplaced())

        async def lost_recorded() -> bool:
            return any(isinstance(e, LeaseLost) for e in await account_events(bus, "acct"))

        await wait_until(lost_recorded, what="LeaseLost recorded")
    finally:
        stop.set()
        await running
    # Then the new holder's lease is untouched (no parked marker over it)
    value = await lease_value(bus, "acct")
    assert value is not None
    assert (value.holder, value.token, value.parked) == ("new-holder", other.token, "")
    lost = [e for e in await account_events(bus, "acct") if isinstance(e, LeaseLost)]
    assert [e.token for e in lost] == [old_token]
    assert await other.release()


async def test_an_operator_resume_is_done_by_a_worker_on_request_or_here_without_one(
    bus: Bus,
) -> None:
    from services.ops.accounts import resume
    from services.runtime.errors import ServiceError

    # Given two workers competing for "gone", whose session is replaced: parked, no end
    transport = ScriptedTransport(signals={"gone": [StreamReplaced]})
    workers = owners(bus, transport, "gone", 2)
    stop = asyncio.Event()
    running = [asyncio.create_task(w.run(stop)) for w in workers]
    try:

        async def parked() -> bool:
            value = await lease_value(bus, "gone")
            return value is not None and value.parked == "stream replaced"

        await wait_until(parked, what="the account parked")
        # When an operator resumes it: one worker clears it on request, for that operator
        assert await resume(bus, "gone", actor="olga", reason="re-linked") == "stream replaced"

        async def acquired_twice() -> bool:
            kinds = await account_events(bus, "gone")
            return len([e for e in kinds if isinstance(e, LeaseAcquired)]) == 2

        await wait_until(acquired_twice, what="the account owned again")
        # A resume of an account nobody parked is refused with one line naming the holder
        with pytest.raises(ServiceError, match="'gone' is not parked: gone-holder-"):
            await resume(bus, "gone", actor="olga", reason="again")
    finally:
        stop.set()
        await asyncio.gather(*running)
    resumed = [e for e in await account_events(bus, "gone") if isinstance(e, AccountResumed)]
    assert [(e.actor, e.reason) for e in resumed] == [("olga", "re-linked")]

    # And with no worker running, the operator's resume clears the lease itself
    lease = Lease(bus, "whatsapp", "idle", "h", 10)
    assert await lease.try_acquire()
    assert await lease.park("logged out", state="logged_out")
    assert await resume(bus, "idle", actor="olga", reason="") == "logged out"
    assert await lease_value(bus, "idle") is None
    idle = [e for _, e in await read_stream(bus, "ACCOUNTS", subjects.accounts("whatsapp", "idle"))]
    assert [(type(e).__name__, getattr(e, "actor", "")) for e in idle][-1] == (
        "AccountResumed",
        "olga",
    )
