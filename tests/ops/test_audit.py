"""`svc audit`: each rule catches a violation crafted by publishing the offending events
into a fresh system, names the offending event ids, and stays quiet on a consistent log.

(Every other test that uses the `bus` or `served` fixture also runs the audit over the log
it leaves behind and fails on any violation: that is the "zero on the end-to-end logs"
half of the story.)
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import msgspec
import pytest

from contracts import subjects
from contracts.codec import encode
from contracts.events import (
    DeadLettered,
    DeliveryDeadLettered,
    DeliveryUncertain,
    LeaseAcquired,
    LeaseReleased,
    MessageReceived,
    MessageRefused,
    MessageSent,
    SendMessage,
    TurnCompleted,
    derived_id,
)
from contracts.payloads import SimOutbound
from projections.audit import Auditor
from projections.replay import parse_when
from services.core import turn
from services.ops.audit import Scope, audit, render, to_builtins
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import arun_svc

ACCOUNT = "acct-a"
CHAT = "alice@s.whatsapp.net"
T0 = datetime(2026, 11, 26, 10, 0, 0, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


class Log:
    """Publishes a story's events where the system would have put them."""

    def __init__(self, bus: Bus, account: str = ACCOUNT) -> None:
        self.bus = bus
        self.account = account
        self.n = 0

    async def lease(self, holder: str, token: int, when: float) -> LeaseAcquired:
        event = LeaseAcquired(account=self.account, holder=holder, token=token, at=at(when))
        await self.bus.publish(subjects.accounts("whatsapp", self.account), event)
        return event

    async def released(self, holder: str, token: int, when: float) -> LeaseReleased:
        event = LeaseReleased(account=self.account, holder=holder, token=token, at=at(when))
        await self.bus.publish(subjects.accounts("whatsapp", self.account), event)
        return event

    async def inbound(self, text: str, chat: str = CHAT) -> MessageReceived:
        self.n += 1
        event = MessageReceived(
            account=self.account, chat=chat, sender=chat, message_id=f"m{self.n}", text=text
        )
        await self.bus.publish(subjects.inbound("whatsapp", self.account, chat), event)
        return event

    async def turn(self, inbound: MessageReceived, *jobs: str) -> TurnCompleted:
        event = TurnCompleted(
            id=derived_id("turn", inbound.id),
            account=self.account,
            chat=inbound.chat,
            inbound_id=inbound.id,
            model="echo",
            reply_ids=list(jobs),
        )
        await self.bus.publish(subjects.agent("whatsapp", self.account, inbound.chat), event)
        return event

    async def sent(
        self,
        job_id: str,
        holder: str,
        token: int,
        when: float,
        *,
        job_seq: int = 0,
        chat: str = CHAT,
        transport_id: str = "",
        event_id: str | None = None,
    ) -> MessageSent:
        event = MessageSent(
            id=event_id or derived_id("sent", job_id),
            job_id=job_id,
            account=self.account,
            chat=chat,
            holder=holder,
            lease_token=token,
            transport_message_id=transport_id or f"wa-{job_id}",
            job_seq=job_seq,
            sent_at=at(when),
            text=f"reply {job_id}",
        )
        await self.bus.publish(subjects.delivery("whatsapp", self.account, chat), event)
        return event

    async def job(self, job_id: str, chat: str = CHAT) -> SendMessage:
        job = SendMessage(id=job_id, job_id=job_id, account=self.account, chat=chat, text="hi")
        await self.bus.publish(subjects.outbound("whatsapp", self.account, chat), job)
        return job


async def run(bus: Bus, **scope: object) -> dict[str, object]:
    report, elapsed = await audit(bus, Scope(**scope))  # type: ignore[arg-type]
    data = to_builtins(report, elapsed, Scope(**scope))  # type: ignore[arg-type]
    assert render(report, elapsed, Scope(**scope))  # type: ignore[arg-type]
    return data


def violations(data: dict[str, object], rule: str) -> list[dict[str, object]]:
    return data["rules"][rule]["violations"]  # type: ignore[index,no-any-return]


