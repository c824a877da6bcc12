"""The pure turn logic: deterministic ids, reply splitting, skip rules."""

from __future__ import annotations

import pytest
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
    out = turn.completed(inbound(), Completion(text="echo: hello"), "echo", 1.5, quote="always")
    again = turn.completed(inbound(), Completion(text="echo: hello"), "echo", 9.9, quote="always")
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


def test_group_messages_are_answered_per_the_group_rule() -> None:
    group = inbound(chat="123@g.us", is_group=True)
    mentioned = inbound(chat="123@g.us", is_group=True, mentioned=True)
    assert turn.skip_reason(group, "mention") == "group message without a mention"
    assert turn.skip_reason(mentioned, "mention") is None
    assert turn.skip_reason(group, "all") is None
    assert turn.skip_reason(mentioned, "none") == "group message"


def test_history_is_bounded_by_count_and_size_oldest_first() -> None:
    from contracts.payloads import ChatState, HistoryEntry

    state = ChatState(chat="c", last_seq=3)
    lines = [HistoryEntry(role="user", text=f"line {i:02d}") for i in range(10)]
    by_count = turn.remember(state, 7, lines, max_messages=4, max_chars=10_000)
    assert [h.text for h in by_count.history] == ["line 06", "line 07", "line 08", "line 09"]
    assert by_count.last_seq == 7
    by_size = turn.remember(state, 7, lines, max_messages=100, max_chars=21)
    assert [h.text for h in by_size.history] == ["line 07", "line 08", "line 09"]


def test_the_prompt_is_system_history_then_the_new_message() -> None:
    from contracts.payloads import ChatState, HistoryEntry

    state = ChatState(
        chat="c",
        history=[
            HistoryEntry(role="user", text="hi"),
            HistoryEntry(role="assistant", text="echo: hi"),
        ],
    )
    messages = turn.prompt(inbound(text="again"), "be brief", state)
    assert [(m.role, m.content) for m in messages] == [
        ("system", "be brief"),
        ("user", "hi"),
        ("assistant", "echo: hi"),
        ("user", "again"),
    ]


def test_the_calculator_never_evaluates_code() -> None:
    import pytest

    from services.plugins.base import ToolError
    from services.plugins.builtin import calculate

    assert calculate("(2+3)*4/5") == 4
    assert calculate("2**10") == 1024
    for hostile in ("__import__('os').system('true')", "open('x')", "2**1000000", "1/0", "a+1"):
        with pytest.raises(ToolError):
            calculate(hostile)


@pytest.mark.parametrize(
    ("policy", "is_group", "quoted"),
    [
        ("groups", True, True),
        ("groups", False, False),
        ("always", False, True),
        ("always", True, True),
        ("never", True, False),
        ("never", False, False),
    ],
)
def test_the_first_reply_quotes_the_message_it_answers_as_the_quote_policy_says(
    policy: turn.QuotePolicy, is_group: bool, quoted: bool
) -> None:
    # Given a message (in a group or 1:1) and a reply long enough for two parts
    asked = inbound(
        chat="1203@g.us" if is_group else "123@s.whatsapp.net",
        sender="123@s.whatsapp.net",
        is_group=is_group,
        text="q" * 2000,
    )
    # When the turn completes under the policy
    jobs = turn.completed(
        asked, Completion(text="a " * 150), "echo", 0, reply_limit=200, quote=policy
    ).jobs
    # Then only the first part quotes it, with what a transport needs to show the quote
    assert len(jobs) > 1
    first, rest = jobs[0], jobs[1:]
    if quoted:
        assert (first.reply_to, first.reply_to_sender) == ("m1", "123@s.whatsapp.net")
        assert first.reply_to_text == "q" * turn.QUOTE_TEXT_LIMIT
    else:
        assert (first.reply_to, first.reply_to_sender, first.reply_to_text) == (None, "", "")
    assert all(j.reply_to is None and not j.reply_to_text for j in rest)
