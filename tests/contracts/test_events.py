"""Events and commands: round trips, golden files, envelope shape and decoding errors.

Golden files
------------
`tests/contracts/golden/<TypeName>.v1.json` holds the exact bytes of `encode(SAMPLES[T])`
followed by one newline (no pretty-printing). The tests fail when the encoding of a sample
changes (a field renamed, removed, reordered or re-typed) and when the stored bytes no
longer decode into the sample, so events already in the streams keep decoding.

After an intended, backward-compatible change (a new defaulted field, a new type), add the
value to the sample below and regenerate the files with:

    UPDATE_GOLDEN=1 pytest tests/contracts/test_events.py

then review the diff. Never regenerate a file to make an incompatible change pass: that
needs a new tag plus an upcaster, and the old golden file stays.
"""

from __future__ import annotations

import inspect
import json
import os
import typing
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from contracts import events as ev
from contracts.codec import decode, decode_any, encode
from contracts.errors import DecodeError

GOLDEN_DIR = Path(__file__).parent / "golden"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"

AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
LATER = datetime(2026, 1, 2, 3, 4, 6, 250000, tzinfo=UTC)

# Every field below is set to a non-default value, so a field the decoder silently dropped
# (and filled with its default) would make a round trip fail. `channel` is therefore not
# "whatsapp" (its default); events do not validate the channel, subjects do.
CHANNEL = "sms"

TOOL_CALLS = [
    ev.ToolCallRecord(
        name="weather.forecast",
        arguments={"city": "Lisboa", "days": 3, "metric": True, "hours": [6, 12.5, None]},
        result_digest="b3f1c0de",
        error="timeout after 2000 ms",
        latency_ms=2001.5,
    ),
    ev.ToolCallRecord(
        name="calendar.find",
        arguments={"query": {"from": "2026-01-02", "to": "2026-01-03"}},
        result_digest="9e8d7c6b",
        error="quota exceeded",
        latency_ms=12.25,
    ),
]
SCOPE = ev.Scope(channel=CHANNEL, account="acct-1")

