"""Stream, bucket and durable consumer specs."""

from __future__ import annotations

import itertools
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import hooks, streams, subjects, web
from contracts.errors import InvalidSubjectError
from contracts.streams import STREAMS, Retention, StreamSpec, stream_for_subject

hypothesis_settings = settings(database=None, deadline=None)

DM = "123@s.whatsapp.net"
DURABLE_NAME_RE = re.compile(r"^[!-~]+$")  # printable ASCII, no whitespace


def overlaps(first: str, second: str) -> bool:
    """Whether some subject matches both NATS patterns (`*` one token, `>` one or more)."""
    a, b = first.split("."), second.split(".")
    while a and b:
        if a[0] == ">" or b[0] == ">":
            return True  # the other side has at least one token left here
        if a[0] != b[0] and "*" not in (a[0], b[0]):
            return False
        a, b = a[1:], b[1:]
    return not a and not b


def matches(pattern: str, subject: str) -> bool:
    """Whether the literal `subject` matches the NATS `pattern`."""
    p, s = pattern.split("."), subject.split(".")
    for i, token in enumerate(p):
        if token == ">":
            return len(s) > i
        if i >= len(s) or (token != "*" and token != s[i]):
            return False
    return len(p) == len(s)


def is_valid_durable_name(name: str) -> bool:
    return bool(DURABLE_NAME_RE.fullmatch(name)) and not any(c in name for c in ".*>/\\")


# --- the helpers are right, so the tests below can fail ---------------------------------


@pytest.mark.parametrize(
    ("first", "second", "expected"),
    [
        ("a.b", "a.b", True),
        ("a.*", "a.b", True),
        ("a.*", "b.*", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.*.*", "a.*", False),
        ("a.*.in", "a.*.out", False),
        ("a.*.in", "a.x.*", True),
        (">", "anything.at.all", True),
        ("a.*.*", "a.>", True),
    ],
)
def test_overlap_helper(first: str, second: str, expected: bool) -> None:
    assert overlaps(first, second) is expected
    assert overlaps(second, first) is expected


@pytest.mark.parametrize(
    ("pattern", "subject", "expected"),
    [
        ("a.*", "a.b", True),
        ("a.*", "a.b.c", False),
        ("a.>", "a.b.c", True),
        ("a.>", "a", False),
        ("a.b", "a.c", False),
    ],
)
def test_match_helper(pattern: str, subject: str, expected: bool) -> None:
    assert matches(pattern, subject) is expected


# --- streams -----------------------------------------------------------------------------


def test_stream_names_are_unique() -> None:
    names = [spec.name for spec in STREAMS]
    assert len(names) == len(set(names))
    assert {spec.name: spec for spec in STREAMS} == streams.STREAMS_BY_NAME


@pytest.mark.parametrize(
    ("first", "second"),
    list(itertools.combinations(STREAMS, 2)),
    ids=lambda spec: spec.name,
)
def test_subjects_of_different_streams_do_not_overlap(
    first: StreamSpec, second: StreamSpec
) -> None:
    for a, b in itertools.product(first.subjects, second.subjects):
        assert not overlaps(a, b), f"{first.name} {a!r} overlaps {second.name} {b!r}"


@pytest.mark.parametrize(
    "name", ["INBOUND", "AGENT", "OUTBOUND", "DELIVERY", "DEADLETTER", "PLUGINS", "ACCOUNTS"]
)
def test_design_streams_exist(name: str) -> None:
    assert name in streams.STREAMS_BY_NAME
    assert getattr(streams, name) is streams.STREAMS_BY_NAME[name]


JOB_STREAMS = (streams.OUTBOUND, streams.SIM, streams.HOOK_JOBS)


@pytest.mark.parametrize("spec", JOB_STREAMS, ids=lambda s: s.name)
def test_job_streams_are_work_queues(spec: StreamSpec) -> None:
    assert spec.retention is Retention.WORKQUEUE


@pytest.mark.parametrize(
    "spec",
    [s for s in STREAMS if s not in JOB_STREAMS],
    ids=lambda s: s.name,
)
def test_event_streams_keep_history(spec: StreamSpec) -> None:
    assert spec.retention is Retention.LIMITS


@pytest.mark.parametrize("spec", STREAMS, ids=lambda s: s.name)
def test_stream_specs_are_sane(spec: StreamSpec) -> None:
    assert spec.subjects
    assert is_valid_durable_name(spec.name)
    assert spec.max_msg_size > 0
    assert spec.duplicate_window_s > 0
    assert spec.max_age_s >= 0
    assert spec.description


def test_leases_bucket_keeps_one_revision() -> None:
    buckets = {bucket.name: bucket for bucket in streams.BUCKETS}
    assert buckets["leases"] is streams.LEASES
    assert streams.LEASES.history == 1


# --- durable consumer names --------------------------------------------------------------


@hypothesis_settings
@given(st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True))
def test_consumer_names_are_valid_durable_names(account: str) -> None:
    egress = streams.egress_consumer("whatsapp", account)
    sim = streams.sim_consumer(account)
    assert egress == f"egress-whatsapp-{account}"
    assert sim == f"sim-in-{account}"
    assert is_valid_durable_name(egress)
    assert is_valid_durable_name(sim)
    assert is_valid_durable_name(streams.CORE_CONSUMER)