async def a_consistent_story(log: Log) -> None:
    await log.lease("h1", 1, 0)
    first = await log.inbound("hello")
    await log.turn(first, "j1", "j2")
    await log.sent("j1", "h1", 1, 1, job_seq=1)
    await log.sent("j2", "h1", 1, 2, job_seq=2)
    await log.released("h1", 1, 3)
    await log.lease("h2", 4, 4)
    second = await log.inbound("again")
    await log.turn(second, "j3")
    await log.sent("j3", "h2", 4, 5, job_seq=3)


# --- a consistent log -----------------------------------------------------------------


async def test_a_consistent_log_passes_every_rule(bus: Bus) -> None:
    await a_consistent_story(Log(bus))
    data = await run(bus, grace=0)
    assert data["ok"] is True
    assert all(r["ok"] for r in data["rules"].values())  # type: ignore[attr-defined]
    assert data["events"] == {"ACCOUNTS": 3, "INBOUND": 2, "AGENT": 2, "DELIVERY": 3}
    timeline = data["summary"]["leases"][ACCOUNT]  # type: ignore[index]
    assert [(e["event"], e["holder"], e["token"]) for e in timeline] == [
        ("acquired", "h1", 1),
        ("released", "h1", 1),
        ("acquired", "h2", 4),
    ]


# --- split-brain ------------------------------------------------------------------------


@pytest.mark.audit_violations
async def test_a_send_under_a_lower_token_after_a_higher_one_is_split_brain(bus: Bus) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    await log.lease("h2", 5, 10)
    newer = await log.sent("j1", "h2", 5, 11, job_seq=1)
    stale = await log.sent("j2", "h1", 1, 12, job_seq=2)  # the old holder woke up and sent
    found = violations(await run(bus), "split-brain")
    assert any({newer.id, stale.id} <= set(v["event_ids"]) for v in found), found
    assert all(v["account"] == ACCOUNT for v in found)


@pytest.mark.audit_violations
async def test_a_send_that_began_after_the_lease_passed_on_is_split_brain(bus: Bus) -> None:
    # Given the old holder's only send began after a newer lease was granted
    log = Log(bus)
    await log.lease("h1", 1, 0)
    newer = await log.lease("h2", 5, 10)
    late = await log.sent("j1", "h1", 1, 10.5, job_seq=1)
    found = violations(await run(bus), "split-brain")
    assert [v["event_ids"] for v in found] == [[late.id, newer.id]]
    assert "after the lease passed to h2" in str(found[0]["message"])


@pytest.mark.audit_violations
async def test_one_token_used_by_two_holders_is_split_brain(bus: Bus) -> None:
    log = Log(bus)
    await log.lease("h1", 3, 0)
    a = await log.sent("j1", "h1", 3, 1, job_seq=1)
    b = await log.sent("j2", "h2", 3, 2, job_seq=2)
    found = violations(await run(bus), "split-brain")
    assert any(v["event_ids"] == [a.id, b.id] and "two holders" in v["message"] for v in found)
    # h2 was never granted token 3 either
    assert any(b.id in v["event_ids"] and "never granted" in v["message"] for v in found)


@pytest.mark.audit_violations
async def test_a_send_after_its_holder_released_the_lease_is_split_brain(bus: Bus) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    released = await log.released("h1", 1, 5)
    late = await log.sent("j1", "h1", 1, 6, job_seq=1)
    found = violations(await run(bus), "split-brain")
    assert [v["event_ids"] for v in found] == [[late.id, released.id]]


@pytest.mark.audit_violations
async def test_the_sim_networks_own_record_is_checked_too(bus: Bus) -> None:
    # Given the network accepted a send under token 2 after one under token 7
    for token in (7, 2):
        sent = SimOutbound(
            chat=CHAT, text="x", job_id=f"j{token}", holder=f"h{token}", lease_token=token
        )
        await bus.publish_bytes(subjects.sim_out(ACCOUNT), encode(sent), msg_id=f"n{token}")
    found = violations(await run(bus), "split-brain")
    assert [v["refs"] for v in found] == [["SIM_OUT:1", "SIM_OUT:2"]]