SAMPLES: dict[type[ev.Message], ev.Message] = {
    ev.MessageReceived: ev.MessageReceived(
        id="00000000000000000000000000000001",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        chat="1203630@g.us",
        sender="123:4@s.whatsapp.net",
        message_id="3EB0C431D5A1",
        text='Olá 👋 "quoted" \\ back\nline two',
        from_me=True,
        is_group=True,
        sender_name="Zoë",
        mentioned=True,
        mentions=["acct-1@s.whatsapp.net", "555@s.whatsapp.net"],
        quoted_id="3EB0C431D5A0",
        sender_alt="9876543210@lid",
    ),
    ev.TurnCompleted: ev.TurnCompleted(
        id="00000000000000000000000000000002",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        inbound_id="00000000000000000000000000000001",
        model="gpt-test-1",
        tools_called=TOOL_CALLS,
        reply_ids=["job-a", "job-b"],
        latency_ms=1234.5,
        usage=ev.TokenUsage(prompt_tokens=321, completion_tokens=54),
        skipped="message from a blocked sender",
        plugins_seq=17,
        origin=ev.OperatorOrigin(actor="alice", kind="token", client="10.0.0.7", via="api"),
    ),
    ev.TurnFailed: ev.TurnFailed(
        id="00000000000000000000000000000003",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        inbound_id="00000000000000000000000000000001",
        model="gpt-test-1",
        error="model unavailable (503)",
        reply_ids=["job-c"],
        tools_called=TOOL_CALLS[:1],
        plugins_seq=17,
    ),
    ev.MessageRefused: ev.MessageRefused(
        id="00000000000000000000000000000031",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        sender="123@s.whatsapp.net",
        message_id="wamid.HBgLMTIzNDU2Nzg5MBUCABIYFjNFQjBDMEQ1",
        rule="rate:chat",
        inbound_id="00000000000000000000000000000001",
        detail="over 20/min (burst 10)",
    ),
    ev.SendMessage: ev.SendMessage(
        id="00000000000000000000000000000004",
        at=AT,
        job_id="00000000000000000000000000000004",
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        text="Amanhã: 18 °C ☀️",
        reply_to="3EB0C431D5A1",
        cause_id="00000000000000000000000000000002",
        requeued_from="00000000000000000000000000000099",
        reply_to_sender="123:4@s.whatsapp.net",
        reply_to_text="Como está o tempo amanhã?",
        template="reengage_v1",
    ),
    ev.MessageSent: ev.MessageSent(
        id="00000000000000000000000000000005",
        at=AT,
        job_id="00000000000000000000000000000004",
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        holder="egress-host-a-1",
        lease_token=7,
        transport_message_id="3EB0FFEE0001",
        attempt=2,
        job_seq=42,
        sent_at=datetime(2026, 1, 2, 3, 4, 4, 500000, tzinfo=UTC),
        text="hello from the bot",
        reply_to="3EB0C431D5A1",
    ),
    ev.DeliveryFailed: ev.DeliveryFailed(
        id="00000000000000000000000000000006",
        at=AT,
        job_id="00000000000000000000000000000004",
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        attempt=3,
        error="recipient not on whatsapp",
        permanent=True,
        code=131026,
    ),
    ev.DeliveryDeadLettered: ev.DeliveryDeadLettered(
        id="00000000000000000000000000000007",
        at=AT,
        job_id="00000000000000000000000000000004",
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        reason="permanent failure",
        attempts=3,
        job_seq=42,
    ),
    ev.DeliveryUncertain: ev.DeliveryUncertain(
        id="00000000000000000000000000000008",
        at=AT,
        job_id="00000000000000000000000000000004",
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        holder="egress-host-a-1",
        lease_token=7,
        resolution="assumed-sent",
    ),
    ev.DeliveryReceipt: ev.DeliveryReceipt(
        id="00000000000000000000000000000009",
        at=AT,
        job_id="00000000000000000000000000000004",
        channel=CHANNEL,
        account="acct-1",
        chat="123@s.whatsapp.net",
        transport_message_id="3EB0FFEE0001",
        status="read",
    ),
    ev.DeadLettered: ev.DeadLettered(
        id="00000000000000000000000000000010",
        at=AT,
        source_stream="OUTBOUND",
        source_subject="outbound.whatsapp.acct-1.123@s~2Ewhatsapp~2Enet",
        source_seq=42,
        reason="max deliveries exceeded",
        errors=[
            ev.AttemptError(attempt=1, error="timeout", at=AT),
            ev.AttemptError(attempt=2, error="connection reset", at=LATER),
        ],
        payload=b'\x00\xff{"type":"SendMessage"}\n\xfe',
        headers={"Nats-Msg-Id": "00000000000000000000000000000004", "X-Trace": "abc"},
        job_id="00000000000000000000000000000004",
        source_msg_id="00000000000000000000000000000004",
        payload_truncated=True,
        payload_size=700_000,
        payload_sha256="9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08",
        source_subject_sha256="2c26b46b68ffc68ff99b453c1d30413413422d706483bfa0f98a5e886266e7ae",
        hook_error="InvalidSubjectError: chat JID is empty",
    ),
    ev.DeadLetterRequeued: ev.DeadLetterRequeued(
        id="00000000000000000000000000000022",
        at=AT,
        letter_seq=42,
        letter_id="00000000000000000000000000000010",
        new_job_id="00000000000000000000000000000023",
        actor="ops@example.com",
        reason="recipient fixed",
        client="10.0.0.7",
        via="web",
    ),
    ev.DeadLetterDropped: ev.DeadLetterDropped(
        id="00000000000000000000000000000024",
        at=AT,
        letter_seq=43,
        letter_id="00000000000000000000000000000025",
        actor="ops@example.com",
        reason="spam",
        client="10.0.0.7",
        via="web",
    ),
    ev.FactRemembered: ev.FactRemembered(
        id="00000000000000000000000000000026",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        chat="1203630@g.us",
        key="name",
        value="Zoë",
    ),
    ev.FactForgotten: ev.FactForgotten(
        id="00000000000000000000000000000027",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        chat="1203630@g.us",
        key="name",
    ),
    ev.PluginInstalled: ev.PluginInstalled(
        id="00000000000000000000000000000011",
        at=AT,
        name="weather",
        version="1.2.3",
        scope=SCOPE,
        config={"units": "metric", "retries": 3, "ratio": 0.5, "keys": ["a", "b"], "x": None},
        actor="ops@example.com",
    ),
    ev.PluginConfigured: ev.PluginConfigured(
        id="00000000000000000000000000000012",
        at=AT,
        name="weather",
        scope=SCOPE,
        config={"units": "imperial", "nested": {"enabled": False}},
        actor="ops@example.com",
    ),
    ev.PluginUninstalled: ev.PluginUninstalled(
        id="00000000000000000000000000000013",
        at=AT,
        name="weather",
        scope=SCOPE,
        actor="ops@example.com",
    ),
    ev.ToolPolicySet: ev.ToolPolicySet(
        id="00000000000000000000000000000014",
        at=AT,
        scope=SCOPE,
        allow=["weather.*", "calendar.find"],
        deny=["*.delete"],
        actor="ops@example.com",
    ),
    ev.AccountRegistered: ev.AccountRegistered(
        id="00000000000000000000000000000015",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        transport="sim",
    ),
    ev.LeaseAcquired: ev.LeaseAcquired(
        id="00000000000000000000000000000016",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        holder="egress-host-a-1",
        token=7,
    ),
    ev.LeaseReleased: ev.LeaseReleased(
        id="00000000000000000000000000000017",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        holder="egress-host-a-1",
        token=7,
        reason="shutdown",
    ),
    ev.LeaseLost: ev.LeaseLost(
        id="00000000000000000000000000000018",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        holder="egress-host-a-1",
        token=8,
        reason="kv revision moved",
    ),
    ev.SessionLoggedOut: ev.SessionLoggedOut(
        id="00000000000000000000000000000019",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        holder="egress-host-a-1",
        reason="replaced by another device",
    ),
    ev.SessionBanned: ev.SessionBanned(
        id="00000000000000000000000000000020",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        holder="egress-host-a-1",
        reason="temporary ban",
        until=LATER,
    ),
    ev.AccountResumed: ev.AccountResumed(
        id="00000000000000000000000000000021",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        actor="ops@example.com",
        reason="re-paired",
        client="10.0.0.7",
        via="web",
    ),
    ev.SendBudgetChanged: ev.SendBudgetChanged(
        id="00000000000000000000000000000022",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        reason="banned: too many messages to non-contacts",
        per_minute=3.0,
        burst=1,
        factor=0.25,
        next_step_at=LATER,
        holder="egress-host-a-1",
    ),
    ev.AccessModeSet: ev.AccessModeSet(
        id="00000000000000000000000000000041",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        mode="approval",
        actor="ops@example.com",
    ),
    ev.AccessRuleAdded: ev.AccessRuleAdded(
        id="00000000000000000000000000000042",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        pattern="1555*",
        kind="block",
        actor="ops@example.com",
    ),
    ev.AccessRuleRemoved: ev.AccessRuleRemoved(
        id="00000000000000000000000000000043",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        pattern="*@g.us",
        kind="block",
        actor="ops@example.com",
    ),
    ev.AccessApproved: ev.AccessApproved(
        id="00000000000000000000000000000044",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        jid="15551234567@s.whatsapp.net",
        released=["inbound-1", "inbound-2"],
        actor="ops@example.com",
    ),
    ev.AccessRequested: ev.AccessRequested(
        id="00000000000000000000000000000045",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        jid="15551234567@s.whatsapp.net",
        chat="15551234567@s.whatsapp.net",
        message_id="wamid-9",
        inbound_id="inbound-1",
        inbound_seq=42,
        waiting_job="job-waiting-1",
    ),
    ev.SessionZombie: ev.SessionZombie(
        id="00000000000000000000000000000022",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        holder="egress-host-a-1",
        token=9,
        silent_for=912.5,
        recycled=True,
    ),
    ev.PairingStarted: ev.PairingStarted(
        id="00000000000000000000000000000023",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        attempt="attempt-1",
        actor="olivia",
        via="web",
        client="192.0.2.7",
        by_code=True,
        force=True,
    ),
    ev.PairingFinished: ev.PairingFinished(
        id="00000000000000000000000000000024",
        at=AT,
        channel=CHANNEL,
        account="acct-1",
        attempt="attempt-1",
        outcome="failed",
        device="1555…01:7@s.whatsapp.net",
        reason="acct-1: timed out after 180 s",
        actor="olivia",
        via="web",
    ),
}

