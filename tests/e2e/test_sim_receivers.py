"""Several `svc run whatsapp-ingress` receivers on the sim, as real processes (issue 17
item 4, ADR 0034): they pull one account's SIM durable with a window, chats in parallel,
and still store every message once, each chat in the order its user sent it -- also when
one receiver is killed -9 mid-traffic."""

from __future__ import annotations

import os
import signal
from collections import Counter, defaultdict

import pytest

from contracts.events import MessageReceived
from contracts.streams import SIM, sim_consumer
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from tests.conftest import Processes, read_stream, wait_until
from tests.e2e.conftest import consumers_ready

pytestmark = pytest.mark.slow

CHATS, PER_CHAT = 20, 20


async def test_three_receivers_and_a_kill_9_store_each_message_once_in_per_chat_order(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    processes.start("run", "core", NATS_URL=url)
    receivers = [processes.start("run", "whatsapp-ingress", NATS_URL=url) for _ in range(3)]
    await wait_until(
        lambda: consumers_ready(bus, (SIM.name, sim_consumer("default"))),
        timeout=60,
        what="the receivers' consumer",
    )
    sent: dict[str, list[str]] = defaultdict(list)
    async with SimUser(bus, "default") as user:
        for i in range(CHATS * PER_CHAT):
            chat = f"1555{i % CHATS:07d}@s.whatsapp.net"
            text = f"{chat} says {i}"
            await user.send(chat, text)
            sent[chat].append(text)
            if i == CHATS * PER_CHAT // 3:
                os.kill(receivers[0].pid, signal.SIGKILL)

    async def received() -> list[MessageReceived]:
        return [m for _, m in await read_stream(bus, "INBOUND") if isinstance(m, MessageReceived)]

    async def all_stored() -> bool:
        return len({m.message_id for m in await received()}) == CHATS * PER_CHAT

    await wait_until(all_stored, timeout=120, what="every message in INBOUND")
    stored = await received()
    # every message exactly once
    assert Counter(m.message_id for m in stored).most_common(1)[0][1] == 1
    assert len(stored) == CHATS * PER_CHAT
    # per chat, INBOUND order == the order its user sent
    by_chat: dict[str, list[str]] = defaultdict(list)
    for m in stored:
        by_chat[m.chat].append(m.text)
    assert dict(by_chat) == dict(sent)
