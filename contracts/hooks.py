"""Outgoing webhooks (ADR 0042): subscriptions, delivery jobs and delivery records.

Subscriptions are events on HOOKS (`hooks.subscriptions.<id>`); the list is a projection
(projections/hooks.py). Each public event x matching subscription becomes one
`DeliverWebhook` job on the HOOK_JOBS work queue (`hooks.jobs.<id>.<delivery>`, msg id =
the delivery id, derived from the event and the subscription); what became of it is
recorded on HOOK_DELIVERIES (`hooks.deliveries.<id>.<delivery>`; the last record of a
delivery carries every attempt's error so far).
"""

from __future__ import annotations

import re

import msgspec

from contracts import events as ev
from contracts.errors import ContractError
from contracts.events import AttemptError, Command, Event, UtcDatetime, derived_id

# --- what a subscriber may choose ---------------------------------------------------------

# The public event types of DESIGN.md a webhook can carry, with the stream each is read
# from. Operator bookkeeping (dead letters, plugins, access) and jobs are not offered.
HOOKABLE: dict[str, str] = {
    **{t.__name__: "INBOUND" for t in (ev.MessageReceived,)},
    **{t.__name__: "AGENT" for t in (ev.TurnCompleted, ev.TurnFailed, ev.MessageRefused)},
    **{
        t.__name__: "DELIVERY"
        for t in (
            ev.MessageSent,
            ev.DeliveryFailed,
            ev.DeliveryDeadLettered,
            ev.DeliveryUncertain,
            ev.DeliveryReceipt,
        )
    },
    **{
        t.__name__: "ACCOUNTS"
        for t in (
            ev.AccountRegistered,
            ev.LeaseAcquired,
            ev.LeaseReleased,
            ev.LeaseLost,
            ev.SessionLoggedOut,
            ev.SessionBanned,
            ev.AccountResumed,
            ev.SendBudgetChanged,
            ev.SessionZombie,
        )
    },
}
SOURCE_STREAMS: tuple[str, ...] = ("INBOUND", "AGENT", "DELIVERY", "ACCOUNTS")
TEST_EVENT = "WebhookTestRequested"  # what `svc webhooks test` delivers (any subscription)


def check_events(names: list[str]) -> list[str]:
    """The event names, de-duplicated and in order; ContractError listing the valid ones."""
    cleaned = [n.strip() for n in names if n.strip()]
    if not cleaned:
        raise ContractError(f"name at least one event; valid: {', '.join(sorted(HOOKABLE))}")
    unknown = [n for n in cleaned if n not in HOOKABLE]
    if unknown:
        raise ContractError(
            f"unknown event {', '.join(repr(n) for n in unknown)}: valid are"
            f" {', '.join(sorted(HOOKABLE))}"
        )
    return list(dict.fromkeys(cleaned))


# --- ids and subjects ---------------------------------------------------------------------

_ID = re.compile(r"^[a-f0-9]{16}$")


def check_subscription_id(value: str) -> str:
    """A subscription id (16 lowercase hex characters, a subject token)."""
    if not _ID.fullmatch(value):
        raise ContractError(f"not a webhook id: {value!r} (16 hex characters, see ls)")
    return value


def delivery_id(subscription: str, event_id: str) -> str:
    """One delivery per (event, subscription): a redelivered event makes the same id."""
    return derived_id("webhook", subscription, event_id)


def subscription_subject(subscription: str) -> str:
    """Where a subscription's events live (HOOKS)."""
    return f"hooks.subscriptions.{check_subscription_id(subscription)}"


def probe_subject(subscription: str) -> str:
    """Where test requests are recorded (HOOKS)."""
    return f"hooks.tests.{check_subscription_id(subscription)}"


def job_subject(subscription: str, delivery: str) -> str:
    """A delivery job (HOOK_JOBS, a work queue)."""
    return f"hooks.jobs.{check_subscription_id(subscription)}.{delivery}"


def delivery_subject(subscription: str, delivery: str) -> str:
    """A delivery's records (HOOK_DELIVERIES); the last one is its state."""
    return f"hooks.deliveries.{check_subscription_id(subscription)}.{delivery}"


# --- events on HOOKS ----------------------------------------------------------------------