TYPES = list(ev.ALL_TYPES)
TYPE_IDS = [t.__name__ for t in TYPES]

hypothesis_settings = settings(database=None, deadline=None)


def golden_path(kind: type[ev.Message]) -> Path:
    return GOLDEN_DIR / f"{kind.__name__}.v1.json"


def read_golden(kind: type[ev.Message]) -> bytes:
    return golden_path(kind).read_bytes().removesuffix(b"\n")


def as_json_object(message: ev.Message) -> dict[str, Any]:
    obj = json.loads(encode(message))
    assert isinstance(obj, dict)
    return obj


def field_default(field: msgspec.structs.FieldInfo) -> Any:
    if field.default is not msgspec.NODEFAULT:
        return field.default
    if field.default_factory is not msgspec.NODEFAULT:
        return field.default_factory()
    return msgspec.NODEFAULT


def non_default_violations(obj: msgspec.Struct, path: str) -> list[str]:
    """Fields of `obj` (and nested structs) that hold their default value."""
    found: list[str] = []
    for field in msgspec.structs.fields(obj):
        value = getattr(obj, field.name)
        here = f"{path}.{field.name}"
        default = field_default(field)
        if default is not msgspec.NODEFAULT and value == default:
            found.append(here)
        nested = value if isinstance(value, list) else [value]
        for i, item in enumerate(nested):
            if isinstance(item, msgspec.Struct):
                found.extend(non_default_violations(item, f"{here}[{i}]"))
    return found


