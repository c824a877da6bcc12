"""Outgoing webhooks (ADR 0042): fan public events out to subscriptions, deliver them
signed, retry with backoff, dead-letter after the last attempt.

Three parts, run by the roles `web` and `all` (`Hooks.run`), any number of replicas:
- `SubscriptionBook`: the subscription list, a projection of HOOKS kept current.
- `Fanout`, one per source stream (INBOUND, AGENT, DELIVERY, ACCOUNTS) that some live
  subscription wants: a shared durable consumer (`hooks-<stream>`) that turns each event
  x matching subscription into one `DeliverWebhook` job on HOOK_JOBS. The job's id (its
  Nats-Msg-Id) derives from (subscription, event id), so an event read twice makes one
  job. A stream no subscription wants has no consumer (nothing is read).
- `Deliverer`: the shared durable consumer `hooks-deliver` on HOOK_JOBS, one queue per
  subscription (in order within a replica, subscriptions in parallel). Each attempt is
  recorded on HOOK_DELIVERIES; the last record of a delivery says whether it is done,
  so a job made again (or redelivered after a crash) is not sent again once delivered.

The target of every attempt is checked like http_get's (services/plugins/builtin.py
`refusal`): every address the host resolves to must be public unless
SVC_WEBHOOKS_ALLOW_PRIVATE=true, and the connection goes to the address checked.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import ipaddress
import logging
import os
import socket
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TypeVar
from urllib.parse import urlsplit

import httpx
import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from contracts.codec import decode, decoder, encode
from contracts.errors import ContractError
from contracts.events import AttemptError, utcnow
from contracts.hooks import (
    HOOKABLE,
    SOURCE_STREAMS,
    DeliverWebhook,
    DeliveryRecord,
    SubscriptionEvent,
    WebhookBody,
    WebhookDeadLettered,
    WebhookDelivered,
    WebhookDeliveryFailed,
    delivery_id,
    delivery_subject,
    job_subject,
)
from contracts.streams import HOOK_DELIVERIES, HOOK_JOBS, HOOKS, STREAMS_BY_NAME
from projections.hooks import Subscription, Subscriptions
from services.plugins.builtin import refusal
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, ConsumerSpec, Delivery, RetryPolicy
from services.runtime.errors import ServiceError, TransientError
from services.runtime.reader import read
from services.runtime.settings import _Reader

log = logging.getLogger(__name__)
T = TypeVar("T")

ALLOW_PRIVATE_ENV = "SVC_WEBHOOKS_ALLOW_PRIVATE"
SIGNATURE_HEADER = "X-Switchboard-Signature-256"
EVENT_HEADER = "X-Switchboard-Event"
DELIVERY_HEADER = "X-Switchboard-Delivery"
ATTEMPT_HEADER = "X-Switchboard-Attempt"
DELIVER_DURABLE = "hooks-deliver"
# A source event stored this close to the last check of the subscription list (or
# after it) makes the book check again: covers clock skew between server and process.
_SKEW = timedelta(seconds=1)
_RESOLVE_TIMEOUT = 5.0


# --- settings -----------------------------------------------------------------------------


@dataclass(frozen=True)
class HookSettings:
    """SVC_WEBHOOKS_*: private targets (opt-in), the per-attempt timeout, and attempts
    with exponential backoff (`backoff` doubling up to `backoff_max`)."""

    allow_private: bool = False
    timeout: float = 10.0
    attempts: int = 10
    backoff: float = 1.0
    backoff_max: float = 300.0

    def policy(self) -> RetryPolicy:
        """Attempts and the wait before each retry: backoff, 2x, 4x ... up to the cap."""
        delays = tuple(
            min(self.backoff * 2**n, self.backoff_max) for n in range(max(self.attempts - 1, 1))
        )
        return RetryPolicy(attempts=self.attempts, delays=delays, max_delay=self.backoff_max)


def load_hook_settings(env: Mapping[str, str] | None = None) -> HookSettings:
    """Parse SVC_WEBHOOKS_* from `env` (default os.environ); ConfigError, one line."""
    get = _Reader(os.environ if env is None else env)
    return HookSettings(
        allow_private=get.get_bool(ALLOW_PRIVATE_ENV, False),
        timeout=get.get_float("SVC_WEBHOOKS_TIMEOUT", 10.0, minimum=0.1, maximum=120),
        attempts=get.get_int("SVC_WEBHOOKS_ATTEMPTS", 10, minimum=1, maximum=100),
        backoff=get.get_float("SVC_WEBHOOKS_BACKOFF", 1.0, minimum=0, maximum=3600),
        backoff_max=get.get_float("SVC_WEBHOOKS_BACKOFF_MAX", 300.0, minimum=0, maximum=86_400),
    )


# --- targets ------------------------------------------------------------------------------


class TargetRefusedError(ServiceError):
    """A webhook URL that may not be called (one line: what and how to fix it)."""


Resolve = Callable[[str, int], Awaitable[list[str]]]


async def system_resolve(host: str, port: int) -> list[str]:
    """The host's addresses, from the system resolver (off the event loop)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