# --- lost -------------------------------------------------------------------------------


@pytest.mark.audit_violations
async def test_a_message_with_no_turn_is_lost_once_past_the_grace(bus: Bus) -> None:
    log = Log(bus)
    answered = await log.inbound("answered")
    await log.turn(answered)
    orphan = await log.inbound("never answered")
    assert (await run(bus, grace=3600))["ok"] is True  # still within the grace
    found = violations(await run(bus, grace=0), "lost")
    assert [v["event_ids"] for v in found] == [[orphan.id]]
    assert found[0]["refs"] == ["INBOUND:2"]


@pytest.mark.audit_violations
async def test_a_message_the_core_acked_without_a_turn_is_lost_whatever_the_grace(
    bus: Bus,
) -> None:
    # Given a core consumer that acked the message without recording a turn
    from nats.js.api import AckPolicy, ConsumerConfig

    orphan = await Log(bus).inbound("swallowed")
    await bus.js.add_consumer(
        "INBOUND", ConsumerConfig(durable_name="core", ack_policy=AckPolicy.EXPLICIT)
    )
    sub = await bus.js.pull_subscribe_bind("core", "INBOUND")
    for msg in await sub.fetch(1, timeout=5):
        await msg.ack_sync()
    # Then even with a long grace it is lost, and the reason says the core acked it
    found = violations(await run(bus, grace=3600), "lost")
    assert [v["event_ids"] for v in found] == [[orphan.id]]
    assert "the core acked it" in str(found[0]["message"])


@pytest.mark.audit_violations
async def test_a_job_with_no_outcome_that_left_the_queue_is_lost(bus: Bus) -> None:
    log = Log(bus)
    inbound = await log.inbound("hi")
    await log.turn(inbound, "j-sent", "j-dead", "j-queued", "j-gone")
    await log.sent("j-sent", "h1", 1, 1, job_seq=1)
    await bus.publish(
        subjects.delivery("whatsapp", ACCOUNT, CHAT),
        DeliveryDeadLettered(job_id="j-dead", account=ACCOUNT, chat=CHAT, reason="permanent"),
    )
    await log.job("j-queued")  # still waiting in the work queue: not lost
    found = violations(await run(bus, grace=0), "lost")
    assert [v["event_ids"] for v in found] == [["j-gone"]]
    assert "no longer queued" in str(found[0]["message"])


async def test_a_dead_lettered_message_is_not_lost(bus: Bus) -> None:
    inbound = await Log(bus).inbound("poison for the core")
    letter = DeadLettered(
        source_stream="INBOUND",
        source_subject=subjects.inbound("whatsapp", ACCOUNT, CHAT),
        source_seq=1,
        reason="malformed",
        source_msg_id=inbound.id,
    )
    await bus.publish(subjects.deadletter(letter.source_subject), letter)
    data = await run(bus, grace=0)
    assert data["ok"] is True
    assert data["summary"]["dead_letters"] == {"INBOUND": 1}  # type: ignore[index]


# --- duplicates -------------------------------------------------------------------------


@pytest.mark.audit_violations
async def test_a_job_sent_twice_without_an_uncertain_record_is_a_duplicate(bus: Bus) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    await log.lease("h2", 2, 5)
    first = await log.sent("j1", "h1", 1, 1, job_seq=1, event_id="sent-1")
    again = await log.sent("j1", "h2", 2, 6, job_seq=1, transport_id="wa-2", event_id="sent-2")
    data = await run(bus)
    found = violations(data, "duplicates")
    assert [(v["event_ids"], v["refs"]) for v in found] == [
        ([again.id], ["DELIVERY:1", "DELIVERY:2"])
    ]
    assert first.id != again.id
    assert data["rules"]["order"]["ok"] is True  # type: ignore[index]