# --- the samples themselves --------------------------------------------------------------


def test_samples_cover_exactly_all_types() -> None:
    assert set(SAMPLES) == set(ev.ALL_TYPES)
    assert all(type(sample) is kind for kind, sample in SAMPLES.items())


def test_all_types_lists_each_member_of_any_message_once() -> None:
    assert len(set(ev.ALL_TYPES)) == len(ev.ALL_TYPES)
    assert set(typing.get_args(ev.AnyMessage)) == set(ev.ALL_TYPES)


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_sample_sets_every_field_to_a_non_default_value(kind: type[ev.Message]) -> None:
    # Given the sample of a type
    sample = SAMPLES[kind]
    # Then no field (nested structs included) relies on its default
    assert non_default_violations(sample, kind.__name__) == []
    assert sample.at == AT


# --- round trips -------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_typed_decode_inverts_encode(kind: type[ev.Message]) -> None:
    sample = SAMPLES[kind]
    # When the sample is encoded and decoded as its own type
    decoded = decode(encode(sample), kind)
    # Then the same value comes back
    assert type(decoded) is kind
    assert decoded == sample


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_decode_any_picks_the_type_from_the_tag(kind: type[ev.Message]) -> None:
    sample = SAMPLES[kind]
    decoded = decode_any(encode(sample))
    assert type(decoded) is kind
    assert decoded == sample


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_decode_accepts_str_as_well_as_bytes(kind: type[ev.Message]) -> None:
    sample = SAMPLES[kind]
    assert decode_any(encode(sample).decode()) == sample


# --- golden files ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_encoding_equals_golden_bytes(kind: type[ev.Message]) -> None:
    # Given the sample's encoding today
    encoded = encode(SAMPLES[kind])
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        golden_path(kind).write_bytes(encoded + b"\n")
    # Then it is byte for byte what was pinned (no rename, removal, reorder or re-type)
    assert golden_path(kind).exists(), f"run UPDATE_GOLDEN=1 to create {golden_path(kind)}"
    assert encoded == read_golden(kind)


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_golden_bytes_still_decode_into_the_sample(kind: type[ev.Message]) -> None:
    # Given the bytes pinned when the type was introduced
    golden = read_golden(kind)
    # When they are decoded by today's code, typed or by tag
    # Then they still produce the sample (old events stay readable)
    assert decode(golden, kind) == SAMPLES[kind]
    assert decode_any(golden) == SAMPLES[kind]


def test_golden_files_are_one_line_of_compact_json_with_a_trailing_newline() -> None:
    for kind in TYPES:
        raw = golden_path(kind).read_bytes()
        assert raw.endswith(b"}\n"), kind.__name__
        assert raw.count(b"\n") == 1, kind.__name__
        assert json.loads(raw) == as_json_object(SAMPLES[kind])