@dataclass(frozen=True)
class Target:
    """A checked URL: connect to `address`, ask `host` for `path`."""

    scheme: str
    host: str
    port: int
    address: str
    path: str

    @property
    def pinned_url(self) -> str:
        """The URL with the checked address in place of the host (no second lookup)."""
        ip = ipaddress.ip_address(self.address)
        where = f"[{ip}]" if ip.version == 6 else str(ip)
        return f"{self.scheme}://{where}:{self.port}{self.path}"

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        return self.host if self.port == default else f"{self.host}:{self.port}"


def check_url(url: str) -> tuple[str, str, int, str]:
    """(scheme, host, port, path) of an http(s) URL with a host; TargetRefusedError."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise TargetRefusedError("not a valid URL: give http(s)://host[:port]/path") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise TargetRefusedError("a webhook URL must be http(s)://host[:port]/path")
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return (
        parts.scheme,
        parts.hostname.lower(),
        port or (443 if parts.scheme == "https" else 80),
        path,
    )


async def check_target(
    url: str, *, allow_private: bool, resolve: Resolve = system_resolve
) -> Target:
    """Where a POST to `url` would connect, if allowed: every address the host resolves
    to must pass http_get's rule (`refusal`); else TargetRefusedError saying why."""
    scheme, host, port, path = check_url(url)
    try:
        async with asyncio.timeout(_RESOLVE_TIMEOUT):
            found = await resolve(host, port)
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in found]
    except (OSError, UnicodeError, ValueError, TimeoutError):
        raise TargetRefusedError(f"cannot resolve {host!r}: check the URL's host") from None
    if not addresses:
        raise TargetRefusedError(f"cannot resolve {host!r}: check the URL's host")
    for ip in addresses:  # one bad address refuses the host: no racing between them
        why = refusal(ip, allow_private=allow_private)
        if why is not None:
            hint = "" if allow_private else f" (allow private targets: {ALLOW_PRIVATE_ENV}=true)"
            raise TargetRefusedError(f"refused: {host} resolves to {ip}, {why}{hint}")
    return Target(scheme, host, port, str(addresses[0]), path)


# --- signing and the body -----------------------------------------------------------------