class WebhookSubscribed(Event, frozen=True, kw_only=True):
    """An operator subscribed `url` to `events`. `secret` signs every body (HMAC-SHA256);
    it is stored here so every replica can sign, and never printed (see __repr__)."""

    subscription: str
    url: str
    events: list[str]
    secret: str = ""
    actor: str = ""
    description: str = ""

    def __repr__(self) -> str:
        return (
            f"WebhookSubscribed(subscription={self.subscription!r}, url={self.url!r},"
            f" events={self.events!r}, secret='***', actor={self.actor!r})"
        )


class WebhookUnsubscribed(Event, frozen=True, kw_only=True):
    """The subscription was removed: nothing more is delivered to it."""

    subscription: str
    actor: str = ""
    reason: str = ""


class WebhookTestRequested(Event, frozen=True, kw_only=True):
    """An operator asked for a test delivery (`svc webhooks test`); it is the event sent."""

    subscription: str
    actor: str = ""


# --- the job on HOOK_JOBS -----------------------------------------------------------------


class DeliverWebhook(Command, frozen=True, kw_only=True):
    """Deliver `event` (its stored JSON, verbatim) to `subscription`; `id` is the delivery
    id, so a job made twice for the same event is one message (Nats-Msg-Id)."""

    subscription: str
    event_type: str
    event_id: str
    source_stream: str = ""
    source_seq: int = 0
    event: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))


# --- records on HOOK_DELIVERIES -----------------------------------------------------------


class WebhookDelivered(Event, frozen=True, kw_only=True):
    """The receiver answered 2xx."""

    subscription: str
    delivery: str
    event_type: str
    event_id: str
    attempt: int
    status: int
    latency_ms: float = 0.0


class WebhookDeliveryFailed(Event, frozen=True, kw_only=True):
    """One attempt failed; `errors` is every attempt's error so far; the next attempt is
    `retry_in` seconds away."""

    subscription: str
    delivery: str
    event_type: str
    event_id: str
    attempt: int
    error: str
    status: int | None = None
    errors: list[AttemptError] = msgspec.field(default_factory=list)
    retry_in: float = 0.0


class WebhookDeadLettered(Event, frozen=True, kw_only=True):
    """The delivery was given up (last attempt failed, or a refusal no retry can fix),
    with every attempt's error and the job, to inspect or resend."""

    subscription: str
    delivery: str
    event_type: str
    event_id: str
    reason: str
    errors: list[AttemptError] = msgspec.field(default_factory=list)
    source_stream: str = ""
    source_seq: int = 0
    event: msgspec.Raw = msgspec.field(default_factory=lambda: msgspec.Raw(b"{}"))


class WebhookBody(msgspec.Struct, frozen=True, kw_only=True):
    """The JSON a receiver gets (signed as sent): who, which delivery and attempt, when it
    was sent, and the event exactly as stored."""

    subscription: str
    delivery: str
    attempt: int
    sent_at: UtcDatetime
    type: str
    event: msgspec.Raw
    # Where the event is stored (its stream and sequence: the order within a stream).
    stream: str = ""
    seq: int = 0


SubscriptionEvent = WebhookSubscribed | WebhookUnsubscribed | WebhookTestRequested
DeliveryRecord = WebhookDelivered | WebhookDeliveryFailed | WebhookDeadLettered
HookMessage = (
    WebhookSubscribed
    | WebhookUnsubscribed
    | WebhookTestRequested
    | DeliverWebhook
    | WebhookDelivered
    | WebhookDeliveryFailed
    | WebhookDeadLettered
)
HOOK_TYPES: tuple[type[ev.Message], ...] = (
    WebhookSubscribed,
    WebhookUnsubscribed,
    WebhookTestRequested,
    DeliverWebhook,
    WebhookDelivered,
    WebhookDeliveryFailed,
    WebhookDeadLettered,
)


# --- what the operations return (svc webhooks, the API) -----------------------------------


class WebhookInfo(msgspec.Struct, frozen=True, kw_only=True):
    """A live subscription as operators see it: never its secret."""

    id: str
    url: str  # any password in it masked
    events: list[str]
    secret: str  # "set" or "none", never the value
    since: UtcDatetime
    actor: str = ""
    description: str = ""


class WebhookTestResult(msgspec.Struct, frozen=True, kw_only=True):
    """What became of a test delivery's first attempt (`outcome`: delivered, failed --
    retrying --, dead-lettered, or pending: no record within the wait)."""

    subscription: str
    delivery: str
    outcome: str
    attempt: int = 0
    status: int | None = None
    error: str = ""
    latency_ms: float = 0.0
