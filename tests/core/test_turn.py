"""The pure turn logic: deterministic ids, reply splitting, skip rules."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from contracts.events import MessageReceived, TurnCompleted
from services.core import turn
from services.core.llm import Completion


def inbound(**kw: object) -> MessageReceived:
    base: dict[str, object] = {
        "id": "in-1",
        "account": "acct",
        "chat": "c@s.whatsapp.net",
        "sender": "c",
        "message_id": "m1",
        "text": "hello",
    }
    base.update(kw)
    return MessageReceived(**base)  # type: ignore[arg-type]


def test_a_completed_turn_queues_one_job_per_part_with_ids_derived_from_the_cause() -> None:
    out = turn.completed(inbound(), Completion(text="echo: hello"), "echo", 1.5)
    again = turn.completed(inbound(), Completion(text="echo: hello"), "echo", 9.9)
    assert [j.text for j in out.jobs] == ["echo: hello"]
    job = out.jobs[0]
    assert job.id == job.job_id == again.jobs[0].job_id
    assert job.reply_to == "m1"
    assert job.cause_id == "in-1"
    assert isinstance(out.record, TurnCompleted)
    assert out.record.id == again.record.id
    assert out.record.reply_ids == [job.job_id]


def test_different_inbound_events_get_different_ids() -> None:
    a = turn.completed(inbound(id="x"), Completion(text="t"), "echo", 0)
    b = turn.completed(inbound(id="y"), Completion(text="t"), "echo", 0)
    assert a.jobs[0].job_id != b.jobs[0].job_id
    assert a.record.id != b.record.id


def test_own_messages_and_status_broadcasts_are_skipped_but_recorded() -> None:
    assert turn.skip_reason(inbound(from_me=True)) == "own message"
    assert turn.skip_reason(inbound(chat="status@broadcast")) == "status broadcast"
    assert turn.skip_reason(inbound()) is None
    out = turn.skipped(inbound(from_me=True), "own message", "echo")
    assert out.jobs == []
    assert isinstance(out.record, TurnCompleted)
    assert out.record.skipped == "own message"


def test_an_empty_reply_queues_nothing() -> None:
    assert turn.completed(inbound(), Completion(text="   "), "echo", 0).jobs == []


@given(st.text(min_size=1, max_size=3000), st.integers(min_value=20, max_value=500))
def test_split_reply_respects_the_limit_and_keeps_every_word(text: str, limit: int) -> None:
    parts = turn.split_reply(text, limit)
    assert all(0 < len(p) <= limit for p in parts)
    # Only whitespace at the cut points may go; every other character stays, in order.
    assert "".join("".join(parts).split()) == "".join(text.split())
