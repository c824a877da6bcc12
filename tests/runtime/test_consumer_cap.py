"""Fair scheduling in the ordered-by-subject consumer: one flooding subject holds at most
`max_per_subject` messages, so the others keep being fetched (issue 11 item 5)."""

from __future__ import annotations

import asyncio
from collections import Counter

from contracts.codec import encode
from contracts.events import MessageReceived
from contracts.streams import OUTBOUND
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, ConsumerSpec, Delivery
from tests.conftest import wait_until

FLOOD = "outbound.whatsapp.acct.flood"
OTHER = "outbound.whatsapp.acct.other"
WORK_S = 0.05  # what one flood message costs the handler (a stand-in for a model call)


def event(text: str) -> MessageReceived:
    return MessageReceived(
        account="acct", chat="c@s.whatsapp.net", sender="s", message_id=text, text=text
    )


def fair_spec(**kw: object) -> ConsumerSpec:
    base: dict[str, object] = {
        "stream": OUTBOUND.name,
        "durable": "fair",
        "filter_subject": "outbound.>",
        "ordered_by_subject": True,
        "max_ack_pending": 256,
        "max_held": 8,
        "batch": 8,
        "max_per_subject": 2,
        "fetch_timeout": 0.2,
    }
    base.update(kw)
    return ConsumerSpec(**base)  # type: ignore[arg-type]


async def test_a_flooding_subject_cannot_fill_the_window_and_the_flood_is_fully_handled(
    bus: Bus,
) -> None:
    # Given 40 slow messages on one subject queued before one message on another, and a
    # window (8 held) far smaller than the flood
    for n in range(40):
        await bus.publish_bytes(FLOOD, encode(event(str(n))), msg_id=f"flood-{n}")
    await bus.publish_bytes(OTHER, encode(event("hello")), msg_id="other")
    handled: list[tuple[str, int]] = []
    deliveries: Counter[int] = Counter()
    flood_done_when_other_ran: list[int] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        deliveries[d.stream_seq] = d.num_delivered  # times the server handed it to us
        if d.subject == FLOOD:
            await asyncio.sleep(WORK_S)  # the work itself, not a wait for a condition
        else:
            flood_done_when_other_ran.append(sum(1 for s, _ in handled if s == FLOOD))
        handled.append((d.subject, int(body.text) if d.subject == FLOOD else -1))

    loop = ConsumerLoop(bus, fair_spec(), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        # When the consumer runs
        await wait_until(lambda: flood_done_when_other_ran, timeout=20, what="the other subject")
        await wait_until(lambda: loop.handled == 41, timeout=60, what="the whole flood")
    finally:
        stop.set()
        await task
    # Then the other subject did not wait for the flood: without the cap it runs only after
    # 32 flood messages (the window holds 8, all of the flood); with it, within a few
    assert flood_done_when_other_ran[0] <= 10, flood_done_when_other_ran
    # and the flood was handled whole, once each (in which order is the handler's business:
    # a handed-back message comes back after later ones were fetched; the core's chat
    # record keeps turns in order, see tests/e2e/test_fair_chats.py)
    flood = [n for s, n in handled if s == FLOOD]
    assert sorted(flood) == list(range(40))
    info = await bus.js.consumer_info(OUTBOUND.name, "fair")
    assert info.num_pending == info.num_ack_pending == 0
    # and handing back is no spin: each message fetched a handful of times at most (a
    # spin would fetch the backlog every few milliseconds, thousands of times)
    handed_back = sum(deliveries.values()) - len(deliveries)
    assert handed_back <= 4 * 40, f"{handed_back} hand-backs for 40 messages"  # measured: 68


async def test_a_burst_in_one_subject_is_not_handed_back_while_the_window_is_roomy(
    bus: Bus,
) -> None:
    # Given a burst of 10 messages on one subject and a window of 64, far from crowded
    for n in range(10):
        await bus.publish_bytes(FLOOD, encode(event(str(n))), msg_id=f"burst-{n}")
    deliveries: Counter[int] = Counter()

    async def handler(body: MessageReceived, d: Delivery) -> None:
        deliveries[d.stream_seq] = d.num_delivered  # times the server handed it to us

    loop = ConsumerLoop(bus, fair_spec(max_held=64, batch=64), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        # When the consumer runs
        await wait_until(lambda: loop.handled == 10, timeout=20, what="the burst")
    finally:
        stop.set()
        await task
    # Then each message was delivered once: the cap (2) hands back only in a crowded window
    # (before, 8 of the 10 were handed back, each coming back after >= 0.25 s)
    assert len(deliveries) == 10
    assert set(deliveries.values()) == {1}, deliveries


async def test_a_subject_with_messages_handed_back_runs_them_before_its_later_ones(
    bus: Bus,
) -> None:
    # Given 40 messages on one subject: the window (8) is crowded at 4, so the cap (2)
    # hands most of them back
    for n in range(40):
        await bus.publish_bytes(FLOOD, encode(event(str(n))), msg_id=f"flood-{n}")
    started: list[int] = []
    redelivered: list[int] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        started.append(int(body.text))
        if d.num_delivered > 1:
            redelivered.append(int(body.text))
        await asyncio.sleep(WORK_S / 5)  # the work itself, not a wait for a condition

    loop = ConsumerLoop(bus, fair_spec(), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        # When the consumer works through them
        await wait_until(lambda: loop.handled == 40, timeout=60, what="the flood")
    finally:
        stop.set()
        await task
    # Then a later message never ran before an earlier one that was handed back: it goes
    # back behind them (before, one admitted while earlier ones were away ran first, and
    # the core had to make it step aside when they returned)
    assert redelivered, "nothing was handed back: the test no longer crowds the window"
    assert started == sorted(started), started
