"""The webhook contracts (contracts/hooks.py) and the subscription projection
(projections/hooks.py): golden bytes, round trips, the event names a subscriber may
choose, and the pure matching rule.

Golden files: tests/web/hooks_golden/<Type>.v1.json, as in tests/contracts (regenerate
after an intended, backward-compatible change with UPDATE_GOLDEN=1, then review the diff).
"""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import msgspec
import pytest

from contracts import events as ev
from contracts.codec import decode, encode
from contracts.errors import ContractError
from contracts.events import AttemptError
from contracts.hooks import (
    HOOK_TYPES,
    HOOKABLE,
    DeliverWebhook,
    HookMessage,
    WebhookDeadLettered,
    WebhookDelivered,
    WebhookDeliveryFailed,
    WebhookSubscribed,
    WebhookTestRequested,
    WebhookUnsubscribed,
    check_events,
    check_subscription_id,
    delivery_id,
)
from contracts.streams import STREAMS_BY_NAME
from projections.hooks import Subscriptions, shown_url

GOLDEN_DIR = Path(__file__).parent / "hooks_golden"
UPDATE_GOLDEN = os.environ.get("UPDATE_GOLDEN") == "1"
AT = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
SUB = "0123456789abcdef"
EVENT = msgspec.Raw(b'{"type":"LeaseLost","id":"e1","account":"a"}')
ERRORS = [AttemptError(attempt=1, error="HTTP 500 Internal Server Error", at=AT)]

SAMPLES: dict[type[ev.Message], ev.Message] = {
    WebhookSubscribed: WebhookSubscribed(
        id="h1",
        at=AT,
        subscription=SUB,
        url="https://hooks.example.com/in",
        events=["MessageReceived", "LeaseLost"],
        secret="0123456789abcdef0123",
        actor="ops",
        description="crm",
    ),
    WebhookUnsubscribed: WebhookUnsubscribed(
        id="h2", at=AT, subscription=SUB, actor="ops", reason="moved"
    ),
    WebhookTestRequested: WebhookTestRequested(id="h3", at=AT, subscription=SUB, actor="ops"),
    DeliverWebhook: DeliverWebhook(
        id="d1",
        at=AT,
        subscription=SUB,
        event_type="LeaseLost",
        event_id="e1",
        source_stream="ACCOUNTS",
        source_seq=42,
        event=EVENT,
    ),
    WebhookDelivered: WebhookDelivered(
        id="r1",
        at=AT,
        subscription=SUB,
        delivery="d1",
        event_type="LeaseLost",
        event_id="e1",
        attempt=2,
        status=204,
        latency_ms=12.5,
    ),
    WebhookDeliveryFailed: WebhookDeliveryFailed(
        id="r2",
        at=AT,
        subscription=SUB,
        delivery="d1",
        event_type="LeaseLost",
        event_id="e1",
        attempt=1,
        error="HTTP 500 Internal Server Error",
        status=500,
        errors=ERRORS,
        retry_in=1.0,
    ),
    WebhookDeadLettered: WebhookDeadLettered(
        id="r3",
        at=AT,
        subscription=SUB,
        delivery="d1",
        event_type="LeaseLost",
        event_id="e1",
        reason="HTTP 500 (gave up after 1 attempts)",
        errors=ERRORS,
        source_stream="ACCOUNTS",
        source_seq=42,
        event=EVENT,
    ),
}
IDS = [t.__name__ for t in HOOK_TYPES]


def golden(kind: type) -> Path:
    return GOLDEN_DIR / f"{kind.__name__}.v1.json"


def test_samples_cover_every_hook_type() -> None:
    assert set(SAMPLES) == set(HOOK_TYPES)


@pytest.mark.parametrize("kind", HOOK_TYPES, ids=IDS)
def test_encoding_equals_golden_bytes_and_they_decode_back(kind: type[ev.Message]) -> None:
    encoded = encode(SAMPLES[kind])
    if UPDATE_GOLDEN:
        GOLDEN_DIR.mkdir(exist_ok=True)
        golden(kind).write_bytes(encoded + b"\n")
    stored = golden(kind).read_bytes().removesuffix(b"\n")
    assert encoded == stored
    assert decode(stored, kind) == SAMPLES[kind]
    assert decode(stored, HookMessage) == SAMPLES[kind]  # type: ignore[arg-type]


def test_every_golden_file_belongs_to_a_hook_type() -> None:
    assert {p.name for p in GOLDEN_DIR.glob("*.json")} == {golden(k).name for k in HOOK_TYPES}


def test_a_subscription_decodes_without_its_newer_fields() -> None:
    old = b'{"type":"WebhookSubscribed","id":"x","at":"2026-01-02T03:04:05Z","subscription":"0123456789abcdef","url":"https://h/","events":["LeaseLost"]}'
    event = decode(old, WebhookSubscribed)
    assert event.secret == ""
    assert event.actor == ""


