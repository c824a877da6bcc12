"""Fair share arithmetic and the presence count, against a real server."""

from __future__ import annotations

import asyncio

from services.channel.fleet import Fleet, account_set_id
from services.runtime.bus import Bus
from tests.conftest import wait_until

ACCOUNTS = tuple(f"a{i}" for i in range(9))


def test_the_share_is_the_ceiling_of_accounts_over_workers() -> None:
    fleet = Fleet.__new__(Fleet)
    fleet.accounts = ACCOUNTS
    for workers, limit in ((1, 9), (2, 5), (3, 3), (4, 3), (9, 1), (20, 1)):
        fleet.workers = workers
        assert fleet.limit == limit


def test_workers_with_the_same_accounts_share_a_set_id_in_any_order() -> None:
    assert account_set_id(("a", "b")) == account_set_id(("b", "a"))
    assert account_set_id(("a", "b")) != account_set_id(("a", "c"))


async def test_workers_count_each_other_and_the_one_over_its_share_hands_over(bus: Bus) -> None:
    first = Fleet(bus, "w1", ACCOUNTS, ttl=5)
    stop_first = asyncio.Event()
    task_first = asyncio.create_task(first.run(stop_first))
    await asyncio.wait_for(first.settled.wait(), 5)
    sheds = [first.owning(a) for a in ACCOUNTS[:6]]  # holds 6 while alone
    assert not any(s.is_set() for s in sheds)
    # When a second worker announces itself
    second = Fleet(bus, "w2", ACCOUNTS, ttl=5)
    stop_second = asyncio.Event()
    task_second = asyncio.create_task(second.run(stop_second))
    await wait_until(lambda: first.workers == 2, what="first sees two workers")
    # Then the first hands over its newest account (6 > ceil(9/2) = 5)
    await wait_until(lambda: sheds[5].is_set(), what="a handover request")
    assert not any(s.is_set() for s in sheds[:5])
    # And when the second leaves, the count drops back at once (presence purged)
    stop_second.set()
    await task_second
    await wait_until(lambda: first.workers == 1, what="first alone again")
    stop_first.set()
    await task_first
