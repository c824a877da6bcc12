"""Typing and read receipts across separate processes (issue 14 item 4, ADR 0025).

`svc run core` publishes presence commands on plain NATS; `svc run whatsapp` (the owner)
shows them on the sim network, which publishes what it saw on
`sim.whatsapp.<account>.presence`. One subscription on the account's sim subjects sees
presence and sends in the order the owner's connection published them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from nats.aio.msg import Msg

from contracts.codec import decode
from contracts.events import TurnFailed
from contracts.payloads import SimOutbound, SimPresence
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from tests.conftest import Processes, read_stream, wait_until
from tests.core.test_openai import FakeOpenAI
from tests.e2e.conftest import consumers_ready, holder_of

pytestmark = pytest.mark.slow

ALICE = "15550001111@s.whatsapp.net"


@dataclass
class SimWire:
    """What the sim network saw one account do, in order: ("read"|"typing"|"paused", ids)
    for presence, ("out", text) for a send."""

    bus: Bus
    account: str
    seen: list[tuple[str, str]] = field(default_factory=list)

    async def __aenter__(self) -> SimWire:
        self._sub = await self.bus.nc.subscribe(f"sim.whatsapp.{self.account}.*", cb=self._on)
        await self.bus.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._sub.unsubscribe()

    async def _on(self, msg: Msg) -> None:
        kind = msg.subject.rsplit(".", 1)[-1]
        if kind == "presence":
            shown = decode(msg.data, SimPresence)
            self.seen.append((shown.action, ",".join(shown.message_ids)))
        elif kind == "out":
            self.seen.append(("out", decode(msg.data, SimOutbound).text))

    def actions(self) -> list[str]:
        return [action for action, _ in self.seen]


async def _ready(bus: Bus, *accounts: str) -> bool:
    consumers = [("SIM", f"sim-in-{a}") for a in accounts] + [("INBOUND", "core")]
    if not await consumers_ready(bus, *consumers):
        return False
    return all([await holder_of(bus, a) is not None for a in accounts])


async def test_a_turn_shows_read_then_typing_then_the_reply_and_off_shows_nothing(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    # Given an owner and a core as separate processes: account `default` with presence on
    # (the default), account `quiet` with it off (SVC_PRESENCE_ACCOUNTS)
    env = {
        "NATS_URL": url,
        "WHATSAPP_ACCOUNTS": "default,quiet",
        "SVC_PRESENCE_ACCOUNTS": "quiet=off",
        "SVC_ECHO_LATENCY_MS": "200",  # a model's thinking time, while "typing..." shows
    }
    processes.start("run", "whatsapp", **env)
    processes.start("run", "core", **env)
    await wait_until(lambda: _ready(bus, "default", "quiet"), 60, "owners and the core")
    async with SimWire(bus, "default") as wire, SimWire(bus, "quiet") as quiet:
        async with SimUser(bus, "default") as user, SimUser(bus, "quiet") as other:
            # When a user writes to each account
            asked = await user.send(ALICE, "hello")
            await other.send(ALICE, "hello quietly")
            assert await user.wait_replies(30)
            assert await other.wait_replies(30)
        # Then the network saw, for `default`: the message read, typing, then the reply
        await wait_until(lambda: "out" in wire.actions(), what="the reply on the wire")
        assert wire.seen == [
            ("read", asked.message_id),
            ("typing", ""),
            ("out", "echo: hello"),
        ]
        # ... and for `quiet` (SVC_PRESENCE off): the reply and no presence at all (a
        # presence command is published before the turn's job, so it would be here)
        await wait_until(lambda: "out" in quiet.actions(), what="the quiet reply on the wire")
        assert quiet.seen == [("out", "echo: hello quietly")]


def refusing_model() -> FakeOpenAI:
    """A stand-in OpenAI endpoint that refuses every prompt (HTTP 400): turns fail."""
    return FakeOpenAI([(400, {"error": {"message": "refused", "type": "invalid"}})] * 20)


async def test_a_failed_turn_leaves_no_typing_on(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    with refusing_model() as model:
        # Given a core whose model refuses every prompt, and no fallback reply
        processes.start("run", "whatsapp", NATS_URL=url)
        processes.start(
            "run",
            "core",
            NATS_URL=url,
            SVC_LLM="openai",
            OPENAI_BASE_URL=model.url,
            OPENAI_API_KEY="test-key",
            SVC_LLM_RETRIES="0",
            SVC_FALLBACK_REPLY="",
            NO_PROXY="127.0.0.1,localhost",
            HTTP_PROXY="",
            http_proxy="",
        )
        await wait_until(lambda: _ready(bus, "default"), 60, "an owner and the core")
        async with SimWire(bus, "default") as wire, SimUser(bus, "default") as user:
            # When a user writes and the turn fails
            asked = await user.send(ALICE, "hello?")
            await wait_until(lambda: _failed(bus), 30, "TurnFailed recorded")
            # Then the network saw read, typing, then paused: no typing left on
            await wait_until(lambda: "paused" in wire.actions(), what="typing cleared")
        assert wire.seen == [("read", asked.message_id), ("typing", ""), ("paused", "")]


async def _failed(bus: Bus) -> bool:
    return any(isinstance(e, TurnFailed) for _, e in await read_stream(bus, "AGENT"))