def test_every_golden_file_belongs_to_a_known_type() -> None:
    # A type removed from ALL_TYPES would leave its old events undecodable.
    stored = {p.name for p in GOLDEN_DIR.glob("*.json")}
    expected = {golden_path(kind).name for kind in TYPES}
    assert stored == expected


# --- envelope and struct shape -----------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_type_tag_in_json_is_the_class_name(kind: type[ev.Message]) -> None:
    obj = as_json_object(SAMPLES[kind])
    assert obj["type"] == kind.__name__
    assert kind.__struct_config__.tag == kind.__name__
    assert kind.__struct_config__.tag_field == "type"


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_json_starts_with_the_envelope_type_id_at(kind: type[ev.Message]) -> None:
    obj = as_json_object(SAMPLES[kind])
    assert list(obj)[:3] == ["type", "id", "at"]
    assert obj["at"] == "2026-01-02T03:04:05Z"


def test_type_tags_are_unique() -> None:
    tags = [kind.__struct_config__.tag for kind in TYPES]
    assert len(tags) == len(set(tags))


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_every_field_is_frozen(kind: type[ev.Message]) -> None:
    sample = SAMPLES[kind]
    for field in msgspec.structs.fields(kind):
        with pytest.raises(AttributeError):
            setattr(sample, field.name, getattr(sample, field.name))


@pytest.mark.parametrize(
    "nested",
    [TOOL_CALLS[0], ev.TokenUsage(prompt_tokens=1), ev.AttemptError(attempt=1, error="e"), SCOPE],
    ids=lambda n: type(n).__name__,
)
def test_nested_structs_are_frozen(nested: msgspec.Struct) -> None:
    name = msgspec.structs.fields(nested)[0].name
    with pytest.raises(AttributeError):
        setattr(nested, name, getattr(nested, name))


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_constructor_is_keyword_only(kind: type[ev.Message]) -> None:
    params = inspect.signature(kind).parameters.values()
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in params)
    values = [getattr(SAMPLES[kind], f.name) for f in msgspec.structs.fields(kind)]
    with pytest.raises(TypeError):
        kind(*values)


def test_envelope_defaults_give_fresh_ids_and_an_aware_utc_time() -> None:
    first = ev.LeaseAcquired(account="a", holder="h", token=1)
    second = ev.LeaseAcquired(account="a", holder="h", token=1)
    assert first.id != second.id
    assert first.at.utcoffset() is not None
    assert first.at.utcoffset().total_seconds() == 0


def test_derived_id_is_deterministic_and_separates_its_parts() -> None:
    assert ev.derived_id("a", "b") == ev.derived_id("a", "b")
    assert ev.derived_id("ab", "c") != ev.derived_id("a", "bc")
    assert len(ev.derived_id("x")) == 32


# --- forward compatibility ---------------------------------------------------------------


@pytest.mark.parametrize("kind", TYPES, ids=TYPE_IDS)
def test_unknown_fields_are_ignored_on_decode(kind: type[ev.Message]) -> None:
    # Given an event written by a newer producer with fields this code does not know
    obj = as_json_object(SAMPLES[kind])
    obj = {"added_in_v2": {"deep": [1, {"x": None}]}, **obj, "another_new_one": "value"}
    data = json.dumps(obj).encode()
    # When it is decoded
    # Then the extra fields are dropped and the known ones kept
    assert decode(data, kind) == SAMPLES[kind]
    assert decode_any(data) == SAMPLES[kind]


def test_unknown_fields_inside_nested_structs_are_ignored() -> None:
    obj = as_json_object(SAMPLES[ev.TurnCompleted])
    obj["usage"]["cached_tokens"] = 10
    obj["tools_called"][0]["retries"] = 2
    assert decode_any(json.dumps(obj).encode()) == SAMPLES[ev.TurnCompleted]


def test_missing_defaulted_fields_take_their_defaults() -> None:
    # An event written before a defaulted field existed still decodes.
    data = b'{"type":"LeaseReleased","id":"x","at":"2026-01-02T03:04:05Z",'
    data += b'"account":"acct-1","holder":"h","token":3}'
    assert decode_any(data) == ev.LeaseReleased(
        id="x", at=AT, channel="whatsapp", account="acct-1", holder="h", token=3, reason=""
    )