def sign(secret: str, body: bytes) -> str:
    """The signature header's value: `sha256=<hex HMAC-SHA256 of the raw body>`."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def body_of(job: DeliverWebhook, subscription: str, attempt: int) -> bytes:
    """The exact bytes sent (and signed)."""
    return encode(
        WebhookBody(
            subscription=subscription,
            delivery=job.id,
            attempt=attempt,
            sent_at=utcnow(),
            type=job.event_type,
            event=job.event,
            stream=job.source_stream,
            seq=job.source_seq,
        )
    )


@dataclass(frozen=True)
class Outcome:
    """One attempt: 2xx (`ok`), or why not. `permanent`: retrying cannot help."""

    status: int | None
    error: str = ""
    latency_ms: float = 0.0
    retry_after: float = 0.0
    permanent: bool = False

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def _retry_after(value: str | None) -> float:
    try:
        return max(0.0, float(value)) if value else 0.0
    except ValueError:
        return 0.0  # an HTTP date: the backoff decides


class Sender:
    """POSTs signed bodies to checked addresses (one pooled client per process)."""

    def __init__(
        self,
        settings: HookSettings,
        resolve: Resolve = system_resolve,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.settings = settings
        self.resolve = resolve
        # No proxies from the environment: they would connect somewhere unchecked.
        # `verify`: the system's CAs (a test's own CA in tests).
        self.client = httpx.AsyncClient(
            follow_redirects=False, trust_env=False, timeout=settings.timeout, verify=verify
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def post(self, sub: Subscription, job: DeliverWebhook, attempt: int) -> Outcome:
        """One attempt; never raises for what the target did (that is the Outcome)."""
        try:
            target = await check_target(
                sub.url, allow_private=self.settings.allow_private, resolve=self.resolve
            )
        except TargetRefusedError as exc:
            return Outcome(None, str(exc), permanent=True)
        body = body_of(job, sub.id, attempt)
        headers = {
            "Host": target.host_header,
            "Content-Type": "application/json",
            "User-Agent": "switchboard-webhooks",
            EVENT_HEADER: job.event_type,
            DELIVERY_HEADER: job.id,
            ATTEMPT_HEADER: str(attempt),
            SIGNATURE_HEADER: sign(sub.secret, body),
        }
        started = time.perf_counter()
        try:
            async with (
                asyncio.timeout(self.settings.timeout),
                self.client.stream(
                    "POST",
                    target.pinned_url,
                    content=body,
                    headers=headers,
                    extensions={"sni_hostname": target.host},
                ) as response,
            ):
                status, reason = response.status_code, response.reason_phrase
                retry_after = _retry_after(response.headers.get("retry-after"))
        except TimeoutError:
            return Outcome(None, f"no answer within {self.settings.timeout:g} s", _ms(started))
        except httpx.HTTPError as exc:
            return Outcome(None, f"{type(exc).__name__}: {exc}"[:300], _ms(started))
        latency = _ms(started)
        if 200 <= status < 300:
            return Outcome(status, latency_ms=latency)
        error = f"HTTP {status} {reason}".strip()
        if 300 <= status < 400:
            error += " (redirects are not followed: register the final URL)"
        # 410 Gone: the receiver says this endpoint is gone for good.
        return Outcome(status, error, latency, retry_after=retry_after, permanent=status == 410)


def _ms(started: float) -> float:
    return round((time.perf_counter() - started) * 1000, 1)


# --- the subscription list ----------------------------------------------------------------


_subscription_event = decoder(SubscriptionEvent)


class SubscriptionBook:
    """The live subscriptions (projections.hooks), caught up from HOOKS when one is
    stored (a plain subscription wakes it) and before an event that may be newer."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.view = Subscriptions()
        self.changed = asyncio.Event()
        self._lock = asyncio.Lock()
        self._synced_at: datetime | None = None

    async def catch_up(self) -> None:
        """Apply what HOOKS holds beyond the position (up to when this began)."""
        async with self._lock:
            began = utcnow()
            async for stored in read(self.bus, HOOKS.name, start_seq=self.view.position + 1):
                try:
                    event = _subscription_event(stored.data)
                except ContractError as exc:
                    log.warning(
                        "skipped a HOOKS message", extra={"seq": stored.seq, "error": str(exc)}
                    )
                    self.view.position = stored.seq
                    continue
                if self.view.apply(stored.seq, stored.time or began, event):
                    self.changed.set()
            self._synced_at = began

    async def sync(self, stored: datetime) -> None:
        """Make sure every subscription stored before `stored` is known."""
        synced = self._synced_at
        if synced is None or stored >= synced - _SKEW:
            await self.catch_up()

    async def run(self, stop: asyncio.Event) -> None:
        """Follow HOOKS until `stop` (woken by each new subscription event, else every 5 s)."""
        wake = asyncio.Event()

        async def on_event(_: Msg) -> None:
            wake.set()

        sub = await self.bus.nc.subscribe("hooks.subscriptions.*", cb=on_event)
        try:
            while not stop.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await _first(wake.wait(), stop.wait())
                wake.clear()
                try:
                    await self.catch_up()
                except (nats.errors.Error, TimeoutError, OSError) as exc:
                    log.warning("webhook subscriptions not read", extra={"error": repr(exc)})
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()


