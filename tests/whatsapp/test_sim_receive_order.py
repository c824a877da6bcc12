"""The sim receiver relays chats in parallel, each chat in arrival order, also across
receivers (issue 17 item 4, ADR 0034). Real nats-server; receivers in this process."""

from __future__ import annotations

import asyncio
import contextlib

from contracts import subjects
from contracts.codec import encode
from contracts.events import MessageReceived
from contracts.payloads import SimInbound
from contracts.streams import SIM, sim_consumer
from services.channel.ingress import Ingress
from services.channel.port import Incoming, SessionEvent
from services.runtime.bus import Bus
from services.whatsapp.sim import SimInbox
from tests.conftest import read_stream, wait_until

ACCOUNT = "default"


class GatedEvents:
    """Events that relay through the real Ingress, holding back texts listed in `gates`
    until their gate is opened; records what it was handed."""

    def __init__(self, bus: Bus, gates: dict[str, asyncio.Event] | None = None) -> None:
        self.ingress = Ingress(bus, "whatsapp", ACCOUNT)
        self.gates = gates or {}
        self.entered: list[str] = []

    def post(self, event: SessionEvent) -> None:
        raise AssertionError(f"unexpected posted event {event!r}")

    async def deliver(self, event: SessionEvent) -> None:
        assert isinstance(event, Incoming)
        await self.relay(event)  # gated the same way (the receiver before ADR 0034's change)

    async def relay(self, event: Incoming) -> None:
        self.entered.append(event.text)
        if (gate := self.gates.get(event.text)) is not None:
            await gate.wait()
        await self.ingress(event)


async def send(bus: Bus, chat: str, text: str) -> None:
    payload = SimInbound(chat=chat, sender=chat, text=text, message_id=f"m-{text}")
    await bus.js.publish(subjects.sim_in(ACCOUNT), encode(payload))


async def inbound(bus: Bus) -> list[MessageReceived]:
    return [m for _, m in await read_stream(bus, "INBOUND") if isinstance(m, MessageReceived)]


def texts_of(received: list[MessageReceived], chat: str) -> list[str]:
    return [m.text for m in received if m.chat == chat]


def chat(n: int) -> str:
    return f"1555000{n:04d}@s.whatsapp.net"


async def test_one_receiver_relays_chats_in_parallel_each_in_arrival_order(bus: Bus) -> None:
    # Given one receiver whose relay of the slow chat's first message hangs
    gate = asyncio.Event()
    events = GatedEvents(bus, {"c0-0": gate})
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(SimInbox(bus).receiver(ACCOUNT, events))  # type: ignore[arg-type]
        stack.callback(gate.set)  # a failing test must not leave the receiver stuck
        # When 8 chats x 10 messages arrive, interleaved
        for i in range(10):
            for c in range(8):
                await send(bus, chat(c), f"c{c}-{i}")

        # Then every other chat is relayed in full while the slow chat is held
        async def others_relayed() -> bool:
            got = await inbound(bus)
            return all(len(texts_of(got, chat(c))) == 10 for c in range(1, 8))

        await wait_until(others_relayed, timeout=60, what="the other chats to be relayed")
        assert texts_of(await inbound(bus), chat(0)) == []
        assert "c0-1" not in events.entered  # the slow chat's next waits for its first
        gate.set()

        async def all_relayed() -> bool:
            return len(await inbound(bus)) == 80

        await wait_until(all_relayed, timeout=60, what="the slow chat to be relayed")
    got = await inbound(bus)
    for c in range(8):
        assert texts_of(got, chat(c)) == [f"c{c}-{i}" for i in range(10)]


async def test_a_later_message_waits_for_an_earlier_one_of_its_chat_held_by_another_receiver(
    bus: Bus,
) -> None:
    # Given receiver A holds chat X's first message (its relay hangs, like a paused
    # process) and then stops fetching
    gate = asyncio.Event()
    a_events = GatedEvents(bus, {"x-0": gate})
    a = contextlib.AsyncExitStack()
    await a.enter_async_context(SimInbox(bus).receiver(ACCOUNT, a_events))  # type: ignore[arg-type]
    await send(bus, chat(1), "x-0")
    await wait_until(lambda: "x-0" in a_events.entered, timeout=30, what="A to hold x-0")
    a_closing = asyncio.create_task(a.aclose())  # finishes x-0, fetches nothing more

    async def nobody_pulling() -> bool:
        info = await bus.js.consumer_info(SIM.name, sim_consumer(ACCOUNT))
        return info.num_waiting == 0

    await wait_until(nobody_pulling, timeout=30, what="A's pull requests to end")
    # When receiver B gets chat X's next message (and another chat's)
    b_events = GatedEvents(bus)
    async with SimInbox(bus).receiver(ACCOUNT, b_events):  # type: ignore[arg-type]
        await send(bus, chat(1), "x-1")
        await send(bus, chat(2), "y-0")

        async def other_chat_relayed() -> bool:
            return texts_of(await inbound(bus), chat(2)) == ["y-0"]

        await wait_until(other_chat_relayed, timeout=30, what="B to relay the other chat")

        async def b_took_x1() -> bool:
            if texts_of(await inbound(bus), chat(1)):
                return True  # relayed: wrong, asserted below
            info = await bus.js.consumer_info(SIM.name, sim_consumer(ACCOUNT))
            return info.num_ack_pending == 2  # x-0 in A, x-1 held in B

        # Then B holds x-1 without relaying it while x-0 is unrelayed in A
        await wait_until(b_took_x1, timeout=30, what="B to take x-1")
        assert texts_of(await inbound(bus), chat(1)) == [], "x-1 overtook x-0"
        assert "x-1" not in b_events.entered
        # And once A relays x-0, x-1 follows it
        gate.set()
        await a_closing

        async def chat_relayed() -> bool:
            return len(texts_of(await inbound(bus), chat(1))) == 2

        await wait_until(chat_relayed, timeout=30, what="chat X to be relayed")
    assert texts_of(await inbound(bus), chat(1)) == ["x-0", "x-1"]
