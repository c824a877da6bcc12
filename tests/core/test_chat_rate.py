"""A chat's inbound rate (issue 11 item 5): over the budget a message is held and answered
later in order (`hold`), or recorded as MessageRefused without reaching the model
(`refuse`); the budget lives in the chat's record."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta

import pytest

from contracts import subjects
from contracts.events import MessageReceived, MessageRefused, SendMessage, TurnCompleted
from services.core.chats import ChatStore
from services.core.flood import gate
from services.core.llm import EchoLLM
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.settings import CoreSettings, RateLimit, load_settings
from tests.conftest import read_stream, wait_until
from tests.core.wiring import core_worker

CHAT = "flood@s.whatsapp.net"
OTHER = "calm@s.whatsapp.net"


def inbound(text: str, chat: str = CHAT) -> MessageReceived:
    return MessageReceived(account="acct", chat=chat, sender=chat, message_id=text, text=text)


async def run_until_handled(bus: Bus, settings: CoreSettings, count: int, timeout: float) -> None:
    worker = core_worker(bus, EchoLLM(), settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    try:
        await wait_until(lambda: worker.loop.handled >= count, timeout, f"{count} handled")
    finally:
        stop.set()
        await task


# --- the budget, pure -------------------------------------------------------------------


def test_a_burst_runs_at_once_then_one_message_per_interval() -> None:
    limit = RateLimit(per_minute=60, burst=3)  # one a second, three at once
    tat, allowed = 0.0, []
    for _ in range(5):  # five messages arrive together at t=100
        verdict = gate(tat, 100.0, limit)
        allowed.append((verdict.allowed_at, verdict.conforming))
        tat = verdict.tat_after
    assert allowed == [(98.0, True), (99.0, True), (100.0, True), (101.0, False), (102.0, False)]
    # a message after a quiet minute is within the budget again
    assert gate(tat, 200.0, limit).conforming


def test_messages_sent_at_the_rate_are_never_held_however_late_they_are_handled() -> None:
    limit = RateLimit(per_minute=60, burst=1)
    tat = 0.0
    for n in range(10):  # one a second: exactly the rate
        verdict = gate(tat, 100.0 + n, limit)
        assert verdict.conforming
        tat = verdict.tat_after


# --- the core, on a real server --------------------------------------------------------


async def test_refuse_records_message_refused_in_order_and_the_model_never_sees_them(
    bus: Bus,
) -> None:
    # Given a chat that sends 6 messages at once with a budget of 3, and a calm chat
    for n in range(6):
        msg = inbound(f"m{n}")
        await bus.publish(subjects.inbound("whatsapp", "acct", CHAT), msg)
    calm = inbound("hello", chat=OTHER)
    await bus.publish(subjects.inbound("whatsapp", "acct", OTHER), calm)
    settings = CoreSettings(chat_rate=RateLimit(per_minute=6, burst=3), chat_flood="refuse")
    # When the core handles them
    await run_until_handled(bus, settings, 7, timeout=30)
    # Then the first 3 are answered and the last 3 refused, each recorded once, in order
    outcomes = [
        (e.chat, "turn" if isinstance(e, TurnCompleted) else e.rule)  # type: ignore[union-attr]
        for _, e in await read_stream(bus, "AGENT")
        if isinstance(e, TurnCompleted | MessageRefused)
    ]
    assert [o for c, o in outcomes if c == CHAT] == ["turn"] * 3 + ["rate:chat"] * 3
    assert [o for c, o in outcomes if c == OTHER] == ["turn"]
    refused = [e for _, e in await read_stream(bus, "AGENT") if isinstance(e, MessageRefused)]
    assert [(r.message_id, r.sender, r.account) for r in refused] == [
        ("m3", CHAT, "acct"),
        ("m4", CHAT, "acct"),
        ("m5", CHAT, "acct"),
    ]
    # and no reply was made for a refused message
    jobs = [j for _, j in await read_stream(bus, "OUTBOUND") if isinstance(j, SendMessage)]
    assert sorted(j.text for j in jobs) == ["echo: hello", "echo: m0", "echo: m1", "echo: m2"]


async def test_hold_answers_every_message_in_order_no_sooner_than_the_budget_allows(
    bus: Bus,
) -> None:
    # Given 4 messages at once against a budget of 2 at once, then one a second
    sent = [inbound(f"m{n}") for n in range(4)]
    for msg in sent:
        await bus.publish(subjects.inbound("whatsapp", "acct", CHAT), msg)
    settings = CoreSettings(chat_rate=RateLimit(per_minute=60, burst=2), chat_flood="hold")
    # When the core handles them
    await run_until_handled(bus, settings, 4, timeout=30)
    # Then all 4 are answered, in order, the held ones no sooner than their slot
    turns = [e for _, e in await read_stream(bus, "AGENT") if isinstance(e, TurnCompleted)]
    assert [t.inbound_id for t in turns] == [m.id for m in sent]
    first = max(m.at for m in sent)
    assert turns[2].at >= first + timedelta(seconds=0.95)
    assert turns[3].at >= first + timedelta(seconds=1.95)
    # and the budget is kept in the chat's record, for every replica and restart
    state, _ = await ChatStore(bus).get(subjects.chat_key("whatsapp", "acct", CHAT), CHAT)
    assert state.last_seq == 4
    assert state.rate_tat == pytest.approx(sent[0].at.timestamp() + 4.0, abs=0.5)


async def test_a_message_sent_long_ago_at_a_calm_pace_is_not_held_when_handled_late(
    bus: Bus,
) -> None:
    # Given a backlog the core works through after an outage: 3 messages sent a minute apart
    long_ago = datetime.now(UTC) - timedelta(hours=1)
    for n in range(3):
        msg = MessageReceived(
            account="acct",
            chat=CHAT,
            sender=CHAT,
            message_id=f"m{n}",
            text=f"m{n}",
            at=long_ago + timedelta(minutes=n),
        )
        await bus.publish(subjects.inbound("whatsapp", "acct", CHAT), msg)
    settings = CoreSettings(chat_rate=RateLimit(per_minute=1, burst=1), chat_flood="refuse")
    await run_until_handled(bus, settings, 3, timeout=30)
    # Then none is refused: arrival times decide, not when the core got to them
    agent = [e for _, e in await read_stream(bus, "AGENT")]
    assert [type(e).__name__ for e in agent] == ["TurnCompleted"] * 3


# --- settings ---------------------------------------------------------------------------


def test_the_default_budget_is_20_a_minute_burst_10_held() -> None:
    core = load_settings({}).core
    assert (core.chat_rate, core.chat_flood) == (RateLimit(per_minute=20, burst=10), "hold")
    off = load_settings({"SVC_CHAT_RATE": "off", "SVC_CHAT_FLOOD": "refuse"}).core
    assert (off.chat_rate, off.chat_flood) == (None, "refuse")


@pytest.mark.parametrize(
    ("env", "needles"),
    [
        ({"SVC_CHAT_RATE": "fast"}, ["SVC_CHAT_RATE='fast'", "PER_MINUTE[:BURST]", "off"]),
        ({"SVC_CHAT_RATE": "20:0"}, ["SVC_CHAT_RATE='20:0'", "PER_MINUTE[:BURST]"]),
        ({"SVC_CHAT_FLOOD": "drop"}, ["SVC_CHAT_FLOOD='drop'", "hold, refuse"]),
        ({"SVC_ECHO_LATENCY_MS": "-1"}, ["SVC_ECHO_LATENCY_MS='-1'", "0 to 60000"]),
    ],
)
def test_a_bad_chat_setting_is_one_line_naming_the_variable_and_the_fix(
    env: dict[str, str], needles: list[str]
) -> None:
    with pytest.raises(ConfigError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message
