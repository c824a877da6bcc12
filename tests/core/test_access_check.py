"""The core's access check (issue 14 item 1) on a real server: a refused message never
reaches the model and is recorded as MessageRefused with its rule; under `approval` the
waiting reply goes out once per period, counted from the recorded requests (so a
restarted core does not send it again); an approval answers the waiting messages."""

from __future__ import annotations

import asyncio

from contracts import subjects
from contracts.events import (
    AccessModeSet,
    AccessRequested,
    AccessRuleAdded,
    MessageReceived,
    MessageRefused,
    SendMessage,
    TurnCompleted,
    derived_id,
)
from services.core.llm import ChatMessage, Completion, EchoLLM, ToolSpec
from services.ops.access import approve
from services.runtime.bus import Bus
from services.runtime.settings import CoreSettings
from tests.conftest import read_stream, wait_until
from tests.core.wiring import core_worker

ACCT = "acct"
ALICE = "15551234567@s.whatsapp.net"
MALLORY = "4477001122@s.whatsapp.net"
STRANGER = "33612345678@s.whatsapp.net"
WAITING = "Waiting for approval."


class CountingLLM(EchoLLM):
    """The echo model, remembering every user text it was asked about."""

    def __init__(self) -> None:
        super().__init__()
        self.asked: list[str] = []

    async def complete(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> Completion:
        self.asked.append(messages[-1].content)
        return await super().complete(messages, tools)


def inbound(sender: str, text: str) -> MessageReceived:
    return MessageReceived(
        id=derived_id("test-inbound", sender, text),
        account=ACCT,
        chat=sender,
        sender=sender,
        message_id=derived_id("wamid", sender, text),
        text=text,
    )


async def send(bus: Bus, *messages: MessageReceived) -> None:
    for m in messages:
        await bus.publish(subjects.inbound("whatsapp", ACCT, m.chat), m)


async def policy(bus: Bus, *events: AccessModeSet | AccessRuleAdded) -> None:
    for e in events:
        await bus.publish(subjects.access(e.channel, e.account), e)


async def outcomes(bus: Bus) -> dict[str, str]:
    """inbound id -> `turn` or the refusal's rule."""
    found: dict[str, str] = {}
    for _, e in await read_stream(bus, "AGENT"):
        if isinstance(e, TurnCompleted):
            found[e.inbound_id] = "turn"
        elif isinstance(e, MessageRefused):
            found[e.inbound_id] = e.rule
    return found


async def jobs_to(bus: Bus, chat: str) -> list[str]:
    return [
        j.text
        for _, j in await read_stream(bus, "OUTBOUND")
        if isinstance(j, SendMessage) and j.chat == chat
    ]


async def running_core(bus: Bus, llm: EchoLLM, settings: CoreSettings, count: int) -> None:
    """Run a core until it has handled `count` messages, then stop it."""
    worker = core_worker(bus, llm, settings)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    try:
        await wait_until(lambda: worker.loop.handled >= count, 30, f"{count} handled")
    finally:
        stop.set()
        await task


SETTINGS = CoreSettings(access_waiting_text=WAITING, access_waiting_period=3600)


async def test_a_blocked_or_unlisted_sender_never_reaches_the_model(bus: Bus) -> None:
    # Given an allowlist with alice, and mallory blocked channel-wide
    await policy(
        bus,
        AccessModeSet(account=ACCT, mode="allowlist"),
        AccessRuleAdded(account=ACCT, pattern="1555*", kind="allow"),
        AccessRuleAdded(pattern=MALLORY, kind="block"),
    )
    asked, refused, stranger = (
        inbound(ALICE, "hi"),
        inbound(MALLORY, "let me in"),
        inbound(STRANGER, "hello?"),
    )
    await send(bus, asked, refused, stranger)
    llm = CountingLLM()
    # When the core handles the three
    await running_core(bus, llm, SETTINGS, 3)
    # Then only alice reached the model and got a reply ...
    assert llm.asked == ["hi"]
    assert await jobs_to(bus, ALICE) == ["echo: hi"]
    assert await jobs_to(bus, MALLORY) == await jobs_to(bus, STRANGER) == []
    # ... and every message has its one outcome, a refusal naming the rule that decided
    assert await outcomes(bus) == {
        asked.id: "turn",
        refused.id: "access:block",
        stranger.id: "access:allowlist",
    }
    (blocked,) = [
        e for _, e in await read_stream(bus, "AGENT") if isinstance(e, MessageRefused)
        and e.sender == MALLORY
    ]  # fmt: skip
    assert (blocked.account, blocked.chat, blocked.message_id) == (
        ACCT,
        MALLORY,
        refused.message_id,
    )
    assert MALLORY in blocked.detail


async def test_the_waiting_reply_goes_out_once_per_period_even_across_a_core_restart(
    bus: Bus,
) -> None:
    # Given approval mode and a stranger who writes once
    await policy(bus, AccessModeSet(account=ACCT, mode="approval"))
    first = inbound(STRANGER, "one")
    await send(bus, first)
    llm = CountingLLM()
    await running_core(bus, llm, SETTINGS, 1)
    assert await jobs_to(bus, STRANGER) == [WAITING]
    # When a new core (nothing in memory) handles two more messages inside the period
    more = [inbound(STRANGER, "two"), inbound(STRANGER, "three")]
    await send(bus, *more)
    await running_core(bus, llm, SETTINGS, 2)
    # Then no second waiting reply went out, and nothing reached the model
    assert await jobs_to(bus, STRANGER) == [WAITING]
    assert llm.asked == []
    rules = await outcomes(bus)
    assert [rules[m.id] for m in (first, *more)] == ["access:approval"] * 3
    requests = [e for _, e in await read_stream(bus, "ACCESS") if isinstance(e, AccessRequested)]
    assert [(r.jid, bool(r.waiting_job)) for r in requests] == [
        (STRANGER, True),
        (STRANGER, False),
        (STRANGER, False),
    ]


async def test_an_approval_answers_the_waiting_messages_in_order_then_the_next_ones(
    bus: Bus,
) -> None:
    # Given a stranger's two messages waiting under approval
    await policy(bus, AccessModeSet(account=ACCT, mode="approval"))
    waiting = [inbound(STRANGER, "one"), inbound(STRANGER, "two")]
    await send(bus, *waiting)
    llm = CountingLLM()
    await running_core(bus, llm, SETTINGS, 2)
    # When the operator approves the stranger, who then writes again
    _, _, released = await approve(bus, STRANGER, "whatsapp", ACCT)
    assert released == [m.id for m in waiting]
    await send(bus, inbound(STRANGER, "three"))
    await running_core(bus, llm, SETTINGS, 3)
    # Then the waiting messages were answered, in order, before the new one
    assert llm.asked == ["one", "two", "three"]
    assert await jobs_to(bus, STRANGER) == [WAITING, "echo: one", "echo: two", "echo: three"]
    # And each received message has exactly one outcome (the audit at teardown agrees)
    rules = await outcomes(bus)
    assert [rules[m.id] for m in waiting] == ["access:approval"] * 2
    assert sorted(rules.values()).count("turn") == 3


async def test_a_group_is_let_in_by_its_jid_and_inside_it_the_mention_rule_applies(
    bus: Bus,
) -> None:
    # Given an allowlist that lets one group in (not its members one by one)
    group, other = "120363000000000001@g.us", "120363000000000002@g.us"
    await policy(
        bus,
        AccessModeSet(account=ACCT, mode="allowlist"),
        AccessRuleAdded(account=ACCT, pattern=group, kind="allow"),
    )

    def said(chat: str, text: str, *, mentioned: bool) -> MessageReceived:
        return MessageReceived(
            id=derived_id("test-group", chat, text),
            account=ACCT,
            chat=chat,
            sender=STRANGER,
            message_id=derived_id("wamid", chat, text),
            text=text,
            is_group=True,
            mentioned=mentioned,
        )

    asked = said(group, "bot, hi", mentioned=True)
    chatter = said(group, "just chatting", mentioned=False)
    elsewhere = said(other, "bot, hi there", mentioned=True)
    await send(bus, asked, chatter, elsewhere)
    llm = CountingLLM()
    # When the core handles them
    await running_core(bus, llm, SETTINGS, 3)
    # Then only the mention in the allowed group reached the model; the chatter is skipped
    # as before, and the group that is not allowed is refused -- with no reply into it
    assert llm.asked == ["bot, hi"]
    rules = await outcomes(bus)
    assert [rules[m.id] for m in (asked, chatter, elsewhere)] == [
        "turn",
        "turn",
        "access:allowlist",
    ]
    skipped = [
        e.skipped for _, e in await read_stream(bus, "AGENT")
        if isinstance(e, TurnCompleted) and e.inbound_id == chatter.id
    ]  # fmt: skip
    assert skipped == ["group message without a mention"]
    assert await jobs_to(bus, other) == []


async def test_a_policy_change_applies_to_the_next_message_without_a_periodic_read(
    bus: Bus,
) -> None:
    # Given a running core that answered alice (its periodic re-read out of reach)
    llm = CountingLLM()
    worker = core_worker(bus, llm, SETTINGS)
    worker.access.recheck = 3600.0
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    try:
        first = inbound(ALICE, "hi")
        await send(bus, first)
        await wait_until(lambda: worker.loop.handled == 1, 30, "alice's first turn")
        # When alice is blocked (the change acknowledged) and then writes again
        await policy(bus, AccessRuleAdded(account=ACCT, pattern=ALICE, kind="block"))
        second = inbound(ALICE, "still there?")
        await send(bus, second)
        await wait_until(lambda: worker.loop.handled == 2, 30, "alice's second message")
    finally:
        stop.set()
        await task
    # Then the change, seen on the gate's subscription, refused the second message
    assert llm.asked == ["hi"]
    assert await outcomes(bus) == {first.id: "turn", second.id: "access:block"}
    # and the subscription's buffer was emptied with its byte count (a count that only
    # grew would end in nats-py dropping changes as a slow consumer)
    changes = worker.access._changes
    assert changes is not None
    assert (changes.pending_msgs, changes.pending_bytes) == (0, 0)