async def _first(*waits: Awaitable[object]) -> None:
    tasks = [asyncio.ensure_future(w) for w in waits]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


# --- fan-out: source events -> jobs -------------------------------------------------------


class _Kind(msgspec.Struct, frozen=True):
    """What the fan-out reads of any event: its kind and id (the rest rides verbatim)."""

    type: str
    id: str = ""


_kind = decoder(_Kind)
# Never give up on an event: a job not made is a webhook lost. Retries back off to 30 s.
_FANOUT_RETRY = RetryPolicy(attempts=1_000_000, delays=(1.0, 2.0, 5.0, 10.0, 30.0))


def _raw(data: bytes) -> bytes:
    return data  # the fan-out decodes only what it needs (`_Kind`), never dead-letters


def fanout_durable(stream: str) -> str:
    """The shared durable consumer of one source stream."""
    return f"hooks-{stream.lower()}"


class _HookLoop(ConsumerLoop[T]):
    """A consumer loop whose durable consumer, when missing, is created by name (the
    `web` user may create consumers, not use the legacy durable API: deploy/nats) and,
    with `start`, from the earliest time a subscription wants rather than the stream's
    beginning (older events match no subscription)."""

    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        payload: type[T],
        handler: Callable[[T, Delivery], Awaitable[None]],
        start: Callable[[], datetime | None] = lambda: None,
    ) -> None:
        super().__init__(bus, spec, payload, handler)
        self.start = start

    async def ensure(self) -> None:
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await self.bus.js.consumer_info(self.spec.stream, self.spec.durable)
            return
        config = dataclasses.replace(self.spec.config(), name=self.spec.durable)
        start = self.start()
        if start is not None:
            config = dataclasses.replace(
                config, deliver_policy=DeliverPolicy.BY_START_TIME, opt_start_time=start
            )
        try:
            await self.bus.js.add_consumer(self.spec.stream, config=config)
        except nats.js.errors.BadRequestError:
            # Created meanwhile by another replica (from its view of the list): use it.
            await self.bus.js.consumer_info(self.spec.stream, self.spec.durable)


class Fanout:
    """Turns one source stream's events into jobs for the subscriptions that want them."""

    def __init__(self, bus: Bus, stream: str, book: SubscriptionBook) -> None:
        self.bus = bus
        self.stream = stream
        self.book = book
        self.jobs = 0
        spec = ConsumerSpec(
            stream=stream,
            durable=fanout_durable(stream),
            filter_subject=STREAMS_BY_NAME[stream].subjects[0],
            retry=_FANOUT_RETRY,
            ack_wait=30.0,
            batch=64,
            fetch_timeout=1.0,
            recreate=False,  # deleted: no subscription wants it any more (see Hooks)
        )
        self.loop: _HookLoop[bytes] = _HookLoop(bus, spec, bytes, self.handle, self._start)
        self.loop.decode = _raw

    def _start(self) -> datetime | None:
        return self.book.view.streams_wanted().get(self.stream)

    async def handle(self, data: bytes, d: Delivery) -> None:
        """One source event: a job per matching subscription (or nothing)."""
        try:
            kind = _kind(data)
        except ContractError:
            return  # not an event anyone can subscribe to
        if HOOKABLE.get(kind.type) != self.stream:
            return
        stored = d.msg.metadata.timestamp
        await self.book.sync(stored)
        subs = self.book.view.matching(kind.type, stored)
        if not subs:
            return
        event_id = kind.id or f"{self.stream}:{d.stream_seq}"
        writes = []
        for sub in subs:
            job = DeliverWebhook(
                id=delivery_id(sub.id, event_id),
                subscription=sub.id,
                event_type=kind.type,
                event_id=event_id,
                source_stream=self.stream,
                source_seq=d.stream_seq,
                event=msgspec.Raw(data),
            )
            writes.append(self.bus.publish(job_subject(sub.id, job.id), job))
        acks = await asyncio.gather(*writes)
        self.jobs += sum(1 for ack in acks if not ack.duplicate)


# --- delivery: jobs -> HTTP ---------------------------------------------------------------

_record = decoder(DeliveryRecord)