def test_the_secret_never_shows_in_a_repr() -> None:
    sample = SAMPLES[WebhookSubscribed]
    assert isinstance(sample, WebhookSubscribed)
    assert sample.secret not in repr(sample)
    assert sample.secret not in str(sample)


# --- event names ------------------------------------------------------------------------------


def test_hookable_names_are_public_event_types_of_their_streams() -> None:
    by_name = {t.__name__: t for t in ev.ALL_TYPES}
    for name, stream in HOOKABLE.items():
        assert name in by_name
        assert issubclass(by_name[name], ev.Event)
        assert stream in STREAMS_BY_NAME
    for name in ("MessageReceived", "TurnCompleted", "TurnFailed", "MessageSent"):
        assert name in HOOKABLE
    for name in ("DeliveryFailed", "DeliveryDeadLettered", "DeliveryUncertain", "DeliveryReceipt"):
        assert name in HOOKABLE
    for name in ("LeaseAcquired", "LeaseReleased", "LeaseLost", "SessionLoggedOut"):
        assert name in HOOKABLE
    assert "SessionBanned" in HOOKABLE
    # Jobs and operator bookkeeping are not offered
    for name in ("SendMessage", "DeadLettered", "PluginInstalled", "AccessModeSet"):
        assert name not in HOOKABLE


def test_event_names_are_checked_deduplicated_and_kept_in_order() -> None:
    assert check_events(["LeaseLost", " MessageSent", "LeaseLost", ""]) == [
        "LeaseLost",
        "MessageSent",
    ]
    with pytest.raises(ContractError, match="unknown event 'Nope': valid are AccountRegistered"):
        check_events(["Nope"])
    with pytest.raises(ContractError, match="name at least one event"):
        check_events([" "])


def test_ids_are_subject_tokens_and_delivery_ids_are_stable() -> None:
    assert check_subscription_id(SUB) == SUB
    for bad in ("", "0123", "0123456789ABCDEF", "0123456789abcde.", "*" * 16):
        with pytest.raises(ContractError):
            check_subscription_id(bad)
    assert delivery_id(SUB, "e1") == delivery_id(SUB, "e1")
    assert delivery_id(SUB, "e1") != delivery_id("fedcba9876543210", "e1")
    assert delivery_id(SUB, "e1") != delivery_id(SUB, "e2")


# --- the projection ---------------------------------------------------------------------------


def subscribed(sub: str, *events: str) -> WebhookSubscribed:
    return WebhookSubscribed(subscription=sub, url="https://h/", events=list(events), secret="x")


def test_a_subscription_gets_its_kinds_stored_from_when_it_was_stored() -> None:
    view = Subscriptions()
    t0 = AT
    assert view.apply(1, t0, subscribed("a" * 16, "LeaseLost", "MessageSent"))
    before, after = t0 - timedelta(milliseconds=1), t0 + timedelta(seconds=1)
    assert [s.id for s in view.matching("LeaseLost", t0)] == ["a" * 16]
    assert view.matching("LeaseLost", before) == []
    assert view.matching("MessageReceived", after) == []
    assert view.streams_wanted() == {"ACCOUNTS": t0, "DELIVERY": t0}


def test_removal_ends_matching_and_an_id_is_never_reused() -> None:
    view = Subscriptions()
    view.apply(1, AT, subscribed("a" * 16, "LeaseLost"))
    assert view.apply(2, AT, WebhookUnsubscribed(subscription="a" * 16))
    assert view.matching("LeaseLost", AT + timedelta(seconds=1)) == []
    assert not view.apply(3, AT, subscribed("a" * 16, "LeaseLost"))
    assert view.live == {}
    assert view.streams_wanted() == {}


def test_replay_is_idempotent_and_deterministic() -> None:
    log = [
        (1, AT, subscribed("a" * 16, "LeaseLost")),
        (2, AT, subscribed("b" * 16, "MessageSent")),
        (3, AT, WebhookTestRequested(subscription="b" * 16)),
        (4, AT, WebhookUnsubscribed(subscription="a" * 16)),
    ]
    first, second = Subscriptions(), Subscriptions()
    for seq, at, event in log:
        first.apply(seq, at, event)
    for seq, at, event in log + log:  # read twice: the position makes repeats no-ops
        second.apply(seq, at, event)
    assert first == second
    assert list(first.live) == ["b" * 16]
    assert first.position == 4


def test_shown_urls_mask_a_password() -> None:
    assert shown_url("https://u:p@h.example/x?y=1") == "https://u:***@h.example/x?y=1"
    assert shown_url("https://h.example/x") == "https://h.example/x"
    assert "p" not in shown_url("https://u:p@h/").split("@")[0].split(":")[-1]
