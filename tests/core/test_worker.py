"""The core worker against a real server: one turn per inbound, no duplicates on redelivery."""

from __future__ import annotations

import asyncio

from contracts import subjects
from contracts.events import MessageReceived, SendMessage, TurnCompleted
from services.core.llm import EchoLLM
from services.runtime.bus import Bus
from tests.conftest import read_stream, wait_until
from tests.core.wiring import core_worker


def inbound(text: str, chat: str = "alice@s.whatsapp.net") -> MessageReceived:
    return MessageReceived(
        account="acct", chat=chat, sender=chat, message_id=f"m-{text}", text=text
    )


async def test_an_inbound_message_becomes_a_turn_and_a_job(bus: Bus) -> None:
    worker = core_worker(bus, EchoLLM())
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    msg = inbound("hello")
    await bus.publish(subjects.inbound("whatsapp", "acct", msg.chat), msg)
    await wait_until(lambda: worker.loop.handled == 1, what="turn")
    stop.set()
    await task
    ((subject, record),) = await read_stream(bus, "AGENT")
    ((job_subject, job),) = await read_stream(bus, "OUTBOUND")
    assert subject == "agent.whatsapp.acct.alice@s~2Ewhatsapp~2Enet"
    assert isinstance(record, TurnCompleted)
    assert record.inbound_id == msg.id
    assert isinstance(job, SendMessage)
    assert job_subject == "outbound.whatsapp.acct.alice@s~2Ewhatsapp~2Enet"
    assert job.text == "echo: hello"
    assert record.reply_ids == [job.job_id]


async def test_a_redelivered_inbound_creates_no_second_turn_or_job(bus: Bus) -> None:
    # Given the same inbound event stored twice (as a redelivery would present it)
    msg = inbound("once")
    subject = subjects.inbound("whatsapp", "acct", msg.chat)
    await bus.publish(subject, msg, msg_id="copy-1")
    await bus.publish(subject, msg, msg_id="copy-2")
    worker = core_worker(bus, EchoLLM())
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    await wait_until(lambda: worker.loop.handled == 2, what="both copies handled")
    stop.set()
    await task
    # Then exactly one turn and one job exist
    assert len(await read_stream(bus, "AGENT")) == 1
    assert len(await read_stream(bus, "OUTBOUND")) == 1


async def test_turns_of_each_chat_follow_arrival_order(bus: Bus) -> None:
    texts = [f"m{i}" for i in range(30)]
    for t in texts:
        msg = inbound(t, chat=f"c{int(t[1:]) % 3}@s.whatsapp.net")
        await bus.publish(subjects.inbound("whatsapp", "acct", msg.chat), msg)
    worker = core_worker(bus, EchoLLM())
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    await wait_until(lambda: worker.loop.handled == 30, what="30 turns")
    stop.set()
    await task
    jobs = [j for _, j in await read_stream(bus, "OUTBOUND") if isinstance(j, SendMessage)]
    for c in range(3):
        chat = f"c{c}@s.whatsapp.net"
        expected = [f"echo: {t}" for t in texts if int(t[1:]) % 3 == c]
        assert [j.text for j in jobs if j.chat == chat] == expected