def _subscription_key(msg: Msg) -> str:
    """Jobs are queued per subscription (`hooks.jobs.<subscription>.<delivery>`)."""
    return msg.subject.split(".")[2] if msg.subject.count(".") >= 3 else msg.subject


class Deliverer:
    """Delivers jobs: sign, POST, record; retry with backoff; dead-letter the last."""

    def __init__(
        self, bus: Bus, book: SubscriptionBook, settings: HookSettings, sender: Sender
    ) -> None:
        self.bus = bus
        self.book = book
        self.sender = sender
        self.policy = settings.policy()
        self.delivered = 0
        self.dead_lettered = 0
        spec = ConsumerSpec(
            stream=HOOK_JOBS.name,
            durable=DELIVER_DURABLE,
            filter_subject="hooks.jobs.>",
            # The handler counts attempts (across replicas and restarts, from the records)
            # and dead-letters the last itself; the loop only waits what it asks for.
            retry=RetryPolicy(attempts=1_000_000, delays=(0.0,), max_delay=settings.backoff_max),
            ordered_by_subject=True,
            key=_subscription_key,
            ack_wait=max(30.0, 3 * settings.timeout),
            max_ack_pending=256,
            batch=32,
            fetch_timeout=1.0,
        )
        self.loop: _HookLoop[DeliverWebhook] = _HookLoop(bus, spec, DeliverWebhook, self.handle)

    async def last_record(self, subscription: str, delivery: str) -> DeliveryRecord | None:
        """The delivery's last record (its state), or None."""
        subject = delivery_subject(subscription, delivery)
        try:
            raw = await self.bus.js.get_last_msg(HOOK_DELIVERIES.name, subject)
        except nats.js.errors.NotFoundError:
            return None
        try:
            record: DeliveryRecord = _record(raw.data or b"")
        except ContractError:
            return None
        return record

    async def _subscription(self, sub_id: str) -> Subscription | None:
        sub = self.book.view.live.get(sub_id)
        if sub is None and sub_id not in self.book.view.removed:
            await self.book.catch_up()  # a job may be newer than the list here
            sub = self.book.view.live.get(sub_id)
        return sub

    async def handle(self, job: DeliverWebhook, d: Delivery) -> None:
        """One attempt at one job (see the module docstring)."""
        sub_id = _subscription_key(d.msg)  # addressed by the subject, not the payload
        where = {"subscription": sub_id, "delivery": job.id, "event": job.event_type}
        sub = await self._subscription(sub_id)
        if sub is None:
            log.info("webhook removed: delivery dropped", extra=where)
            return
        last = await self.last_record(sub_id, job.id)
        if isinstance(last, WebhookDelivered | WebhookDeadLettered):
            return  # done before: this job was made or delivered again
        prior = list(last.errors) if isinstance(last, WebhookDeliveryFailed) else []
        attempt = len(prior) + 1
        outcome = await self.sender.post(sub, job, attempt)
        record_subject = delivery_subject(sub_id, job.id)
        if outcome.ok:
            assert outcome.status is not None
            done = WebhookDelivered(
                subscription=sub_id,
                delivery=job.id,
                event_type=job.event_type,
                event_id=job.event_id,
                attempt=attempt,
                status=outcome.status,
                latency_ms=outcome.latency_ms,
            )
            await self.bus.publish(record_subject, done, msg_id=f"{job.id}:{attempt}:ok")
            self.delivered += 1
            return
        errors = [*prior, AttemptError(attempt=attempt, error=outcome.error)]
        if outcome.permanent or self.policy.last(attempt):
            reason = outcome.error
            if not outcome.permanent:
                reason = f"{reason} (gave up after {attempt} attempts)"
            letter = WebhookDeadLettered(
                subscription=sub_id,
                delivery=job.id,
                event_type=job.event_type,
                event_id=job.event_id,
                reason=reason,
                errors=errors,
                source_stream=job.source_stream,
                source_seq=job.source_seq,
                event=job.event,
            )
            await self.bus.publish(record_subject, letter, msg_id=f"{job.id}:{attempt}:dead")
            self.dead_lettered += 1
            log.error("webhook dead-lettered", extra={**where, "reason": reason})
            return
        delay = self.policy.delay(attempt, outcome.retry_after)
        failed = WebhookDeliveryFailed(
            subscription=sub_id,
            delivery=job.id,
            event_type=job.event_type,
            event_id=job.event_id,
            attempt=attempt,
            error=outcome.error,
            status=outcome.status,
            errors=errors,
            retry_in=delay,
        )
        await self.bus.publish(record_subject, failed, msg_id=f"{job.id}:{attempt}:failed")
        raise TransientError(f"webhook attempt {attempt}: {outcome.error}", delay=delay)


