"""`svc webhooks` (and the console's API, later): add, ls, rm, test, dead letters.

Plain async functions over a Bus that return msgspec types. A subscription is an event on
HOOKS; the list is the projection of those events (projections/hooks.py). The secret is
taken, stored in the event (ADR 0042) and never returned, printed or put in an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from contracts.codec import encode
from contracts.errors import ContractError
from contracts.hooks import (
    TEST_EVENT,
    DeliverWebhook,
    WebhookDeadLettered,
    WebhookDelivered,
    WebhookDeliveryFailed,
    WebhookInfo,
    WebhookSubscribed,
    WebhookTestRequested,
    WebhookTestResult,
    WebhookUnsubscribed,
    check_events,
    check_subscription_id,
    delivery_id,
    delivery_subject,
    job_subject,
    probe_subject,
    subscription_subject,
)
from contracts.streams import HOOK_DELIVERIES, HOOKS
from projections.hooks import Subscription, Subscriptions, shown_url
from services.runtime.bus import Bus
from services.runtime.errors import ServiceError
from services.runtime.reader import read
from services.web.hooks import (
    HookSettings,
    Resolve,
    SubscriptionBook,
    TargetRefusedError,
    check_target,
    decode_record,
    system_resolve,
)

MIN_SECRET = 16
MAX_SECRET = 512


class WebhookError(ServiceError):
    """A webhook operation refused: one line saying what and how to fix it."""


def info(sub: Subscription) -> WebhookInfo:
    """How a subscription is shown: never its secret."""
    return WebhookInfo(
        id=sub.id,
        url=shown_url(sub.url),
        events=list(sub.events),
        secret="set" if sub.secret else "none",
        since=sub.since,
        actor=sub.actor,
        description=sub.description,
    )


async def subscriptions(bus: Bus) -> Subscriptions:
    """The subscription list, rebuilt from HOOKS."""
    book = SubscriptionBook(bus)
    await book.catch_up()
    return book.view


async def add(
    bus: Bus,
    url: str,
    events: list[str],
    secret: str,
    *,
    settings: HookSettings | None = None,
    actor: str = "",
    description: str = "",
    resolve: Resolve = system_resolve,
) -> WebhookInfo:
    """Subscribe `url` to `events`, signed with `secret`; refused (one line) for an
    unknown event, a weak secret, or a target http_get's rule refuses."""
    settings = settings or HookSettings()
    try:
        chosen = check_events(events)
    except ContractError as exc:
        raise WebhookError(str(exc)) from None
    if not MIN_SECRET <= len(secret) <= MAX_SECRET:
        raise WebhookError(
            f"the secret must have {MIN_SECRET} to {MAX_SECRET} characters (it had"
            f" {len(secret)}): pipe one in, e.g. `openssl rand -hex 32 | svc webhooks add ...`"
        )
    try:
        await check_target(url, allow_private=settings.allow_private, resolve=resolve)
    except TargetRefusedError as exc:
        raise WebhookError(f"{shown_url(url)}: {exc}") from None
    sub_id = uuid.uuid4().hex[:16]
    event = WebhookSubscribed(
        subscription=sub_id,
        url=url,
        events=chosen,
        secret=secret,
        actor=actor,
        description=description,
    )
    await bus.publish(subscription_subject(sub_id), event)
    view = await subscriptions(bus)
    sub = view.live.get(sub_id)
    if sub is None:  # removed between the two lines by someone else
        raise WebhookError(f"webhook {sub_id} was removed as it was added")
    return info(sub)


async def ls(bus: Bus) -> list[WebhookInfo]:
    """The live subscriptions, oldest first (no secrets)."""
    view = await subscriptions(bus)
    return [info(s) for s in sorted(view.live.values(), key=lambda s: s.seq)]


async def _live(bus: Bus, sub_id: str) -> Subscription:
    try:
        check_subscription_id(sub_id)
    except ContractError as exc:
        raise WebhookError(str(exc)) from None
    sub = (await subscriptions(bus)).live.get(sub_id)
    if sub is None:
        raise WebhookError(f"no webhook {sub_id}: see `svc webhooks ls`")
    return sub


async def rm(bus: Bus, sub_id: str, *, actor: str = "", reason: str = "") -> WebhookInfo:
    """Remove a subscription: nothing more is delivered to it (queued jobs are dropped)."""
    sub = await _live(bus, sub_id)
    event = WebhookUnsubscribed(subscription=sub_id, actor=actor, reason=reason)
    await bus.publish(subscription_subject(sub_id), event)
    return info(sub)


async def send_test(
    bus: Bus, sub_id: str, *, actor: str = "", wait: float = 15.0
) -> WebhookTestResult:
    """Send a test delivery (a `WebhookTestRequested` event, whatever the subscription's
    events) and wait up to `wait` s for its first attempt's record."""
    await _live(bus, sub_id)
    event = WebhookTestRequested(subscription=sub_id, actor=actor)
    ack = await bus.publish(probe_subject(sub_id), event)
    job = DeliverWebhook(
        id=delivery_id(sub_id, event.id),
        subscription=sub_id,
        event_type=TEST_EVENT,
        event_id=event.id,
        source_stream=HOOKS.name,
        source_seq=ack.seq,
        event=msgspec.Raw(encode(event)),
    )
    records: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_record(msg: Msg) -> None:
        records.put_nowait(msg.data)

    sub = await bus.nc.subscribe(delivery_subject(sub_id, job.id), cb=on_record)
    try:
        await bus.publish(job_subject(sub_id, job.id), job)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wait):
                return _result(sub_id, job.id, decode_record(await records.get()))
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    with contextlib.suppress(nats.js.errors.NotFoundError):  # recorded as we stopped
        raw = await bus.js.get_last_msg(HOOK_DELIVERIES.name, delivery_subject(sub_id, job.id))
        return _result(sub_id, job.id, decode_record(raw.data or b""))
    return WebhookTestResult(
        subscription=sub_id,
        delivery=job.id,
        outcome="pending",
        error=f"no attempt recorded within {wait:g} s: is a role that runs webhooks"
        " (web or all) up?",
    )


def _result(
    sub_id: str,
    delivery: str,
    record: WebhookDelivered | WebhookDeliveryFailed | WebhookDeadLettered,
) -> WebhookTestResult:
    match record:
        case WebhookDelivered():
            return WebhookTestResult(
                subscription=sub_id,
                delivery=delivery,
                outcome="delivered",
                attempt=record.attempt,
                status=record.status,
                latency_ms=record.latency_ms,
            )
        case WebhookDeliveryFailed():
            return WebhookTestResult(
                subscription=sub_id,
                delivery=delivery,
                outcome="failed",
                attempt=record.attempt,
                status=record.status,
                error=record.error,
            )
        case WebhookDeadLettered():
            return WebhookTestResult(
                subscription=sub_id,
                delivery=delivery,
                outcome="dead-lettered",
                attempt=len(record.errors),
                error=record.reason,
            )


async def dead_letters(bus: Bus, sub_id: str | None = None) -> list[WebhookDeadLettered]:
    """Deliveries given up (every attempt's error, the event), oldest first."""
    if sub_id is not None:
        try:
            check_subscription_id(sub_id)
        except ContractError as exc:
            raise WebhookError(str(exc)) from None
    subject = f"hooks.deliveries.{sub_id or '*'}.*"
    found: list[WebhookDeadLettered] = []
    async for stored in read(bus, HOOK_DELIVERIES.name, subject=subject):
        with contextlib.suppress(ContractError):
            record = decode_record(stored.data)
            if isinstance(record, WebhookDeadLettered):
                found.append(record)
    return found
