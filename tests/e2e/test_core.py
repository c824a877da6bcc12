"""The core with real `svc run core` replicas: per-chat order across replicas, exactly one
answer per message (also through a kill -9), history shared between replicas."""

from __future__ import annotations

import os
import signal
from collections import Counter, defaultdict

import pytest

from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from tests.conftest import Processes, wait_until
from tests.e2e.conftest import SimNetwork, consumers_ready, turn_records

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("kill_one", [False, True], ids=["steady", "kill-9-midway"])
async def test_two_core_replicas_answer_each_message_once_in_per_chat_order(
    processes: Processes, served: tuple[str, Bus], kill_one: bool
) -> None:
    url, bus = served
    processes.start("run", "whatsapp", NATS_URL=url)
    cores = [processes.start("run", "core", NATS_URL=url) for _ in range(2)]
    await wait_until(lambda: consumers_ready(bus), what="owner and core consumers")
    sent: dict[str, list[str]] = defaultdict(list)
    async with SimNetwork(bus, "default") as net, SimUser(bus, "default") as user:
        for i in range(200):
            chat = f"u{i % 20}@s.whatsapp.net"
            await user.send(chat, f"{chat} says {i}")
            sent[chat].append(f"echo: {chat} says {i}")
            if kill_one and i == 80:
                os.kill(cores[0].pid, signal.SIGKILL)
        await net.wait(lambda: len(net.job_ids()) >= 200, 90, "200 replies")
    replies = await net.recorded()
    # each message answered exactly once
    assert Counter(r.text for r in replies).most_common(1)[0][1] == 1
    assert len(replies) == 200
    # per-chat reply order equals arrival order
    by_chat: dict[str, list[str]] = defaultdict(list)
    for r in replies:
        by_chat[r.chat].append(r.text)
    assert dict(by_chat) == dict(sent)
    # A turn's record is published after its reply jobs: the last replies can reach the
    # network before their turn records are stored. Wait for all 200 of them.
    turns = await turn_records(bus, 200)
    assert len({t.inbound_id for t in turns}) == len(turns) == 200


async def test_a_turn_sees_the_previous_exchange_made_by_another_replica(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    processes.start("run", "whatsapp", NATS_URL=url)
    first_core = processes.start("run", "core", NATS_URL=url)
    await wait_until(lambda: consumers_ready(bus), what="owner and core consumers")
    async with SimUser(bus, "default") as user:
        first = await user.send("ana@s.whatsapp.net", "my name is Ana")
        assert await user.wait_replies(20)
        # the first replica goes away; a second one takes the next turn
        assert processes.stop(first_core) == 0
        processes.start("run", "core", NATS_URL=url)
        second = await user.send("ana@s.whatsapp.net", "!history")
        assert await user.wait_replies(20)
    assert first.reply is not None
    assert second.reply is not None
    assert second.reply.text == (
        "echo: history: user: my name is Ana | assistant: echo: my name is Ana"
    )


async def test_the_echo_tool_syntax_drives_a_real_tool_call_end_to_end(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    processes.start("run", "all", NATS_URL=url)
    await wait_until(lambda: consumers_ready(bus), what="owner and core consumers")
    async with SimUser(bus, "default") as user:
        asked = await user.send(
            "bo@s.whatsapp.net", '!tool calculator.evaluate {"expression": "6*7"}'
        )
        assert await user.wait_replies(20)
    assert asked.reply is not None
    assert asked.reply.text == "echo: calculator.evaluate -> 42"
    (turn,) = await turn_records(bus, 1)
    (call,) = turn.tools_called
    assert (call.name, call.arguments, call.error) == (
        "calculator.evaluate",
        {"expression": "6*7"},
        None,
    )
