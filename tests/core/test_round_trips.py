"""The core's round trips per turn (issue 17, ADR 0035): a replica that accounts for every
delivery of the shared consumer and settled the chat's last message reads neither the
chat's record nor the stream before the next turn; a record that went stale under it
(another replica settled a message since) is still caught."""

from __future__ import annotations

import asyncio

import pytest

from contracts import subjects
from contracts.events import MessageReceived, SendMessage
from services.core.chats import ChatStore
from services.core.llm import EchoLLM
from services.runtime.bus import Bus
from tests.conftest import count_requests, read_stream, wait_until
from tests.core.wiring import core_worker

CHAT = "alice@s.whatsapp.net"


def inbound(text: str) -> MessageReceived:
    return MessageReceived(
        account="acct", chat=CHAT, sender=CHAT, message_id=f"m-{text}", text=text
    )


async def send(bus: Bus, text: str) -> None:
    msg = inbound(text)
    await bus.publish(subjects.inbound("whatsapp", "acct", CHAT), msg)


async def history(bus: Bus) -> list[str]:
    state, _ = await ChatStore(bus).get(subjects.chat_key("whatsapp", "acct", CHAT), CHAT)
    return [h.text for h in state.history]


async def test_the_next_turn_of_a_chat_this_replica_settled_reads_no_record_and_no_stream(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given one replica that ran the chat's first turn
    worker = core_worker(bus, EchoLLM())
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    await send(bus, "one")
    await wait_until(lambda: worker.loop.handled == 1, what="the first turn")

    # When the chat's next message arrives
    made = count_requests(bus, monkeypatch)
    await send(bus, "two")
    await wait_until(lambda: worker.loop.handled == 2, what="the second turn")
    stop.set()
    await task

    # Then its turn read neither the chat's record nor the stream (round trips removed)
    reads = [s for s in made if "KV_chats" in s or s.endswith("MSG.GET.INBOUND")]
    assert reads == []
    # and it still saw the first turn, and settled its own after it
    assert await history(bus) == ["one", "echo: one", "two", "echo: two"]


async def test_a_record_settled_by_another_replica_meanwhile_is_read_again(bus: Bus) -> None:
    # Given replica A ran the chat's first turn (and remembers the chat's record)
    a = core_worker(bus, EchoLLM())
    stop = asyncio.Event()
    running = asyncio.create_task(a.loop.run(stop))
    await send(bus, "one")
    await wait_until(lambda: a.loop.handled == 1, what="A's turn")
    stop.set()
    await running
    # and replica B ran its second turn while A was not pulling
    b = core_worker(bus, EchoLLM())
    stop = asyncio.Event()
    running = asyncio.create_task(b.loop.run(stop))
    await send(bus, "two")
    await wait_until(lambda: b.loop.handled == 1, what="B's turn")
    stop.set()
    await running

    # When A, its remembered record now stale, runs the third
    stop = asyncio.Event()
    running = asyncio.create_task(a.loop.run(stop))
    await send(bus, "three")
    await wait_until(lambda: a.loop.handled == 2, what="A's second turn")
    stop.set()
    await running

    # Then A's turn saw B's, and the record holds all three in order, none lost
    assert await history(bus) == ["one", "echo: one", "two", "echo: two", "three", "echo: three"]
    jobs = [j.text for _, j in await read_stream(bus, "OUTBOUND") if isinstance(j, SendMessage)]
    assert jobs == ["echo: one", "echo: two", "echo: three"]


async def test_a_turn_reads_the_access_policy_only_after_it_changed(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a replica whose access gate read the policy for the chat's first turn (its
    # periodic backstop pushed out of the test's reach)
    worker = core_worker(bus, EchoLLM())
    worker.access.recheck = 3600.0
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    await send(bus, "one")
    await wait_until(lambda: worker.loop.handled == 1, what="the first turn")

    # When two more messages arrive with no policy change between
    made = count_requests(bus, monkeypatch)
    await send(bus, "two")
    await send(bus, "three")
    await wait_until(lambda: worker.loop.handled == 3, what="three turns")
    stop.set()
    await task

    # Then neither turn asked for ACCESS's state (was one STREAM.INFO per message)
    assert [s for s in made if s.endswith("STREAM.INFO.ACCESS")] == []
    assert await history(bus) == ["one", "echo: one", "two", "echo: two", "three", "echo: three"]