async def test_a_resend_recorded_as_uncertain_is_allowed_and_summarised(bus: Bus) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    await log.lease("h2", 2, 5)
    await log.sent("j1", "h1", 1, 1, job_seq=1, event_id="sent-1")
    await bus.publish(
        subjects.delivery("whatsapp", ACCOUNT, CHAT),
        DeliveryUncertain(
            job_id="j1",
            account=ACCOUNT,
            chat=CHAT,
            holder="h1",
            lease_token=1,
            resolution="resend",
        ),
    )
    await log.sent("j1", "h2", 2, 6, job_seq=1, transport_id="wa-2", event_id="sent-2")
    data = await run(bus)
    assert data["ok"] is True
    assert data["rules"]["duplicates"]["checked"]["uncertain resends allowed"] == 1  # type: ignore[index]
    assert [u["job_id"] for u in data["summary"]["uncertain"]] == ["j1"]  # type: ignore[index]


@pytest.mark.audit_violations
async def test_a_job_the_network_accepted_twice_is_a_duplicate(bus: Bus) -> None:
    for n in (1, 2):
        sent = SimOutbound(chat=CHAT, text="x", job_id="j1", holder="h1", lease_token=1)
        await bus.publish_bytes(subjects.sim_out(ACCOUNT), encode(sent), msg_id=f"n{n}")
    found = violations(await run(bus), "duplicates")
    assert [v["refs"] for v in found] == [["SIM_OUT:1", "SIM_OUT:2"]]


@pytest.mark.audit_violations
async def test_two_turns_for_one_message_are_duplicates(bus: Bus) -> None:
    log = Log(bus)
    inbound = await log.inbound("hi")
    await log.turn(inbound)
    second = TurnCompleted(
        id="another-turn", account=ACCOUNT, chat=CHAT, inbound_id=inbound.id, model="echo"
    )
    await bus.publish(subjects.agent("whatsapp", ACCOUNT, CHAT), second)
    found = violations(await run(bus), "duplicates")
    assert [v["event_ids"] for v in found] == [[derived_id("turn", inbound.id), "another-turn"]]


# --- order ------------------------------------------------------------------------------


@pytest.mark.audit_violations
async def test_sends_out_of_enqueue_order_in_one_chat_are_reported(bus: Bus) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    other = "bob@s.whatsapp.net"
    early = await log.sent("j5", "h1", 1, 1, job_seq=5)
    late = await log.sent("j3", "h1", 1, 2, job_seq=3)  # enqueued before j5, sent after it
    await log.sent("j4", "h1", 1, 3, job_seq=4, chat=other)  # other chats do not matter
    found = violations(await run(bus), "order")
    assert [v["event_ids"] for v in found] == [[early.id, late.id]]
    assert found[0]["chat"] == CHAT


@pytest.mark.audit_violations
async def test_without_job_seq_the_turns_reply_order_is_the_enqueue_order(bus: Bus) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    inbound = await log.inbound("hi")
    await log.turn(inbound, "part-1", "part-2")
    second = await log.sent("part-2", "h1", 1, 1)
    first = await log.sent("part-1", "h1", 1, 2)
    found = violations(await run(bus), "order")
    assert [v["event_ids"] for v in found] == [[second.id, first.id]]


@pytest.mark.audit_violations
async def test_turns_out_of_arrival_order_are_reported(bus: Bus) -> None:
    log = Log(bus)
    first = await log.inbound("one")
    second = await log.inbound("two")
    await log.turn(second)
    late = await log.turn(first)
    found = violations(await run(bus), "order")
    assert [v["event_ids"][1] for v in found] == [late.id]


# --- bad input, scope -------------------------------------------------------------------


async def test_corrupt_and_foreign_payloads_are_skipped_and_counted(bus: Bus) -> None:
    await a_consistent_story(Log(bus))
    subject = subjects.delivery("whatsapp", ACCOUNT, CHAT)
    await bus.publish_bytes(subject, b'{"type": "MessageSent", "job_id": 7', msg_id="bad-1")
    await bus.publish_bytes(subject, b"\xff\xfe not json", msg_id="bad-2")
    data = await run(bus, grace=0)
    assert data["ok"] is True
    assert data["skipped"] == {"DELIVERY": 2}


