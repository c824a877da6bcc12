"""EventDispatch: a session's events reach its handler at least once, in order, one at a time."""

from __future__ import annotations

import asyncio
import logging

import pytest

from services.channel.dispatch import EventDispatch
from services.channel.port import Connected, Disconnected, Receipt, SessionEvent
from tests.conftest import wait_until


def receipt(n: int) -> Receipt:
    return Receipt(chat="c@s.whatsapp.net", transport_message_ids=(f"t{n}",), status="read")


class Slow:
    """A handler that yields inside each delivery, so overlapping deliveries would show."""

    def __init__(self, fail: dict[int, int] | None = None) -> None:
        self.seen: list[int] = []
        self.running = 0
        self.overlapped = False
        self.fail = dict(fail or {})  # receipt number -> deliveries that fail first

    async def __call__(self, event: SessionEvent) -> None:
        self.running += 1
        self.overlapped |= self.running > 1
        try:
            await asyncio.sleep(0.001)
            assert isinstance(event, Receipt)
            n = int(event.transport_message_ids[0][1:])
            if self.fail.get(n, 0) > 0:
                self.fail[n] -= 1
                raise RuntimeError(f"handler broke on {n}")
            self.seen.append(n)
        finally:
            self.running -= 1


async def test_posted_and_delivered_events_run_one_at_a_time_in_arrival_order() -> None:
    handler = Slow()
    async with EventDispatch(handler) as events:
        # When a callback posts events while a durable queue delivers others
        for n in range(20):
            events.post(receipt(n))
        await asyncio.gather(*(events.deliver(receipt(n)) for n in range(20, 30)))
        for n in range(30, 40):
            events.post(receipt(n))
    # Then (the close drains what was posted) every one ran, never two at once, in order
    assert sorted(handler.seen) == list(range(40))
    assert handler.seen[:20] == list(range(20))
    assert handler.seen[-10:] == list(range(30, 40))
    assert not handler.overlapped


async def test_a_failing_posted_event_is_retried_and_does_not_stall_later_ones() -> None:
    # Given a handler that fails twice on event 1
    handler = Slow(fail={1: 2})
    async with EventDispatch(handler, retry_delays=(0.01, 0.01, 0.01)) as events:
        for n in range(4):
            events.post(receipt(n))
        # Then event 1 is delivered on its third attempt, and the later ones follow
        await wait_until(lambda: len(handler.seen) == 4, what="every event")
    assert handler.seen == [0, 1, 2, 3]


async def test_an_event_whose_handler_keeps_failing_is_logged_and_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    handler = Slow(fail={0: 99})
    with caplog.at_level(logging.WARNING):
        async with EventDispatch(handler, retry_delays=(0.01,), name="acct") as events:
            events.post(receipt(0))
            events.post(receipt(1))
            await wait_until(lambda: handler.seen == [1], what="the event after the poison")
    # Then the poison one was tried twice, then dropped with one error line naming it
    assert events.dropped == 1
    dropped = [r for r in caplog.records if r.getMessage().startswith("session event dropped")]
    assert len(dropped) == 1
    assert getattr(dropped[0], "event", "") == "Receipt"


async def test_deliver_raises_the_handlers_error_so_a_durable_queue_redelivers() -> None:
    async def broken(_event: SessionEvent) -> None:
        raise ValueError("nope")

    async with EventDispatch(broken, retry_delays=(0.01,)) as events:
        with pytest.raises(ValueError, match="nope"):
            await events.deliver(Connected())
        # and the dispatcher keeps working afterwards
        events.post(Disconnected("network"))
    assert events.delivered == 0
    assert events.dropped == 1


async def test_a_deliver_still_waiting_when_the_session_closes_is_told_it_was_not_handled() -> None:
    # Given a handler stuck on an event, and a durable source waiting to deliver another
    release = asyncio.Event()

    async def stuck(_event: SessionEvent) -> None:
        await release.wait()

    async with EventDispatch(stuck, drain_timeout=0.05) as events:
        events.post(Connected())
        waiting = asyncio.ensure_future(events.deliver(receipt(1)))
    # When the session closed, the waiting delivery hears it was not handled (its source
    # redelivers it) instead of hanging
    with pytest.raises(RuntimeError, match="closed before the event was handled"):
        await asyncio.wait_for(waiting, 5)
