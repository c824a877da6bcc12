"""A malformed inbound message is dead-lettered in its chat's turn (issue 12 item 4).

The consumer loop decodes at the edge, so a payload that does not decode never reaches the
core's handler (which waits for the chat's turn): the dead-letter hook must wait for it
instead. Advancing the chat past the malformed message while an earlier one is still in
flight would let the message after it overtake the earlier one and drop its history.
"""

from __future__ import annotations

import asyncio

from contracts import subjects
from contracts.events import DeadLettered, MessageReceived, SendMessage
from contracts.streams import CORE_CONSUMER, INBOUND
from services.core.llm import ChatMessage, Completion, EchoLLM, ToolSpec
from services.core.worker import CoreWorker
from services.runtime.bus import Bus
from services.runtime.consumer import Delivery
from tests.conftest import read_stream, wait_until
from tests.core.wiring import default_tools

CHAT = "alice@s.whatsapp.net"


def inbound(text: str) -> MessageReceived:
    return MessageReceived(
        account="acct", chat=CHAT, sender=CHAT, message_id=f"m-{text}", text=text
    )


class GatedLLM(EchoLLM):
    """Echo; the answer to the prompt `held` waits until `release` is set."""

    def __init__(self, held: str) -> None:
        super().__init__()
        self.held = held
        self.waiting = asyncio.Event()
        self.release = asyncio.Event()
        self.prompts: dict[str, list[ChatMessage]] = {}

    async def complete(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> Completion:
        text = messages[-1].content
        self.prompts[text] = list(messages)
        if text == self.held:
            self.waiting.set()
            await self.release.wait()  # the model is slow on this one
        return await super().complete(messages, tools)


class HookWatched(CoreWorker):
    """A core replica that counts how often its dead-letter hook ended (either way)."""

    hooks_ended = 0

    async def dead_lettered(self, d: Delivery, reason: str) -> None:
        try:
            await super().dead_lettered(d, reason)
        finally:
            self.hooks_ended += 1


async def test_a_malformed_message_waits_for_its_turn_and_the_next_one_keeps_order_and_history(
    bus: Bus,
) -> None:
    subject = subjects.inbound("whatsapp", "acct", CHAT)
    llm = GatedLLM(held="one")
    # Given replica A in the middle of the chat's first turn (the model is slow)
    a = CoreWorker(bus, llm, tools=default_tools(bus))
    stop_a, stop_b = asyncio.Event(), asyncio.Event()
    task_a = asyncio.create_task(a.loop.run(stop_a))
    await bus.publish(subject, inbound("one"))
    await asyncio.wait_for(llm.waiting.wait(), 30)
    stop_a.set()  # A fetches nothing more; it finishes the turn in hand
    await wait_until(lambda: _no_pull_waiting(bus), what="A's last fetch over")
    # and replica B handed the chat's next two messages: one malformed, one valid
    b = HookWatched(bus, llm, tools=default_tools(bus), turn_wait=0.5)
    task_b = asyncio.create_task(b.loop.run(stop_b))
    try:
        await bus.publish_bytes(subject, b'{"type": "MessageReceived", "text": 5}', msg_id="bad")
        await bus.publish(subject, inbound("three"))
        # When B has tried to dead-letter the malformed one while "one" is still in flight
        await wait_until(lambda: b.hooks_ended >= 1, timeout=30, what="the dead-letter hook")
        llm.release.set()
        await wait_until(
            lambda: a.loop.handled == 1 and b.loop.handled == 1 and b.loop.dead_lettered == 1,
            timeout=60,
            what="both turns and the dead letter",
        )
    finally:
        llm.release.set()
        stop_b.set()
        await asyncio.gather(task_a, task_b)
    # Then the replies went out in the chat's order
    jobs = [j for _, j in await read_stream(bus, "OUTBOUND") if isinstance(j, SendMessage)]
    assert [j.text for j in jobs] == ["echo: one", "echo: three"]
    # and the turn after the malformed message saw the first exchange in its history
    history = [(m.role, m.content) for m in llm.prompts["three"]]
    assert ("user", "one") in history
    assert ("assistant", "echo: one") in history
    # and the malformed message is in the dead letters, with a one-line reason
    ((_, letter),) = await read_stream(bus, "DEADLETTER")
    assert isinstance(letter, DeadLettered)
    assert letter.reason.startswith("DecodeError: invalid MessageReceived")
    assert "\n" not in letter.reason


async def _no_pull_waiting(bus: Bus) -> bool:
    info = await bus.js.consumer_info(INBOUND.name, CORE_CONSUMER)
    return info.num_waiting == 0