def test_an_event_of_a_kind_its_stream_does_not_hold_is_skipped_not_a_crash() -> None:
    # The reader decodes each stream as its union; the Auditor is a public fold, and a
    # stray kind handed to it (a new event type, another caller) used to end the audit
    # with UnboundLocalError (mypy possibly-undefined, issue 12 item 5).
    auditor = Auditor()
    stray = MessageReceived(account=ACCOUNT, chat=CHAT, sender=CHAT, message_id="m1", text="x")
    auditor.account_event(1, at(0), stray)  # type: ignore[arg-type]
    auditor.dead_letter(1, at(0), stray)  # type: ignore[arg-type]
    auditor.delivery(1, at(0), stray)  # type: ignore[arg-type]
    auditor.account_event(2, at(1), LeaseAcquired(account=ACCOUNT, holder="h", token=1, at=at(1)))
    report = auditor.finish(at(2))
    assert report.skipped == {"ACCOUNTS": 1, "DEADLETTER": 1, "DELIVERY": 1}
    assert [e.event for e in report.leases[ACCOUNT]] == ["acquired"]
    assert report.violations == []


@pytest.mark.audit_violations
async def test_account_and_time_window_narrow_what_is_judged(bus: Bus) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    await log.lease("h2", 5, 10)
    await log.sent("j1", "h2", 5, 11, job_seq=1)
    stale = await log.sent("j2", "h1", 1, 20, job_seq=2)
    await a_consistent_story(Log(bus, "acct-b"))
    assert violations(await run(bus, account="acct-b"), "split-brain") == []
    assert violations(await run(bus, until=at(15)), "split-brain") == []
    found = violations(await run(bus, account=ACCOUNT, since=at(15)), "split-brain")
    assert found
    assert all(stale.id in v["event_ids"] for v in found)


def test_times_are_rfc3339_or_an_age() -> None:
    now = datetime(2026, 11, 26, 12, 0, tzinfo=UTC)
    assert parse_when("2026-11-26T10:00:00Z") == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parse_when("2026-11-26T10:00:00") == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parse_when("2h", now) == datetime(2026, 11, 26, 10, tzinfo=UTC)
    assert parse_when("1.5d", now) == now - timedelta(days=1.5)
    with pytest.raises(ValueError, match="RFC 3339"):
        parse_when("yesterday")


# --- the command ------------------------------------------------------------------------


@pytest.mark.audit_violations
async def test_svc_audit_exits_1_naming_the_offending_events(
    bus: Bus, nats_server: EmbeddedNats
) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    await log.lease("h2", 5, 10)
    await log.sent("j1", "h2", 5, 11, job_seq=1)
    stale = await log.sent("j2", "h1", 1, 12, job_seq=2)
    env = {"NATS_URL": nats_server.url, "PATH": "/usr/bin:/bin"}
    human = await arun_svc("audit", env=env)
    assert human.returncode == 1
    out = human.stdout.decode()
    assert "split-brain  VIOLATED" in out
    assert stale.id in out
    assert human.stderr.decode().strip() == "svc: 2 violation(s) found (see above)"
    as_json = await arun_svc("audit", "--json", "--account", ACCOUNT, env=env)
    assert as_json.returncode == 1
    assert json.loads(as_json.stdout)["rules"]["split-brain"]["ok"] is False


async def test_svc_audit_exits_0_on_a_clean_log_and_2_on_bad_input(
    bus: Bus, nats_server: EmbeddedNats
) -> None:
    await a_consistent_story(Log(bus))
    env = {"NATS_URL": nats_server.url, "PATH": "/usr/bin:/bin"}
    clean = await arun_svc("audit", "--grace", "0", env=env)
    assert clean.returncode == 0, clean.stderr
    assert "lost         ok" in clean.stdout.decode()
    bad = await arun_svc("audit", "--since", "last tuesday", env=env)
    assert bad.returncode == 2
    assert bad.stderr.decode().count("\n") == 1
    assert "RFC 3339" in bad.stderr.decode()
    bad_account = await arun_svc("audit", "--account", "no/slashes", env=env)
    assert bad_account.returncode == 2