def test_consumer_names_of_different_accounts_differ() -> None:
    assert streams.egress_consumer("whatsapp", "a") != streams.egress_consumer("whatsapp", "b")
    assert streams.sim_consumer("a") != streams.sim_consumer("b")


@pytest.mark.parametrize("account", ["", "acct.1", "acct 1", "*", ">", "a" * 65])
def test_consumer_names_reject_invalid_accounts(account: str) -> None:
    with pytest.raises(InvalidSubjectError, match="use 1-64 of A-Z a-z 0-9 _ -"):
        streams.egress_consumer("whatsapp", account)
    with pytest.raises(InvalidSubjectError, match="use 1-64 of A-Z a-z 0-9 _ -"):
        streams.sim_consumer(account)


def test_egress_consumer_rejects_unknown_channel() -> None:
    with pytest.raises(InvalidSubjectError, match="expected one of whatsapp"):
        streams.egress_consumer("telegram", "acct-1")


# --- stream_for_subject ------------------------------------------------------------------

SAMPLE_SUBJECTS = [
    (subjects.inbound("whatsapp", "acct-1", DM), streams.INBOUND),
    (subjects.agent("whatsapp", "acct-1", DM), streams.AGENT),
    (subjects.outbound("whatsapp", "acct-1", DM), streams.OUTBOUND),
    (subjects.delivery("whatsapp", "acct-1", DM), streams.DELIVERY),
    (subjects.deadletter(subjects.outbound("whatsapp", "acct-1", DM)), streams.DEADLETTER),
    (subjects.plugins("weather"), streams.PLUGINS),
    (subjects.PLUGIN_POLICY_SUBJECT, streams.PLUGINS),
    (subjects.accounts("whatsapp", "acct-1"), streams.ACCOUNTS),
    (subjects.access("whatsapp", "acct-1"), streams.ACCESS),
    (subjects.access("whatsapp"), streams.ACCESS),  # the channel-wide scope `_`
    (subjects.sim_in("acct-1"), streams.SIM),
    (subjects.sim_out("acct-1"), streams.SIM_OUT),
    # Accounts named like the sim suffixes must not confuse the routing.
    (subjects.sim_in("out"), streams.SIM),
    (subjects.sim_out("in"), streams.SIM_OUT),
    # Outgoing webhooks (h-hooks)
    (hooks.subscription_subject("0123456789abcdef"), streams.HOOKS),
    (hooks.probe_subject("0123456789abcdef"), streams.HOOKS),
    (hooks.job_subject("0123456789abcdef", "d" * 32), streams.HOOK_JOBS),
    (hooks.delivery_subject("0123456789abcdef", "d" * 32), streams.HOOK_DELIVERIES),
    # h-web: the web side's audit trail (contracts/web.py).
    (web.user_subject("alice"), streams.WEB),
    (web.token_subject("0123456789ab"), streams.WEB),
    (web.login_subject("not a name"), streams.WEB),
]


@pytest.mark.parametrize(("subject", "spec"), SAMPLE_SUBJECTS, ids=lambda v: str(v)[:40])
def test_stream_for_subject_maps_each_subject_to_its_stream(subject: str, spec: StreamSpec) -> None:
    # Given a subject built by the subject builders
    # Then exactly that stream's patterns capture it, and stream_for_subject agrees
    capturing = [s.name for s in STREAMS if any(matches(p, subject) for p in s.subjects)]
    assert capturing == [spec.name]
    assert stream_for_subject(subject) is spec


def test_every_stream_has_a_sample_subject() -> None:
    assert {spec.name for _, spec in SAMPLE_SUBJECTS} == {spec.name for spec in STREAMS}


@pytest.mark.parametrize("subject", ["unknown.whatsapp.acct-1.x", "", "_INBOX.abc", "Inbound.x"])
def test_stream_for_subject_returns_none_for_subjects_of_no_stream(subject: str) -> None:
    assert stream_for_subject(subject) is None


@pytest.mark.parametrize(
    "subject",
    ["inbound.whatsapp.acct-1", "accounts.whatsapp.acct-1.extra", "sim.whatsapp.acct-1.x"],
)
def test_stream_for_subject_returns_none_when_no_pattern_captures_the_subject(
    subject: str,
) -> None:
    assert stream_for_subject(subject) is None


def test_dead_letters_and_the_sim_queue_are_bounded() -> None:
    # DEADLETTER had no limits: 100 x 500 KB of garbage added 68 MB (issue 11 item 12)
    assert streams.DEADLETTER.max_bytes > 0
    assert streams.DEADLETTER.max_age_s > 0
    # SIM kept messages for account tokens no worker can ever own
    assert streams.SIM.max_msgs_per_subject > 0
    assert streams.SIM.max_age_s > 0
    assert streams.SIM.max_bytes > 0
