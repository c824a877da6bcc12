"""Access policy resolution (pure): modes, allow/block globs, account over channel, a
block always wins, groups by group JID, approvals, pending senders and the waiting-reply
period, and a fold that gives the same rows however it is fed."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from contracts.events import (
    AccessApproved,
    AccessEvent,
    AccessModeSet,
    AccessRequested,
    AccessRuleAdded,
    AccessRuleRemoved,
)
from projections.access import AccessView, matches

ACCT = "acct-1"
ALICE = "15551234567@s.whatsapp.net"
BOB = "4477001122@s.whatsapp.net"
GROUP = "120363000000000001@g.us"
T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)


def view_of(*events: AccessEvent) -> AccessView:
    view = AccessView()
    for seq, event in enumerate(events, 1):
        view.apply(event, seq)
    return view


def decide(view: AccessView, sender: str, chat: str = "", *, is_group: bool = False) -> str:
    d = view.resolve("whatsapp", ACCT, sender, chat or sender, is_group=is_group)
    return f"{'allow' if d.allowed else 'pending' if d.pending else 'refuse'} {d.rule}"


@pytest.mark.parametrize(
    ("pattern", "jid", "hit"),
    [
        (ALICE, ALICE, True),
        ("1555*", ALICE, True),
        ("15551234567", ALICE, True),  # a phone number names its JID
        ("+15551234567", ALICE, True),
        ("*@s.whatsapp.net", ALICE, True),
        ("*@g.us", ALICE, False),
        ("1555", ALICE, False),  # not a prefix match without a glob
        ("4477*", ALICE, False),
    ],
)
def test_patterns_match_jids_phone_numbers_and_globs(pattern: str, jid: str, hit: bool) -> None:
    assert matches(pattern, jid) is hit


def test_open_is_the_default_and_lets_everyone_in() -> None:
    assert decide(AccessView(), ALICE) == "allow access:open"


def test_allowlist_answers_listed_senders_and_refuses_the_rest() -> None:
    view = view_of(
        AccessModeSet(account=ACCT, mode="allowlist"),
        AccessRuleAdded(account=ACCT, pattern="1555*", kind="allow"),
    )
    assert decide(view, ALICE) == "allow access:allow"
    assert decide(view, BOB) == "refuse access:allowlist"


def test_account_mode_overrides_the_channel_mode_and_channel_rules_apply_to_accounts() -> None:
    # Given the channel in allowlist, its allow rule, and this account set to approval
    view = view_of(
        AccessModeSet(mode="allowlist"),
        AccessRuleAdded(pattern=ALICE, kind="allow"),
        AccessModeSet(account=ACCT, mode="approval"),
    )
    # Then the account's mode decides (an unknown sender is pending, not refused) ...
    assert decide(view, BOB) == "pending access:approval"
    # ... and a channel-wide allow still lets its sender in
    assert decide(view, ALICE) == "allow access:allow"
    # And another account follows the channel
    other = view.resolve("whatsapp", "acct-2", BOB, BOB)
    assert (other.allowed, other.rule) == (False, "access:allowlist")


def test_a_block_always_wins_over_allow_approval_and_open() -> None:
    view = view_of(
        AccessModeSet(account=ACCT, mode="allowlist"),
        AccessRuleAdded(account=ACCT, pattern=ALICE, kind="allow"),
        AccessApproved(account=ACCT, jid=ALICE),
        AccessRuleAdded(pattern="1555*", kind="block"),  # channel-wide block
    )
    assert decide(view, ALICE) == "refuse access:block"
    assert "1555*" in view.resolve("whatsapp", ACCT, ALICE, ALICE).detail
    # Even where everyone is let in
    open_view = view_of(AccessRuleAdded(account=ACCT, pattern=ALICE, kind="block"))
    assert decide(open_view, ALICE) == "refuse access:block"
    assert decide(open_view, BOB) == "allow access:open"


def test_removing_a_rule_undoes_it() -> None:
    view = view_of(
        AccessRuleAdded(account=ACCT, pattern=ALICE, kind="block"),
        AccessRuleRemoved(account=ACCT, pattern=ALICE, kind="block"),
    )
    assert decide(view, ALICE) == "allow access:open"


def test_groups_are_allowed_by_group_jid_and_a_blocked_member_is_refused_in_them() -> None:
    view = view_of(
        AccessModeSet(account=ACCT, mode="allowlist"),
        AccessRuleAdded(account=ACCT, pattern=GROUP, kind="allow"),
        AccessRuleAdded(account=ACCT, pattern=BOB, kind="block"),
    )
    # Any member of the allowed group gets in (the mention rule is the turn's, later)
    assert decide(view, ALICE, GROUP, is_group=True) == "allow access:allow"
    # An allowed sender does not open a group that is not allowed
    view.apply(AccessRuleAdded(account=ACCT, pattern=ALICE, kind="allow"), 9)
    other = "120363000000000002@g.us"
    assert decide(view, ALICE, other, is_group=True) == "refuse access:allowlist"
    # A blocked sender stays blocked inside an allowed group
    assert decide(view, BOB, GROUP, is_group=True) == "refuse access:block"


def test_under_approval_a_sender_is_pending_until_approved() -> None:
    view = view_of(AccessModeSet(account=ACCT, mode="approval"))
    assert decide(view, ALICE) == "pending access:approval"
    view.apply(
        AccessRequested(
            account=ACCT, jid=ALICE, chat=ALICE, message_id="m1", inbound_id="i1", inbound_seq=7
        ),
        2,
    )
    assert [r["jid"] for r in view.rows()["pending"]] == [ALICE]
    view.apply(AccessApproved(account=ACCT, jid=ALICE, released=["i1"]), 3)
    assert decide(view, ALICE) == "allow access:approved"
    assert view.rows()["pending"] == []
    # An approval is for its account only
    elsewhere = view.resolve("whatsapp", "acct-2", ALICE, ALICE)
    assert elsewhere.allowed  # acct-2 has no mode: open
    view.apply(AccessModeSet(account="acct-2", mode="approval"), 4)
    assert view.resolve("whatsapp", "acct-2", ALICE, ALICE).pending


def test_the_waiting_reply_is_owed_once_per_period_from_the_recorded_requests() -> None:
    period = timedelta(hours=1)

    def request(inbound_id: str, at: datetime, job: str) -> AccessRequested:
        return AccessRequested(
            at=at, account=ACCT, jid=ALICE, chat=ALICE, message_id=inbound_id,
            inbound_id=inbound_id, waiting_job=job,
        )  # fmt: skip

    view = view_of(AccessModeSet(account=ACCT, mode="approval"))
    assert view.waiting_due("whatsapp", ACCT, ALICE, T0, period)
    view.apply(request("i1", T0, "job-1"), 2)
    # A second message inside the period is recorded without a reply ...
    assert not view.waiting_due("whatsapp", ACCT, ALICE, T0 + timedelta(minutes=59), period)
    view.apply(request("i2", T0 + timedelta(minutes=59), ""), 3)
    assert not view.waiting_due("whatsapp", ACCT, ALICE, T0 + timedelta(minutes=59), period)
    # ... and after the period (counted from the last reply, not the last message) one is owed
    assert view.waiting_due("whatsapp", ACCT, ALICE, T0 + period, period)
    # A redelivered request (same inbound) is folded once
    view.apply(request("i2", T0 + timedelta(minutes=59), ""), 4)
    assert view.rows()["pending"][0]["messages"] == 2


def test_a_block_settles_a_pending_sender() -> None:
    view = view_of(
        AccessModeSet(account=ACCT, mode="approval"),
        AccessRequested(account=ACCT, jid=ALICE, chat=ALICE, message_id="m1", inbound_id="i1"),
        AccessRuleAdded(account=ACCT, pattern="1555*", kind="block"),
    )
    assert view.rows()["pending"] == []
    assert decide(view, ALICE) == "refuse access:block"


def test_the_fold_gives_the_same_rows_at_once_or_in_parts_and_every_time() -> None:
    events: list[AccessEvent] = [
        AccessModeSet(mode="allowlist", at=T0),
        AccessModeSet(account=ACCT, mode="approval", at=T0),
        AccessRuleAdded(pattern="*@g.us", kind="block", at=T0),
        AccessRuleAdded(account=ACCT, pattern="1555*", kind="allow", at=T0),
        AccessRequested(account=ACCT, jid=BOB, chat=BOB, message_id="m", inbound_id="i", at=T0),
        AccessRuleRemoved(pattern="*@g.us", kind="block", at=T0),
        AccessApproved(account=ACCT, jid="447700000000@s.whatsapp.net", at=T0),
    ]
    once = view_of(*events).rows()
    again = view_of(*events).rows()
    parts = AccessView()
    for seq, event in enumerate(events, 1):
        parts.apply(event, seq)
        parts.rows()  # reading in between changes nothing
    assert once == again == parts.rows()
    assert all(once[table] for table in ("modes", "rules", "approved", "pending"))