async def test_a_send_recorded_late_is_judged_by_when_it_began(bus: Bus) -> None:
    # Given the old holder sent j1 in time but was paused before recording it: its record
    # lands after the new holder's sends (and after the new lease)
    log = Log(bus)
    await log.lease("h1", 1, 0)
    await log.lease("h2", 5, 10)
    await log.sent("j2", "h2", 5, 11, job_seq=2)
    await log.sent("j3", "h2", 5, 12, job_seq=3)
    await log.sent("j1", "h1", 1, 9, job_seq=1)  # began at 9 s, before the hand-over
    # Then neither fencing nor order is violated
    data = await run(bus)
    assert data["ok"] is True, data["rules"]


@pytest.mark.audit_violations
async def test_a_late_record_of_a_job_enqueued_after_the_next_one_is_out_of_order(
    bus: Bus,
) -> None:
    log = Log(bus)
    await log.lease("h1", 1, 0)
    later = await log.sent("j2", "h1", 1, 5, job_seq=2)
    earlier = await log.sent("j3", "h1", 1, 4, job_seq=3)  # began before j2, enqueued after
    found = violations(await run(bus), "order")
    assert [v["event_ids"] for v in found] == [[earlier.id, later.id]]


async def test_history_a_stream_no_longer_holds_is_not_judged_and_is_said(bus: Bus) -> None:
    # Given the lease to h1 and the outcome of job j1 were aged out of their streams
    log = Log(bus)
    await log.lease("h1", 1, 0)
    await log.lease("h2", 2, 5)
    inbound = await log.inbound("hello")
    await log.turn(inbound, "j1", "j2", "j3")
    await log.sent("j1", "h1", 1, 1, job_seq=1)
    await log.sent("j2", "h1", 1, 2, job_seq=2)  # kept: a send under the aged-out lease
    await log.sent("j3", "h2", 2, 6, job_seq=3)
    await bus.js.purge_stream("ACCOUNTS", keep=1)
    await bus.js.purge_stream("DELIVERY", keep=2)
    # When audited, nothing is called lost or unfenced for want of the missing history
    data = await run(bus, grace=0)
    assert data["ok"] is True, data["rules"]
    # and the report says which streams lost their beginning
    assert set(data["summary"]["history_starts"]) == {"ACCOUNTS", "DELIVERY"}  # type: ignore[call-overload]


@pytest.mark.audit_violations
async def test_with_its_history_whole_the_same_gap_is_a_violation(bus: Bus) -> None:
    # The control: the same story with j1's outcome and h1's lease never recorded
    log = Log(bus)
    await log.lease("h2", 2, 5)
    inbound = await log.inbound("hello")
    await log.turn(inbound, "j1", "j2")
    stale = await log.sent("j0", "h1", 1, 1, job_seq=1)
    await log.sent("j2", "h2", 2, 6, job_seq=2)
    data = await run(bus, grace=0)
    assert [v["event_ids"] for v in violations(data, "lost")] == [["j1"]]
    assert [v["event_ids"] for v in violations(data, "split-brain")] == [[stale.id]]


# --- replay (invariant 5) -----------------------------------------------------------------


async def test_the_plugin_projection_is_rebuilt_twice_and_compared(bus: Bus) -> None:
    from contracts.events import FactRemembered

    for n in range(5):
        fact = FactRemembered(account=ACCOUNT, chat=CHAT, key=f"k{n}", value="v")
        await bus.publish(subjects.memory("whatsapp", ACCOUNT), fact)
    data = await run(bus)
    replay = data["rules"]["replay"]  # type: ignore[index]
    assert replay["ran"] is True
    assert replay["checked"] == {
        "PLUGINS events": 5,
        "installed rows": 0,
        "policy rows": 0,
        "facts rows": 5,
    }
    assert (await run(bus, replay=False))["rules"]["replay"]["ran"] is False  # type: ignore[index]


