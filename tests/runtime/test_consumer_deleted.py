"""A consumer deleted under its loop: recreated by default, the loop stopped when its spec
says only one process may pull from it (the egress, ADR 0033).

A pull request to a deleted consumer gets no responder (503, as during a leader
election), not 404: the loop asks the consumer's info to tell them apart.
"""

from __future__ import annotations

import asyncio

from contracts.events import MessageReceived
from contracts.streams import OUTBOUND
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, Delivery
from tests.conftest import wait_until
from tests.runtime.test_consumer import SUBJECT, event, running, spec


async def test_a_consumer_deleted_under_its_loop_is_recreated_and_the_next_message_flows(
    bus: Bus,
) -> None:
    seen: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        seen.append(body.text)

    async with running(bus, handler) as loop:
        await bus.publish(SUBJECT, event("a"))
        await wait_until(lambda: loop.handled == 1, 30, "the first handled")
        # When an operator deletes the consumer
        await bus.js.delete_consumer(OUTBOUND.name, "test")
        await bus.publish(SUBJECT, event("b"))
        # Then the loop makes it again and the next message is handled
        await wait_until(lambda: loop.handled == 2, 30, "the second handled")
    assert seen == ["a", "b"]
    assert not loop.gone


async def test_a_consumer_that_must_not_be_recreated_stops_its_loop_when_deleted(
    bus: Bus,
) -> None:
    async def handler(body: MessageReceived, d: Delivery) -> None:
        raise AssertionError("nothing to handle")

    loop = ConsumerLoop(bus, spec(recreate=False), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    await wait_until(lambda: _named(bus), 30, "the consumer")
    # When the consumer is deleted under the loop (someone took it over)
    await bus.js.delete_consumer(OUTBOUND.name, "test")
    # Then the loop ends by itself, says why, and made nothing again
    await asyncio.wait_for(task, 30)
    assert loop.gone
    assert stop.is_set()
    assert not await _named(bus)


async def _named(bus: Bus) -> bool:
    return any(c.name == "test" for c in await bus.js.consumers_info(OUTBOUND.name))
