"""The fetch shape (ADR 0034): a message that arrives while a loop waits idle is handed
over at once, not held for a second message or the fetch timeout; batching stays."""

from __future__ import annotations

import asyncio
import contextlib
import json

import nats.js.errors
import pytest

from contracts.codec import decode, encode
from contracts.events import MessageReceived
from contracts.streams import OUTBOUND
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, ConsumerSpec, Delivery, pull
from tests.conftest import wait_until

# Far longer than the waits below: a message held until the fetch's expiry (what nats-py
# 2.16's fetch(batch > 1) does with a lone message) fails the test instead of passing late.
IDLE_FETCH_S = 60.0


def event(text: str) -> MessageReceived:
    return MessageReceived(
        account="acct", chat="c@s.whatsapp.net", sender="s", message_id=text, text=text
    )


async def waiting_pulls(bus: Bus) -> int:
    try:
        info = await bus.js.consumer_info(OUTBOUND.name, "test")
    except nats.js.errors.NotFoundError:  # not created yet
        return 0
    return int(info.num_waiting or 0)


@pytest.mark.parametrize("ordered", [False, True], ids=["sequential", "ordered_by_subject"])
async def test_a_lone_message_published_while_the_loop_fetches_idle_is_handled_at_once(
    bus: Bus, ordered: bool
) -> None:
    seen: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        seen.append(body.text)

    spec = ConsumerSpec(
        stream=OUTBOUND.name,
        durable="test",
        filter_subject="outbound.>",
        batch=64,
        fetch_timeout=IDLE_FETCH_S,
        ordered_by_subject=ordered,
    )
    loop = ConsumerLoop(bus, spec, MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        # Given a loop whose pull request waits on the server (nothing to fetch),
        await wait_until(lambda: waiting_pulls(bus), what="an idle pull request")
        # when one message arrives and no second one ever does,
        await bus.js.publish("outbound.whatsapp.acct.chat1", encode(event("only")))
        # then it is handled long before the fetch could time out.
        await wait_until(lambda: seen == ["only"], timeout=15, what="the lone message handled")
    finally:
        stop.set()
        task.cancel()  # the idle fetch would otherwise wait out IDLE_FETCH_S
        with pytest.raises(asyncio.CancelledError):
            await task


async def test_pull_takes_what_is_waiting_as_one_batch(bus: Bus) -> None:
    # Batching under load: messages already stored come in one pull, up to the batch size.
    await bus.js.add_consumer(OUTBOUND.name, durable_name="test", filter_subject="outbound.>")
    sub = await bus.js.pull_subscribe_bind(durable="test", stream=OUTBOUND.name)
    for i in range(30):
        await bus.js.publish(f"outbound.whatsapp.acct.c{i % 3}", encode(event(str(i))))
    first = await pull(sub, 20, timeout=5)
    rest = await pull(sub, 20, timeout=5)
    texts = [decode(m.data, MessageReceived).text for m in first + rest]
    assert texts == [str(i) for i in range(30)]
    assert (len(first), len(rest)) == (20, 10)
    for m in first + rest:
        await m.ack_sync()
    await sub.unsubscribe()


async def test_a_message_landing_on_a_stray_pull_request_is_handed_over_at_once(bus: Bus) -> None:
    # A fetch that gave up on the client side just before the server expired it leaves its
    # lingering request behind; the next message is delivered on it. nats-py 2.16's
    # fetch(batch > 1) took such a message as the start of its own batch and waited for
    # the rest until its request expired: the message was held for the whole timeout.
    spec = ConsumerSpec(
        stream=OUTBOUND.name,
        durable="test",
        filter_subject="outbound.>",
        batch=64,
        fetch_timeout=IDLE_FETCH_S,
    )
    loop = ConsumerLoop(bus, spec, MessageReceived, lambda body, d: asyncio.sleep(0))
    await loop.ensure()
    sub = await bus.js.pull_subscribe_bind(durable="test", stream=OUTBOUND.name)
    stray = {"batch": 64, "expires": int(IDLE_FETCH_S * 1e9)}
    await bus.nc.publish(sub._nms, json.dumps(stray).encode(), reply=sub._deliver)
    await wait_until(lambda: waiting_pulls(bus), what="the stray pull request")
    stop = asyncio.Event()
    fetching = asyncio.create_task(loop.fetch(sub, 64, stop))
    try:
        # Given the loop's own fetch waiting beside the stray request,
        async def both_waiting() -> bool:
            return await waiting_pulls(bus) >= 2

        await wait_until(both_waiting, what="the loop's pull request beside the stray one")
        # when one message arrives (on the stray request, the older one),
        await bus.js.publish("outbound.whatsapp.acct.chat1", encode(event("only")))
        # then the fetch returns it without waiting for more or for the expiry.
        await wait_until(fetching.done, timeout=15, what="the fetch to hand the message over")
        got = fetching.result()
        assert [decode(m.data, MessageReceived).text for m in got] == ["only"]
        for m in got:
            await m.ack_sync()
    finally:
        fetching.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await fetching
        await sub.unsubscribe()