@pytest.mark.audit_violations
async def test_a_projection_that_does_not_replay_the_same_is_caught(
    bus: Bus, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given an apply that is not deterministic (a bug this rule exists to catch)
    import itertools

    from contracts.events import FactRemembered
    from projections import plugins as view

    counter = itertools.count()
    real = view.apply

    def drifting(event: object) -> list[tuple[str, tuple[object, ...]]]:
        statements = real(event)  # type: ignore[arg-type]
        if isinstance(event, FactRemembered):
            return [
                (sql, (*params[:-1], f"{params[-1]}-{next(counter)}")) for sql, params in statements
            ]
        return statements

    monkeypatch.setattr(view, "apply", drifting)
    await bus.publish(
        subjects.memory("whatsapp", ACCOUNT),
        FactRemembered(account=ACCOUNT, chat=CHAT, key="k", value="v"),
    )
    found = violations(await run(bus), "replay")
    assert [v["refs"] for v in found] == [["PLUGINS:1"]]
    assert "facts" in str(found[0]["message"])


async def test_svc_audit_counts_each_send_once_though_sender_and_network_both_record_it(
    bus: Bus, nats_server: EmbeddedNats
) -> None:
    # Given two replies, each recorded by the sender (DELIVERY MessageSent) and by the
    # network (SIM_OUT), as every sim send is
    log = Log(bus)
    await log.lease("h1", 1, 0)
    inbound = await log.inbound("hello")
    await log.turn(inbound, "j1", "j2")
    for n, job_id in enumerate(("j1", "j2"), start=1):
        await log.sent(job_id, "h1", 1, n, job_seq=n)
        sent = SimOutbound(chat=CHAT, text="x", job_id=job_id, holder="h1", lease_token=1)
        await bus.publish_bytes(subjects.sim_out(ACCOUNT), encode(sent), msg_id=f"n{n}")
    # When the operator asks for the numbers
    env = {"NATS_URL": nats_server.url, "PATH": "/usr/bin:/bin"}
    done = await arun_svc("audit", "--json", "--grace", "0", env=env)
    # Then two sends are counted, not four
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["rules"]["split-brain"]["checked"]["sends"] == 2
    assert data["events"]["DELIVERY"] == data["events"]["SIM_OUT"] == 2


def refusal(inbound: MessageReceived, event_id: str = "") -> MessageRefused:
    refused = turn.refused(inbound, "rate:chat")
    return msgspec.structs.replace(refused, id=event_id) if event_id else refused


async def test_a_refused_message_has_its_outcome_and_is_not_lost(bus: Bus) -> None:
    # Given a message the core refused (the chat's rate) after one it answered
    log = Log(bus)
    answered = await log.inbound("hello")
    await log.turn(answered)
    refused = await log.inbound("hello again")
    await bus.publish(subjects.agent("whatsapp", ACCOUNT, CHAT), refusal(refused))
    # When audited with no grace
    data = await run(bus, grace=0)
    # Then nothing is lost: the refusal ends the message like a turn does
    assert violations(data, "lost") == []
    assert violations(data, "duplicates") == []
    assert data["events"]["AGENT"] == 2  # type: ignore[index]


@pytest.mark.audit_violations
async def test_a_turn_and_a_refusal_for_one_message_are_duplicates(bus: Bus) -> None:
    log = Log(bus)
    inbound = await log.inbound("hi")
    turn = await log.turn(inbound)
    refused = refusal(inbound)
    await bus.publish(subjects.agent("whatsapp", ACCOUNT, CHAT), refused)
    found = violations(await run(bus), "duplicates")
    assert [v["event_ids"] for v in found] == [[turn.id, refused.id]]
    assert "second outcome" in str(found[0]["message"])