# --- the part a role runs -----------------------------------------------------------------


@dataclass
class _Running:
    fanout: Fanout
    stop: asyncio.Event
    task: asyncio.Task[None]


class Hooks:
    """Outgoing webhooks for one process: the book, the deliverer, and a fan-out per
    source stream some live subscription wants (started and stopped as the list changes)."""

    def __init__(
        self,
        bus: Bus,
        settings: HookSettings,
        *,
        resolve: Resolve = system_resolve,
        verify: ssl.SSLContext | bool = True,
    ) -> None:
        self.bus = bus
        self.settings = settings
        self.book = SubscriptionBook(bus)
        self.sender = Sender(settings, resolve, verify)
        self.deliverer = Deliverer(bus, self.book, settings, self.sender)
        self.fanouts: dict[str, _Running] = {}

    async def run(self, stop: asyncio.Event) -> None:
        """Run until `stop`; a part that fails takes the others (and the role) down."""
        await self.book.catch_up()
        halt = asyncio.Event()  # ours: a failing part stops the others, not the role's stop
        parts = [
            asyncio.create_task(self.book.run(halt), name="hooks-book"),
            asyncio.create_task(self.deliverer.loop.run(halt), name="hooks-deliver"),
            asyncio.create_task(self._supervise(halt), name="hooks-fanout"),
        ]
        stopper = asyncio.create_task(stop.wait())
        try:
            done, _ = await asyncio.wait([stopper, *parts], return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    raise task.exception()  # type: ignore[misc]
        finally:
            halt.set()
            stopper.cancel()
            await asyncio.gather(stopper, *parts, return_exceptions=True)
            await self.sender.aclose()

    async def _supervise(self, stop: asyncio.Event) -> None:
        # A consumer no subscription wants (left by replicas that stopped while the last
        # subscription of its stream was removed) would pile up pending events: delete it.
        wanted = self.book.view.streams_wanted()
        for stream in SOURCE_STREAMS:
            if stream not in wanted:
                with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                    await self.bus.js.delete_consumer(stream, fanout_durable(stream))
        try:
            while not stop.is_set():
                self.book.changed.clear()
                await self._reconcile()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(5.0):
                        await _first(self.book.changed.wait(), stop.wait())
        finally:
            for stream in list(self.fanouts):
                await self._stop(stream, delete=False)

    async def _reconcile(self) -> None:
        wanted = self.book.view.streams_wanted()
        for stream in SOURCE_STREAMS:
            running = self.fanouts.get(stream)
            if running is not None and running.task.done():
                if (exc := running.task.exception()) is not None:
                    raise exc
                del self.fanouts[stream]  # its consumer was deleted: start again if wanted
                running = None
            if stream in wanted and running is None:
                fanout = Fanout(self.bus, stream, self.book)
                halt = asyncio.Event()
                task = asyncio.create_task(fanout.loop.run(halt), name=f"hooks-{stream}")
                self.fanouts[stream] = _Running(fanout, halt, task)
                log.info("webhook fan-out started", extra={"stream": stream})
            elif stream not in wanted and running is not None:
                await self._stop(stream, delete=True)

    async def _stop(self, stream: str, *, delete: bool) -> None:
        running = self.fanouts.pop(stream)
        running.stop.set()
        await asyncio.gather(running.task, return_exceptions=True)
        if delete:  # no subscription wants the stream: nothing should read it
            with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
                await self.bus.js.delete_consumer(stream, fanout_durable(stream))
            log.info("webhook fan-out stopped", extra={"stream": stream})


def decode_record(data: bytes) -> DeliveryRecord:
    """A HOOK_DELIVERIES record (ContractError if it is not one)."""
    return decode(data, DeliveryRecord)  # type: ignore[arg-type]