# --- decoding errors ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"{",
        b"not json",
        b'{"type": "MessageReceived",}',
        b"\xff\xfe",
        b'{"type":"MessageReceived","account":"a',
    ],
    ids=["empty", "open-brace", "text", "trailing-comma", "not-utf8", "truncated-string"],
)
def test_malformed_json_raises_decode_error_naming_the_expected_type(data: bytes) -> None:
    with pytest.raises(DecodeError, match="malformed JSON for MessageReceived"):
        decode(data, ev.MessageReceived)
    with pytest.raises(DecodeError, match="malformed JSON"):
        decode_any(data)


@pytest.mark.parametrize(
    ("kind", "field"),
    [
        (kind, field.name)
        for kind in TYPES
        for field in msgspec.structs.fields(kind)
        if field.required
    ],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_missing_required_field_raises_decode_error_naming_type_and_field(
    kind: type[ev.Message], field: str
) -> None:
    # Given a sample's JSON without one required field
    obj = as_json_object(SAMPLES[kind])
    del obj[field]
    data = json.dumps(obj).encode()
    # Then decoding it, typed or by tag, names the type and the missing field
    with pytest.raises(DecodeError, match=f"invalid {kind.__name__}: .*missing.*`{field}`"):
        decode(data, kind)
    with pytest.raises(DecodeError, match=f"missing required field `{field}`"):
        decode_any(data)


@pytest.mark.parametrize(
    ("kind", "field"),
    [(kind, field.name) for kind in TYPES for field in msgspec.structs.fields(kind)],
    ids=lambda v: v if isinstance(v, str) else v.__name__,
)
def test_wrong_field_type_raises_decode_error_naming_type_and_field(
    kind: type[ev.Message], field: str
) -> None:
    # Given a sample's JSON with one field holding a value of a type no field accepts
    obj = as_json_object(SAMPLES[kind])
    obj[field] = [1]
    data = json.dumps(obj).encode()
    # Then decoding names the type and the JSON path of the field
    with pytest.raises(DecodeError, match=f"invalid {kind.__name__}: .*`\\$\\.{field}"):
        decode(data, kind)
    with pytest.raises(DecodeError, match=f"`\\$\\.{field}"):
        decode_any(data)


@pytest.mark.parametrize(
    ("kind", "patch", "path"),
    [
        (ev.MessageReceived, {"account": 123}, "$.account"),
        (ev.MessageSent, {"lease_token": "7"}, "$.lease_token"),
        (ev.MessageReceived, {"from_me": "yes"}, "$.from_me"),
        (ev.MessageReceived, {"at": "yesterday"}, "$.at"),
        (ev.TurnCompleted, {"usage": {"prompt_tokens": "many"}}, "$.usage.prompt_tokens"),
        (ev.TurnCompleted, {"reply_ids": ["ok", 2]}, "$.reply_ids[1]"),
        (ev.TurnFailed, {"tools_called": [{"arguments": {}}]}, "$.tools_called[0]"),
        (ev.DeadLettered, {"payload": "%%% not base64 %%%"}, "$.payload"),
        (ev.DeadLettered, {"headers": {"k": 1}}, "$.headers"),
        (ev.PluginInstalled, {"scope": {"channel": 5}}, "$.scope.channel"),
    ],
    ids=lambda v: v.__name__ if isinstance(v, type) else str(v),
)
def test_wrong_value_raises_decode_error_with_its_json_path(
    kind: type[ev.Message], patch: dict[str, Any], path: str
) -> None:
    obj = {**as_json_object(SAMPLES[kind]), **patch}
    data = json.dumps(obj).encode()
    with pytest.raises(DecodeError) as raised:
        decode(data, kind)
    assert kind.__name__ in str(raised.value)
    assert f"`{path}" in str(raised.value)


def test_unknown_type_tag_raises_decode_error_naming_the_tag() -> None:
    obj = as_json_object(SAMPLES[ev.MessageReceived])
    obj["type"] = "MessageRecieved"
    with pytest.raises(DecodeError, match=r"'MessageRecieved' - at `\$\.type`"):
        decode_any(json.dumps(obj).encode())


def test_missing_type_tag_raises_decode_error() -> None:
    obj = as_json_object(SAMPLES[ev.MessageReceived])
    del obj["type"]
    with pytest.raises(DecodeError, match="missing required field `type`"):
        decode_any(json.dumps(obj).encode())


def test_decoding_as_another_type_raises_decode_error() -> None:
    data = encode(SAMPLES[ev.LeaseAcquired])
    with pytest.raises(DecodeError, match=r"invalid LeaseLost: .*'LeaseAcquired'.*\$\.type"):
        decode(data, ev.LeaseLost)


@pytest.mark.parametrize(
    "data",
    [b"null", b"1", b'"MessageReceived"', b"[]", b"true"],
)
def test_json_that_is_not_an_object_raises_decode_error(data: bytes) -> None:
    with pytest.raises(DecodeError, match="invalid"):
        decode_any(data)


def test_decode_error_is_a_contract_error_and_value_error() -> None:
    from contracts.errors import ContractError

    assert issubclass(DecodeError, ContractError)
    assert issubclass(DecodeError, ValueError)


def _decode_any_or_decode_error(data: bytes | str) -> None:
    try:
        result = decode_any(data)
    except DecodeError:
        return
    assert isinstance(result, ev.Message)
    assert type(result) in ev.ALL_TYPES


@hypothesis_settings
@given(st.binary())
def test_arbitrary_bytes_either_decode_or_raise_decode_error(data: bytes) -> None:
    _decode_any_or_decode_error(data)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@hypothesis_settings
@given(
    tag=st.sampled_from(TYPE_IDS) | st.text(),
    base=st.sampled_from(TYPES),
    data=st.data(),
)
def test_arbitrary_json_objects_either_decode_or_raise_decode_error(
    tag: str, base: type[ev.Message], data: st.DataObject
) -> None:
    # Given a real sample with some fields dropped, some set to arbitrary JSON values,
    # some unknown fields added, and a known or arbitrary tag
    obj = as_json_object(SAMPLES[base])
    names = sorted(obj)
    for name in data.draw(st.sets(st.sampled_from(names), max_size=3)):
        del obj[name]
    keys = st.sampled_from(names) | st.text(max_size=20)
    obj.update(data.draw(st.dictionaries(keys, json_values, max_size=4)))
    obj["type"] = tag
    encoded = json.dumps(obj).encode()
    # Then decoding never fails with anything but DecodeError
    _decode_any_or_decode_error(encoded)
    _decode_any_or_decode_error(encoded.decode())


@hypothesis_settings
@given(st.sampled_from(TYPES), st.data())
def test_truncated_encodings_raise_decode_error(
    kind: type[ev.Message], data: st.DataObject
) -> None:
    encoded = encode(SAMPLES[kind])
    cut = data.draw(st.integers(min_value=0, max_value=len(encoded) - 1))
    with pytest.raises(DecodeError):
        decode_any(encoded[:cut])


# --- hostile input ----------------------------------------------------------------------


def test_deeply_nested_json_raises_decode_error() -> None:
    # Given a ~2 KB message with an unknown field nested 1000 arrays deep
    depth = 1000
    data = b'{"type":"MessageReceived","x":' + b"[" * depth + b"]" * depth + b"}"
    # Then decoding it fails as a DecodeError like any other bad input
    with pytest.raises(DecodeError, match="nested too deeply"):
        decode_any(data)


def test_an_envelope_time_without_a_timezone_is_rejected() -> None:
    # Given an event whose `at` has no UTC offset
    data = encode(SAMPLES[ev.MessageReceived]).replace(b'03:04:05Z"', b'03:04:05"')
    # Then it is not silently taken as a naive datetime
    with pytest.raises(DecodeError, match="at"):
        decode_any(data)


def test_bytes_written_before_a_field_was_added_still_decode() -> None:
    # MessageReceived v1 as stored before `mentioned` existed
    old = (GOLDEN_DIR / "MessageReceived.v1.before-mentioned.json.compat").read_bytes().strip()
    event = decode(old, ev.MessageReceived)
    assert event.mentioned is False
    assert event.text == SAMPLES[ev.MessageReceived].text


def test_messages_and_jobs_written_before_mentions_and_quotes_still_decode() -> None:
    # Given a MessageReceived and a SendMessage stored before mentions and quotes existed
    old_in = (GOLDEN_DIR / "MessageReceived.v1.before-quotes.json.compat").read_bytes().strip()
    old_job = (GOLDEN_DIR / "SendMessage.v1.before-quotes.json.compat").read_bytes().strip()
    # When decoded, the new fields take their defaults and everything else is kept
    received = decode(old_in, ev.MessageReceived)
    assert (received.mentions, received.quoted_id, received.sender_alt) == ([], "", "")
    assert received.mentioned is True
    job = decode(old_job, ev.SendMessage)
    assert (job.reply_to, job.reply_to_sender, job.reply_to_text) == ("3EB0C431D5A1", "", "")
    # and a MessageSent from before it recorded the quote says so (UNSET, not "no quote")
    old_sent = (GOLDEN_DIR / "MessageSent.v1.before-quotes.json.compat").read_bytes().strip()
    assert decode(old_sent, ev.MessageSent).reply_to is msgspec.UNSET
    assert decode(encode(ev.MessageSent(**_no_quote())), ev.MessageSent).reply_to is None


def _no_quote() -> dict[str, Any]:
    fields = msgspec.structs.asdict(SAMPLES[ev.MessageSent])
    fields["reply_to"] = None
    return fields


def test_dead_letters_written_before_the_bounds_still_decode() -> None:
    # Given a DeadLettered stored before payload truncation and hook errors were recorded
    old = (GOLDEN_DIR / "DeadLettered.v1.before-bounds.json.compat").read_bytes().strip()
    # When decoded, it reads as a whole payload with no recorded hook failure
    letter = decode(old, ev.DeadLettered)
    assert letter.payload == SAMPLES[ev.DeadLettered].payload
    assert (letter.payload_truncated, letter.payload_size, letter.payload_sha256) == (False, 0, "")
    assert (letter.source_subject_sha256, letter.hook_error) == ("", "")


@pytest.mark.parametrize(
    "kind", [ev.MessageSent, ev.TurnCompleted, ev.TurnFailed, ev.DeliveryDeadLettered]
)
def test_events_written_before_the_audit_fields_still_decode(kind: type[ev.Message]) -> None:
    # Given the bytes of an event written before job_seq / sent_at / text / plugins_seq
    old = (GOLDEN_DIR / f"{kind.__name__}.v1.before-audit-fields.json.compat").read_bytes()
    # When decoded, the new fields take their defaults and everything else is kept
    event = decode(old.strip(), kind)
    defaults = {"plugins_seq": 0, "job_seq": 0, "sent_at": None, "text": ""}
    new_fields = {f: getattr(event, f) for f in defaults if hasattr(event, f)}
    assert new_fields == {f: v for f, v in defaults.items() if f in new_fields}
    assert event.id == SAMPLES[kind].id


def test_turns_written_before_the_operator_origin_still_decode() -> None:
    # Given the bytes of a TurnCompleted written before `origin` (ADR 0041)
    old = (GOLDEN_DIR / "TurnCompleted.v1.before-origin.json.compat").read_bytes().strip()
    # When decoded, it is an agent turn (no origin) and everything else is kept
    event = decode(old, ev.TurnCompleted)
    assert event.origin is None
    assert event == msgspec.structs.replace(SAMPLES[ev.TurnCompleted], origin=None)


@pytest.mark.parametrize(
    "kind",
    [ev.DeadLetterRequeued, ev.DeadLetterDropped, ev.AccountResumed],
    ids=lambda kind: kind.__name__,
)
def test_operator_actions_written_before_where_was_recorded_still_decode(
    kind: type[ev.Message],
) -> None:
    # Given the bytes of an operator action written before `client` and `via`
    old = (GOLDEN_DIR / f"{kind.__name__}.v1.before-where.json.compat").read_bytes().strip()
    # When decoded, where is unknown (empty) and everything else is kept
    event = decode(old, kind)
    assert (event.client, event.via) == ("", "")  # type: ignore[attr-defined]
    assert event == msgspec.structs.replace(SAMPLES[kind], client="", via="")
