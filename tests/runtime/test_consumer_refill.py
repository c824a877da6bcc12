"""The ordered-by-subject consumer refills its window in runs: once nearly every slot is
taken it waits for half a batch of free slots instead of sending a pull request per freed
slot (issue 17: the core's intake), and never lets that wait stall a window whose held
messages wait for one it has not fetched."""

from __future__ import annotations

import asyncio

from contracts.codec import encode
from contracts.events import MessageReceived
from contracts.streams import OUTBOUND
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, ConsumerSpec, Delivery
from tests.conftest import wait_until

DURABLE = "refill"
WORK_S = 0.002  # what one message costs the handler (a stand-in for a turn's work)


def event(text: str) -> MessageReceived:
    return MessageReceived(
        account="acct", chat="c@s.whatsapp.net", sender="s", message_id=text, text=text
    )


def spec(**kw: object) -> ConsumerSpec:
    base: dict[str, object] = {
        "stream": OUTBOUND.name,
        "durable": DURABLE,
        "filter_subject": "outbound.>",
        "ordered_by_subject": True,
        "max_held": 16,
        "batch": 16,
        "fetch_timeout": 0.2,
    }
    base.update(kw)
    return ConsumerSpec(**base)  # type: ignore[arg-type]


async def pull_requests(bus: Bus) -> list[int]:
    """A counter of the pull requests the consumer sends (its own connection echoes them)."""
    seen = [0]

    async def count(_: object) -> None:
        seen[0] += 1

    await bus.nc.subscribe(f"$JS.API.CONSUMER.MSG.NEXT.{OUTBOUND.name}.{DURABLE}", cb=count)
    await bus.nc.flush()
    return seen


async def test_a_saturated_window_is_refilled_in_runs_not_a_request_per_message(
    bus: Bus,
) -> None:
    # Given a backlog of 200 messages on two subjects, far more than the window (16 held)
    total = 200
    for n in range(total):
        subject = f"outbound.whatsapp.acct.chat{n % 2}"
        await bus.publish_bytes(subject, encode(event(str(n))), msg_id=f"m-{n}")
    requests = await pull_requests(bus)

    async def handler(body: MessageReceived, d: Delivery) -> None:
        await asyncio.sleep(WORK_S)  # the work itself, not a wait for a condition

    loop = ConsumerLoop(bus, spec(), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        # When it works through the backlog (each subject one message at a time, so the
        # slots free up one by one)
        await wait_until(lambda: loop.handled == total, timeout=60, what="the backlog")
    finally:
        stop.set()
        await task
    # Then it asked for messages in runs of at least half a batch (measured: 26 requests);
    # refilling each freed slot on its own took 96 here
    assert requests[0] <= total // 4, f"{requests[0]} pull requests for {total} messages"


async def test_a_window_whose_held_messages_wait_for_an_unfetched_one_still_fetches_it(
    bus: Bus,
) -> None:
    # Given a consumer holding three messages (window 4, so one slot is free: less than
    # the half batch it refills with) that each wait for a fourth, not yet published
    released = asyncio.Event()
    waiting: list[str] = []
    handled: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        if body.text == "release":
            released.set()
        else:
            waiting.append(body.text)
            await released.wait()
        handled.append(body.text)

    loop = ConsumerLoop(bus, spec(max_held=4, batch=4), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        for n in range(3):
            await bus.publish_bytes(
                f"outbound.whatsapp.acct.wait{n}", encode(event(f"wait{n}")), msg_id=f"w-{n}"
            )
        await wait_until(lambda: len(waiting) == 3, timeout=10, what="three messages held")
        # When the message they wait for is published
        await bus.publish_bytes(
            "outbound.whatsapp.acct.release", encode(event("release")), msg_id="release"
        )
        # Then the consumer fetches it into its one free slot, and every message is handled
        await wait_until(lambda: len(handled) == 4, timeout=10, what="all four handled")
    finally:
        released.set()
        stop.set()
        await task
    assert sorted(handled) == ["release", "wait0", "wait1", "wait2"]
