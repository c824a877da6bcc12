"""One consumer-loop building block: durable pull consumer, explicit acks, errors -> acks.

The loop is typed (ADR 0017): it decodes each delivery once, at the edge, with the
contract type's cached decoder, and calls `handler(body, delivery)` with the typed body
(the `Delivery` carries the metadata). A payload that does not decode is dead-lettered
with a one-line reason; the handler never sees it. The handler returns normally (ack),
raises TransientError (retry), PermanentError or a ContractError (dead-letter with the
attempt history, then term), or AbandonError (hand the message back untouched). Any
other exception is treated as transient and logged with its traceback.

The spec's `RetryPolicy` is the one place attempts and waits are decided: each retry
waits `retry.delay(attempt, requested)` (a TransientError's `delay` is what it requests),
and a failure of the last attempt dead-letters, so nothing stays stuck in a work queue.
A NATS outage (no responders, no stream response, a timeout, a reconnect: `NATS_OUTAGE`) is
not the message's fault and uses up no attempt: it is retried with the same backoff until
NATS answers or the process stops, so a leader election that outlasts the ladder (4-9 s
per round in nats-server) dead-letters nothing (ADR 0045).

Two ways to run:
- sequential (default): one message at a time; a retry is a `nak(delay)`.
- `ordered_by_subject`: one message at a time *per subject*, subjects in parallel (up to
  `max_ack_pending` held). A retry waits in place, keeping the message alive with
  `in_progress()`, because a nak would let the next message of the same subject overtake
  it. This is how per-chat order holds without one chat blocking the others. The spec's
  `key` may order by something else than the subject (e.g. the chat in the payload).

  With `max_per_subject` (fairness, ADR 0015) one subject holds at most that many
  messages here; the rest are handed back with a delay sized to the subject's pace
  (`nak(delay)`), so a flooding subject cannot fill the local window and every other
  subject keeps being fetched. A handed-back message is redelivered after the ones behind
  it were fetched: only a handler that keeps order itself across redeliveries (the core's
  chat record) may use it. The server still counts handed-back messages as pending, so
  the server window (`max_ack_pending`) is made larger than what is held here
  (`max_held`).
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, cast

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.codec import decoder
from contracts.errors import ContractError
from contracts.events import AttemptError, DeadLettered
from contracts.streams import ATTEMPTS
from services.runtime.bus import Bus, take_pending
from services.runtime.errors import NATS_OUTAGE, AbandonError, PermanentError, TransientError
from services.runtime.health import READINESS, Flag
from services.runtime.metrics import consumer_bound, instruments, labels
from services.runtime.retry import RetryPolicy
from services.runtime.telemetry import consume_span

__all__ = ["ConsumerLoop", "ConsumerSpec", "Delivery", "RetryPolicy"]

T = TypeVar("T")

log = logging.getLogger(__name__)

_NATS_TRANSIENT = (nats.errors.Error, asyncio.TimeoutError, OSError)

# What a dead letter keeps (ADR 0013): the payload up to LETTER_PAYLOAD_LIMIT (beyond it,
# cut, with the original's size and sha256), headers up to LETTER_HEADERS_LIMIT, each
# error text up to LETTER_TEXT_LIMIT. A letter thus stays far under max_payload.
LETTER_PAYLOAD_LIMIT = 64 * 1024
LETTER_HEADERS_LIMIT = 8 * 1024
LETTER_TEXT_LIMIT = 2000
_SUBJECT_SHOWN = 200  # characters of an uncarriable subject kept in its letter

DEFAULT_RETRY = RetryPolicy()


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer and how its loop behaves."""

    stream: str
    durable: str
    filter_subject: str
    # Attempts per message and the wait before each retry; the last failure dead-letters.
    retry: RetryPolicy = DEFAULT_RETRY
    # Ordered mode: attempts of a redelivered message that began and never ended (its
    # process stopped mid-attempt) before it is dead-lettered without another one, so a
    # message that kills its process is not redelivered forever (the server's
    # max_deliver is unlimited there). Hand-backs and held waits do not count. -1: off.
    max_unsettled: int = 3
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    batch: int = 100
    fetch_timeout: float = 1.0
    ordered_by_subject: bool = False
    # Wait for the server to confirm each ack (so a graceful handover never hands over an
    # acked message). A handler whose own records make a redelivery harmless can skip it.
    sync_ack: bool = True
    # Ordered-by-subject only. At most this many messages of one subject are held (0: no
    # cap); more are handed back with a delay. Only for handlers that keep per-subject
    # order across redeliveries themselves (see the module docstring).
    max_per_subject: int = 0
    # Ordered-by-subject only: messages held (and kept alive) here at once; 0 means
    # `max_ack_pending`. Smaller than the server window when handed-back messages, which
    # the server still counts as pending, must not crowd out other subjects.
    max_held: int = 0
    # The job a dead letter names (`DeadLettered.job_id`), if the stream's messages are
    # jobs; None: letters name none. The stream's owner says how (e.g. the egress).
    letter_job: Callable[[Delivery], str | None] | None = None
    # A fetch that finds the consumer gone recreates it (deleted under us, e.g. by an
    # operator). False: the loop stops instead -- for a consumer only one process may pull
    # from (the egress, ADR 0033), whose deletion means another process took it over.
    recreate: bool = True
    # Ordered-by-subject only: what messages are ordered by (one queue per key); None:
    # the subject. A key read from the payload must not raise (an undecodable payload
    # gets any key: its attempt dead-letters it).
    key: Callable[[Msg], str] | None = None

    def config(self) -> ConsumerConfig:
        """The nats-py consumer config."""
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            # In-place retries count attempts themselves; the server must not give up. In
            # sequential mode one delivery past the attempts is kept to dead-letter a
            # message whose every attempt stopped the process (see `crash_looped`). Retry
            # waits are the loop's nak(delay), from the policy: no server-side backoff.
            max_deliver=-1 if self.ordered_by_subject else self.retry.attempts + 1,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
        )

    @property
    def delivery_limit(self) -> int:
        """Sequential mode: server deliveries a message may have before it is
        dead-lettered without another attempt; 0: no limit."""
        return 0 if self.ordered_by_subject else self.retry.attempts


@dataclass
class Delivery:
    """One delivered message, as a handler sees it."""

    msg: Msg
    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    num_delivered: int
    attempt: int = 1  # this process's attempt (in-place retries count up; redeliveries too)
    outages: int = 0  # retries for a NATS outage in a row: they use up no attempt
    errors: list[AttemptError] = field(default_factory=list)
    # Ordered-by-subject mode: True once an earlier message of the same subject is queued
    # behind this one (a redelivery); a handler waiting for its turn should step aside.
    overtaken: Callable[[], bool] = lambda: False
    # The typed body, once decoded (`decoded`): in-place retries reuse it.
    body: Any = field(default=None, repr=False)
    decoded: bool = field(default=False, repr=False)

    @property
    def msg_id(self) -> str:
        """The `Nats-Msg-Id` it was published with ('' if none)."""
        return self.headers.get("Nats-Msg-Id", "")

    async def in_progress(self) -> None:
        """Tell the server this slow message is still being worked on."""
        with contextlib.suppress(*_NATS_TRANSIENT):
            await self.msg.in_progress()


Handler = Callable[[T, Delivery], Awaitable[None]]
# Called with the raw delivery (its payload may not decode) before a message is parked.
DeadLetterHook = Callable[[Delivery, str], Awaitable[None]]


def _delivery(msg: Msg) -> Delivery:
    meta = msg.metadata
    return Delivery(
        msg=msg,
        subject=msg.subject,
        data=msg.data,
        headers=dict(msg.headers or {}),
        stream_seq=meta.sequence.stream,
        num_delivered=meta.num_delivered,
        attempt=meta.num_delivered,
    )


class ConsumerLoop(Generic[T]):
    """Pull, decode as `payload`, handle, settle. Stops (finishing the messages in hand)
    when `stop` is set."""

    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        payload: type[T],
        handler: Handler[T],
        *,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        # The contract type's cached decoder (made once per type, shared by every loop).
        self.decode: Callable[[bytes], T] = decoder(cast(Any, payload))
        self.handler = handler
        self.on_dead_letter = on_dead_letter
        self.handled = 0
        self.dead_lettered = 0
        # Ordered mode: a redelivered message whose earlier attempt never ended runs
        # alone among such suspects, so innocent ones are not killed with a poison one.
        self.suspects = asyncio.Lock()
        self._attempts_kv: KeyValue | None = None
        self._labels = labels(("stream", spec.stream), ("consumer", spec.durable))
        self.gone = False  # the consumer was deleted under us and not recreated (spec)
        self._keyed: _KeyedRun | None = None

    def holds(self, seq: int) -> bool:
        """Ordered mode: True while this loop holds (has fetched, not yet settled) the
        message at stream sequence `seq`."""
        return self._keyed is not None and seq in self._keyed.held

    async def ensure(self) -> None:
        """Create or update the durable consumer."""
        await self.bus.js.add_consumer(self.spec.stream, config=self.spec.config())

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; connection trouble is waited out, not fatal."""
        bound = Flag("not bound yet")
        with contextlib.ExitStack() as undo:
            name = f"consumer {self.spec.stream}/{self.spec.durable}"
            undo.callback(READINESS.add(name, bound.check))
            await self.ensure()
            sub = await self.bus.js.pull_subscribe_bind(
                durable=self.spec.durable, stream=self.spec.stream
            )
            bound.met()
            undo.callback(consumer_bound(self.spec.stream, self.spec.durable))
            await self._consume(sub, stop)

    async def _consume(self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event) -> None:
        log.info(
            "consuming",
            extra={
                "stream": self.spec.stream,
                "consumer": self.spec.durable,
                "filter": self.spec.filter_subject,
            },
        )
        try:
            if self.spec.ordered_by_subject:
                self._keyed = _KeyedRun(self, sub, stop)
                try:
                    await self._keyed.run()
                finally:
                    self._keyed = None
            else:
                await self._run_sequential(sub, stop)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()

    async def _run_sequential(
        self, sub: JetStreamContext.PullSubscription, stop: asyncio.Event
    ) -> None:
        batch = max(1, min(self.spec.batch, self.spec.max_ack_pending))
        while not stop.is_set():
            for msg in await self.fetch(sub, batch, stop):
                # Messages already fetched are handled even after stop: they are ours
                # until settled, and handing them back would only delay them.
                await self._handle_once(_delivery(msg), stop)

    async def fetch(
        self, sub: JetStreamContext.PullSubscription, batch: int, stop: asyncio.Event
    ) -> list[Msg]:
        """Up to `batch` messages; [] on a quiet interval or a connection problem."""
        try:
            return await pull(sub, batch, self.spec.fetch_timeout)
        except (TimeoutError, nats.errors.TimeoutError):
            return []
        except (nats.js.errors.NotFoundError, nats.js.errors.ServiceUnavailableError) as exc:
            # A pull request to a deleted consumer has no responder (503), as has one sent
            # during a leader election: only the consumer's info tells them apart.
            if not await self._deleted():
                log.warning(
                    "fetch failed", extra={"consumer": self.spec.durable, "error": repr(exc)}
                )
                await _wait(stop, 1.0)
                return []
            if not self.spec.recreate:
                # Deleted by whoever took it over (or an operator): recreating it would pull
                # beside the new puller. Stop; the messages in hand are finished or handed back.
                log.warning(
                    "consumer deleted under us; stopping without recreating it",
                    extra={"stream": self.spec.stream, "consumer": self.spec.durable},
                )
                self.gone = True
                stop.set()
                return []
            # The consumer was deleted under us (e.g. by an operator): recreate it.
            await _wait(stop, 1.0)
            with contextlib.suppress(*_NATS_TRANSIENT):
                await self.ensure()
            return []
        except _NATS_TRANSIENT as exc:
            log.warning("fetch failed", extra={"consumer": self.spec.durable, "error": repr(exc)})
            await _wait(stop, 1.0)
            return []

    async def _deleted(self) -> bool:
        """True if the consumer is gone (False when that cannot be told now)."""
        try:
            await self.bus.js.consumer_info(self.spec.stream, self.spec.durable)
        except nats.js.errors.NotFoundError:
            return True
        except _NATS_TRANSIENT:
            return False
        return False

    async def _handle_once(self, d: Delivery, stop: asyncio.Event) -> None:
        """Sequential mode: one attempt; a retry is a nak(delay) (server-side redelivery)."""
        if reason := self.crash_looped(d):
            await self.dead_letter(d, reason)
            return
        last_try = self.spec.retry.last(d.num_delivered)
        outcome = await self.attempt(d)
        # An outage is waited out in place (kept alive): a nak would use up a server
        # delivery, and max_deliver would end the message's deliveries.
        while isinstance(outcome, _Retry) and outcome.outage:
            self.log_retry(d, outcome.error, outcome.delay)
            if await _wait(stop, min(outcome.delay, self.spec.ack_wait / 3)):
                await self.settle(d.msg.nak())  # shutting down: hand it back
                return
            await d.in_progress()
            outcome = await self.attempt(d)
        match outcome:
            case None:
                await self.settle(d.msg.ack_sync(timeout=5) if self.spec.sync_ack else d.msg.ack())
                self.handled += 1
            case _Retry(error, delay) if not last_try:
                self.log_retry(d, error, delay)
                await self.settle(d.msg.nak(delay=delay))
            case _Retry(error, _):
                await self.dead_letter(d, error, gave_up=d.num_delivered)
            case _DeadLetter(reason):
                await self.dead_letter(d, reason)
            case _Abandon(delay):
                await self.settle(d.msg.nak(delay=delay or None))

    async def attempt(self, d: Delivery) -> _Outcome | None:
        """Decode (once per delivery), run the handler once in its span; None means success."""
        with consume_span(d.subject, d.headers, self.spec.durable, d.msg_id) as span:
            try:
                if not d.decoded:
                    d.body, d.decoded = self.decode(d.data), True
                await self.handler(d.body, d)
            except (PermanentError, ContractError) as exc:
                span.set_attribute("switchboard.outcome", "dead-letter")
                if isinstance(exc, PermanentError):
                    d.errors.extend(exc.errors)
                return _DeadLetter(f"{type(exc).__name__}: {exc}")
            except TransientError as exc:
                span.set_attribute("switchboard.outcome", "retry")
                return _Retry(str(exc), self.spec.retry.delay(d.attempt, exc.delay))
            except AbandonError as exc:
                span.set_attribute("switchboard.outcome", "abandoned")
                log.info("abandoned", extra={"consumer": self.spec.durable, "reason": str(exc)})
                return _Abandon(exc.delay)
            except NATS_OUTAGE as exc:
                # Expected while NATS reconnects or a stream elects a leader: one line
                # (log_retry, with the delay), no traceback, and no attempt used up.
                span.set_attribute("switchboard.outcome", "retry")
                d.outages += 1
                error = f"{type(exc).__name__}: {exc}"
                return _Retry(error, self.spec.retry.delay(d.outages), outage=True)
            except _NATS_TRANSIENT as exc:
                span.set_attribute("switchboard.outcome", "retry")
                return _Retry(f"{type(exc).__name__}: {exc}", self.spec.retry.delay(d.attempt))
            except Exception as exc:
                span.set_attribute("switchboard.outcome", "retry")
                log.exception(  # an unexpected type: a bug, so the traceback
                    "handler failed",
                    extra={
                        "consumer": self.spec.durable,
                        "subject": _cut(d.subject),
                        "seq": d.stream_seq,
                    },
                )
                return _Retry(f"{type(exc).__name__}: {exc}", self.spec.retry.delay(d.attempt))
            span.set_attribute("switchboard.outcome", "ack")
            d.outages = 0
            return None

    def crash_looped(self, d: Delivery) -> str | None:
        """Why `d` is dead-lettered before another attempt: the server delivered it more
        often than the limit without it being settled (it stopped its process each time,
        or kept being handed back). None while it is within the limit."""
        limit = self.spec.delivery_limit
        if not limit or d.num_delivered <= limit:
            return None
        return (
            f"delivered {d.num_delivered} times without being settled (limit {limit}):"
            " the process handling it stopped or handed it back each time"
        )

    def _mark_key(self, d: Delivery) -> str:
        return f"{self.spec.stream}.{self.spec.durable}.{d.stream_seq}"

    async def unsettled(self, d: Delivery) -> int:
        """How many attempts of this redelivered message began and never ended (0 for a
        first delivery, or when the marks cannot be read: never a reason to stall)."""
        if d.num_delivered <= 1 or self.spec.max_unsettled < 0:
            return 0
        try:
            if self._attempts_kv is None:
                self._attempts_kv = await self.bus.js.key_value(ATTEMPTS.name)
            entry = await self._attempts_kv.get(self._mark_key(d))
            return int(entry.value or b"0")
        except (nats.js.errors.KeyNotFoundError, ValueError):
            return 0
        except _NATS_TRANSIENT as exc:
            log.warning("attempt marks unreadable", extra={"error": repr(exc)})
            return 0

    async def mark(self, d: Delivery, unsettled: int) -> None:
        """Record, before an attempt of a redelivered message, that one more has begun."""
        if d.num_delivered <= 1 or self._attempts_kv is None:
            return
        with contextlib.suppress(*_NATS_TRANSIENT):
            await self._attempts_kv.put(self._mark_key(d), str(unsettled + 1).encode())

    async def unmark(self, d: Delivery) -> None:
        """The attempt ended (settled or handed back): it no longer counts."""
        if d.num_delivered <= 1 or self._attempts_kv is None:
            return
        with contextlib.suppress(*_NATS_TRANSIENT):
            await self._attempts_kv.purge(self._mark_key(d))

    def log_retry(self, d: Delivery, error: str, delay: float) -> None:
        instruments().retries.add(1, self._labels)
        log.warning(
            "retrying",
            extra={
                "consumer": self.spec.durable,
                "subject": _cut(d.subject),
                "seq": d.stream_seq,
                "attempt": d.attempt,
                **({"outage": d.outages} if d.outages else {}),
                "delay_s": delay,
                "error": error,
            },
        )

    async def dead_letter(self, d: Delivery, reason: str, *, gave_up: int = 0) -> None:
        """Park the message in DEADLETTER with its attempt history, then remove it.

        Never raises and always ends the message: a failing hook is recorded in the letter;
        a letter that cannot be published whole is published with what can be recorded;
        only a NATS outage keeps the message in its stream (nak, redelivered later).
        """
        if gave_up:  # the cause first, the count beside it (what `svc dlq ls` shows)
            reason = f"{reason} (gave up after {gave_up} attempts)"
        hook_error = ""
        if self.on_dead_letter is not None:
            try:
                await self.on_dead_letter(d, reason)
            except (*_NATS_TRANSIENT, TransientError) as exc:
                limit = self.spec.delivery_limit
                if not limit or d.num_delivered < limit:
                    log.warning(
                        "dead-letter hook failed; retrying later",
                        extra={"error": _clip(repr(exc)), "seq": d.stream_seq},
                    )
                    requested = exc.delay if isinstance(exc, TransientError) else 0.0
                    await self.settle(d.msg.nak(delay=self.spec.retry.delay(d.attempt, requested)))
                    return
                hook_error = _clip(f"{type(exc).__name__}: {exc}")  # out of deliveries
            except Exception as exc:
                # The hook's own failure must not keep the message (e.g. a job whose chat
                # or account cannot form a subject): record it, park the message anyway.
                hook_error = _clip(f"{type(exc).__name__}: {exc}")
                log.warning(
                    "dead-letter hook failed; recorded in the letter",
                    extra={"error": hook_error, "seq": d.stream_seq},
                )
        letter = self.letter(d, reason, hook_error)
        subject = subjects.deadletter(d.subject, self.spec.stream)
        # Deterministic id: a crash after this publish and before term() dedupes.
        msg_id = f"dlq:{self.spec.stream}:{d.stream_seq}"
        try:
            try:
                await self.bus.publish(subject, letter, msg_id=msg_id)
            except _NATS_TRANSIENT:
                raise
            except Exception as exc:  # e.g. refused by the server: keep what can be kept
                log.warning(
                    "dead letter refused; publishing it without payload and headers",
                    extra={"error": _clip(repr(exc)), "seq": d.stream_seq},
                )
                bare = msgspec.structs.replace(
                    letter,
                    payload=b"",
                    headers={},
                    payload_truncated=True,
                    hook_error=_clip(f"{hook_error} letter refused: {exc!r}".strip()),
                )
                await self.bus.publish(subject, bare, msg_id=msg_id)
        except _NATS_TRANSIENT as exc:
            # Could not park it: keep it in the source stream rather than lose it.
            log.error("dead-letter publish failed", extra={"error": repr(exc), "seq": d.stream_seq})
            await self.settle(d.msg.nak(delay=self.spec.retry.delay(d.attempt)))
            return
        except Exception:
            # Not even the bare letter: ending the message is still better than holding it
            # (and its chat) forever. The log line is the only record left.
            log.exception(
                "dead letter could not be stored; ending the message",
                extra={"subject": _cut(d.subject), "seq": d.stream_seq, "reason": reason},
            )
        log.error(
            "dead-lettered",
            extra={
                "consumer": self.spec.durable,
                "subject": _cut(d.subject),
                "seq": d.stream_seq,
                "reason": _cut(reason, 500),
            },
        )
        await self.settle(d.msg.term())
        self.dead_lettered += 1

    def letter(self, d: Delivery, reason: str, hook_error: str = "") -> DeadLettered:
        """The dead letter of `d`, within the bounds (ADR 0013)."""
        # The handler's own attempt history when it kept one, else this attempt's error.
        errors = [*d.errors] or [AttemptError(attempt=d.attempt, error=reason)]
        errors = [
            e
            if len(e.error) <= LETTER_TEXT_LIMIT
            else AttemptError(attempt=e.attempt, error=_clip(e.error), at=e.at)
            for e in errors[-20:]
        ]
        payload, truncated = d.data, len(d.data) > LETTER_PAYLOAD_LIMIT
        if truncated:
            payload = d.data[:LETTER_PAYLOAD_LIMIT]
        subject, subject_digest = _safe_text(d.subject), ""
        if not subjects.carriable(d.subject):
            subject = _cut(subject, _SUBJECT_SHOWN)
            subject_digest = _sha256(d.subject.encode("utf-8", "surrogateescape"))
        msg_id = d.msg_id
        job_id = self.spec.letter_job(d) if self.spec.letter_job is not None else None
        return DeadLettered(
            source_stream=self.spec.stream,
            source_subject=subject,
            source_seq=d.stream_seq,
            reason=_clip(reason),
            errors=errors,
            payload=payload,
            headers=_bounded_headers(d.headers),
            source_msg_id=_clip(_safe_text(msg_id), 256),
            job_id=job_id,
            payload_truncated=truncated,
            payload_size=len(d.data),
            payload_sha256=_sha256(d.data),
            source_subject_sha256=subject_digest,
            hook_error=hook_error,
        )

    async def settle(self, ack: Awaitable[object]) -> None:
        """Send an ack/nak/term; a lost one only means a redelivery, which handlers tolerate."""
        try:
            await ack
        except _NATS_TRANSIENT as exc:
            log.warning("ack failed; the message will be redelivered", extra={"error": repr(exc)})


@dataclass(frozen=True)
class _Retry:
    error: str
    delay: float
    outage: bool = False  # NATS, not the message: uses up no attempt


@dataclass(frozen=True)
class _DeadLetter:
    reason: str


@dataclass(frozen=True)
class _Abandon:
    delay: float = 0.0


_Outcome = _Retry | _DeadLetter | _Abandon


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _safe_text(text: str) -> str:
    """`text` as valid UTF-8 (an undecodable byte, kept as a surrogate, becomes \\xNN)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _cut(text: str, limit: int = 200) -> str:
    """At most `limit` characters of `text` for a log line or a letter."""
    text = _safe_text(text)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text)} chars)"


def _clip(text: str, limit: int = LETTER_TEXT_LIMIT) -> str:
    return _cut(text, limit)


def _bounded_headers(headers: dict[str, str]) -> dict[str, str]:
    """The headers a letter keeps: all but Nats-Msg-Id, within LETTER_HEADERS_LIMIT."""
    kept: dict[str, str] = {}
    size = 0
    for key, value in headers.items():
        if key == "Nats-Msg-Id":
            continue
        k, v = _safe_text(key)[:256], _safe_text(value)[:LETTER_TEXT_LIMIT]
        size += len(k) + len(v)
        if size > LETTER_HEADERS_LIMIT:
            kept["Switchboard-Headers-Cut"] = f"{len(headers)} headers, over {LETTER_HEADERS_LIMIT}"
            break
        kept[k] = v
    return kept


# Pull-request statuses that end a request without an error: 404 no messages, 408 request
# expired, 409 conflicts (max waiting, leadership change, consumer deleted); 100 is a heartbeat.
_END_OF_REQUEST = frozenset({"404", "408", "409"})
_HEARTBEAT = "100"


async def pull(sub: JetStreamContext.PullSubscription, batch: int, timeout: float) -> list[Msg]:
    """Up to `batch` messages, handed over as soon as one exists (ADR 0034).

    nats-py 2.16's `fetch(batch > 1)` on an idle consumer sends `no_wait` *with* `expires`,
    which the server treats as a lingering pull, and then waits for the rest of the batch;
    the server ends that request only on its next event, so a lone message waits for the
    next one to arrive (the latency tail equals the gap between messages). Instead:
    what is already here, else one `no_wait` request without `expires` (the server answers
    at once with what it has, up to `batch`: batching under load), else a lingering
    request for exactly one message (fulfilled, hence ended, by the first that arrives).
    Raises TimeoutError (nats.errors) when nothing came in `timeout`; an error status
    (e.g. 503: no consumer) as nats-py's fetch does.
    """
    msgs = _drain(sub, batch)
    if msgs:
        return msgs
    msgs = await _request(sub, {"batch": batch, "no_wait": True}, batch, timeout)
    if msgs:
        return msgs
    expires = max(int(timeout * 1e9) - 1_000_000, 1_000_000)
    return await _request(sub, {"batch": 1, "expires": expires}, 1, timeout)


def _drain(sub: JetStreamContext.PullSubscription, limit: int) -> list[Msg]:
    """Messages already in the inbox (late answers to earlier requests); stale statuses
    are dropped."""
    msgs: list[Msg] = []
    while len(msgs) < limit and (msg := take_pending(sub._sub)) is not None:
        if not (msg.headers and msg.headers.get("Status")):
            msgs.append(msg)
    return msgs


async def _request(
    sub: JetStreamContext.PullSubscription, request: dict[str, Any], batch: int, timeout: float
) -> list[Msg]:
    """Send one pull request; collect its messages until it ends, is filled or times out."""
    raw = sub._sub
    assert raw is not None
    await sub._nc.publish(sub._nms, msgspec.json.encode(request), sub._deliver)
    deadline = time.monotonic() + timeout
    msgs: list[Msg] = []
    while len(msgs) < batch:
        # What has already arrived first, without a wait (a full batch comes in one read).
        got = take_pending(raw)
        if got is None:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            try:
                got = await raw.next_msg(timeout=remaining)
            except nats.errors.TimeoutError:
                if msgs:
                    break
                raise
        status = got.headers.get("Status") if got.headers else None
        if not status:
            msgs.append(got)
        elif status == _HEARTBEAT:
            continue
        elif status in _END_OF_REQUEST or msgs:
            break
        else:
            nats.js.errors.APIError.from_msg(got)
    return msgs


async def _wait(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stop`; True if it was set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
    return stop.is_set()


# Handing back over-cap messages: never sooner than this (no redelivery spin), never
# later than this (a pace estimate gone wrong costs at most this much latency).
DEFER_MIN_S = 0.25
DEFER_MAX_S = 30.0
# The pace (seconds per message of a subject) a hand-back delay is sized with is at most
# this: with several replicas a message can wait for an earlier one held elsewhere, and a
# pace learned from such waits would park the subject's next message ever longer.
PACE_MAX_S = 1.0


@dataclass
class _Backlog:
    """A subject over its cap: the messages handed back and when each should be back."""

    deferred: dict[int, float] = field(default_factory=dict)  # stream seq -> forget after
    pace: float = 0.0  # seconds between two settled messages of the subject (EWMA)
    last_done: float = 0.0  # when its last message was settled (monotonic)


class _KeyedRun:
    """Ordered-by-subject mode: per-subject queues, one worker task per busy subject."""

    def __init__(
        self, loop: ConsumerLoop[Any], sub: JetStreamContext.PullSubscription, stop: asyncio.Event
    ) -> None:
        self.loop = loop
        self.spec = loop.spec
        self.sub = sub
        self.stop = stop
        self.limit = self.spec.max_held or self.spec.max_ack_pending  # held at most
        self.held: dict[int, Msg] = {}  # stream seq -> latest delivery, until settled
        self.queues: dict[str, list[int]] = {}  # per subject, sorted by stream sequence
        self.workers: dict[str, asyncio.Task[None]] = {}
        self.slot_freed = asyncio.Event()
        self.backlogs: dict[str, _Backlog] = {}  # subjects with messages handed back
        self.turn_time = 0.1  # seconds one message takes (EWMA over every subject)
        self.deferred = 0  # messages handed back for being over their subject's cap

    async def run(self) -> None:
        heartbeat = asyncio.create_task(self._heartbeat())
        # Refill in runs: with nearly every slot taken, wait until this many are free
        # rather than fetching one message per freed slot (a request per message). What is
        # held keeps the workers busy meanwhile; an idle consumer is never made to wait,
        # and one whose held messages do not move (e.g. each waits for an earlier one not
        # yet fetched) fetches into whatever is free after a quiet `fetch_timeout`.
        refill = max(1, min(self.spec.batch, self.limit) // 2)
        stalled = False
        try:
            while not self.stop.is_set():
                free = self.limit - len(self.held)
                if free <= 0 or (free < refill and self.held and not stalled):
                    # fetch(batch > free) would block for the whole timeout: wait for a slot.
                    self.slot_freed.clear()
                    try:
                        await asyncio.wait_for(self.slot_freed.wait(), self.spec.fetch_timeout)
                    except TimeoutError:
                        stalled = True
                    continue
                stalled = False
                for msg in await self.loop.fetch(self.sub, min(self.spec.batch, free), self.stop):
                    await self._dispatch(msg)
        finally:
            # Stop: each worker finishes the message in hand; the rest are handed back.
            await asyncio.gather(*self.workers.values(), return_exceptions=True)
            heartbeat.cancel()
            for seq in sorted(self.held):
                await self.loop.settle(self.held.pop(seq).nak())
            with contextlib.suppress(*_NATS_TRANSIENT):
                await self.loop.bus.nc.flush(timeout=5)  # acks sent before we return

    async def _dispatch(self, msg: Msg) -> None:
        seq = msg.metadata.sequence.stream
        if seq in self.held:  # a redelivery of one we still hold: keep the newest handle
            self.held[seq] = msg
            return
        key = self.spec.key(msg) if self.spec.key is not None else msg.subject
        if self.spec.max_per_subject:
            delay, evicted = self._over_cap(key, seq)
            if evicted is not None:
                await self._hand_back(key, evicted)
            if delay:
                self.deferred += 1
                await self.loop.settle(msg.nak(delay=delay))
                return
        self.held[seq] = msg
        # Sorted: a redelivered earlier message goes before later ones (not before the one
        # in progress, which may step aside: see Delivery.overtaken).
        queue = self.queues.setdefault(key, [])
        bisect.insort(queue, seq, lo=1 if key in self.workers else 0)
        if key not in self.workers:
            self.workers[key] = asyncio.create_task(self._work(key))

    def _over_cap(self, subject: str, seq: int) -> tuple[float, int | None]:
        """(0, _) if the message may be held now, else how long to hand it back for; and
        a held message of the subject to hand back instead, if any.

        A subject holds at most `max_per_subject` messages: its earliest. A message earlier
        than the last one held takes that one's place (it must go first; the one it
        displaces waits, unless it is already running). Hand-back delays grow with how
        many of the subject's messages are known to go first, at the subject's pace, so a
        message comes back about when its turn comes instead of spinning.
        """
        queue = self.queues.get(subject, [])
        backlog = self.backlogs.get(subject)
        now = time.monotonic()
        earlier = 0
        if backlog is not None:
            backlog.deferred.pop(seq, None)  # it came back
            # Past due and not back: another replica has it (a position estimate only).
            for gone in [s for s, until in backlog.deferred.items() if until < now]:
                del backlog.deferred[gone]
            earlier = sum(1 for s in backlog.deferred if s < seq)
        cap = self.spec.max_per_subject
        # The cap guards a crowded window: while less than half of it is held, a subject
        # takes what comes (a burst in one chat is not handed back when nothing competes),
        # and the other half stays free for the other subjects, each up to the cap.
        room = len(queue) < cap or len(self.held) < self.limit // 2
        if queue and seq < queue[-1]:
            if room:
                return 0.0, None  # it sorts before the later ones held
            # queue[0] is running: it steps aside by itself (Delivery.overtaken).
            return 0.0, queue[-1] if len(queue) > 1 else None
        if room and not earlier:
            return 0.0, None
        # Over the cap, or earlier messages of the subject were handed back and are not
        # back yet: admitted now, this one would run before them and have to step aside
        # when they return (a hand-back cascade); it goes back behind them instead.
        return self._defer(subject, seq, max(len(queue) + earlier - cap + 1, 1)), None

    def _defer(self, subject: str, seq: int, position: int) -> float:
        """Record a hand-back of `seq`, `position` messages behind what the subject holds."""
        backlog = self.backlogs.get(subject)
        if backlog is None:
            backlog = self.backlogs[subject] = _Backlog()
        pace = min(backlog.pace or self.turn_time, PACE_MAX_S)
        # Half the expected wait: a message back early is only handed back again (about
        # log2(position) times in all); one back late would stall its whole subject.
        delay = min(max(position * pace / 2, DEFER_MIN_S), DEFER_MAX_S)
        backlog.deferred[seq] = time.monotonic() + delay + 1.0
        return delay

    async def _hand_back(self, subject: str, seq: int) -> None:
        """Give a held, not yet running message back to the server (an earlier one of its
        subject took its place)."""
        queue = self.queues[subject]
        msg = self.held.pop(seq, None)
        queue.remove(seq)
        if msg is not None:
            self.deferred += 1
            await self.loop.settle(msg.nak(delay=self._defer(subject, seq, 1)))

    def _settled(self, subject: str, started: float, busy_since: float, progressed: bool) -> None:
        """Learn how long a message takes (overall) and how fast a subject with a backlog
        moves: the time between two of its settled messages, not counting time it had
        nothing here (a pace inflated by idling would only idle it more)."""
        now = time.monotonic()
        self.turn_time = 0.8 * self.turn_time + 0.2 * (now - started)
        backlog = self.backlogs.get(subject)
        if backlog is None or not progressed:
            return
        gap = now - max(backlog.last_done, busy_since)
        backlog.pace = gap if not backlog.pace else 0.7 * backlog.pace + 0.3 * gap
        backlog.last_done = now

    def _prune(self) -> None:
        """Forget hand-backs that never came back here (another replica took them)."""
        now = time.monotonic()
        for subject, backlog in list(self.backlogs.items()):
            for gone in [s for s, until in backlog.deferred.items() if until < now]:
                del backlog.deferred[gone]
            if not backlog.deferred and subject not in self.queues:
                del self.backlogs[subject]

    async def _work(self, subject: str) -> None:
        queue = self.queues[subject]
        busy_since = time.monotonic()
        try:
            while queue and not self.stop.is_set():
                seq = queue[0]
                started, before = time.monotonic(), self.loop.handled + self.loop.dead_lettered
                await self._process(self.held[seq], queue)
                progressed = self.loop.handled + self.loop.dead_lettered != before
                self._settled(subject, started, busy_since, progressed)
                queue.remove(seq)
                self.held.pop(seq, None)
                self.slot_freed.set()
        finally:
            del self.workers[subject]
            if not queue:
                del self.queues[subject]

    async def _process(self, msg: Msg, queue: list[int]) -> None:
        """Handle one message to its end. Whatever escapes (a bug) still settles it: a
        message left held would be kept alive by the heartbeat, and its chat stuck, forever."""
        d = _delivery(msg)
        d.attempt = 1  # in-place attempts; server deliveries are limited by crash_looped
        d.overtaken = lambda: len(queue) > 1 and queue[1] < d.stream_seq
        failures = 0
        while True:
            try:
                await self._attempts(d, msg)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                # In place, like a retry, so nothing of its subject overtakes it.
                failures += 1
                log.exception(
                    "message handling failed",
                    extra={"consumer": self.spec.durable, "seq": d.stream_seq},
                )
                d.msg = self.held.get(d.stream_seq, msg)
                if self.spec.retry.last(failures) or await _wait(
                    self.stop, self.spec.retry.delay(failures)
                ):
                    error = f"{type(exc).__name__}: {exc}"
                    await self.loop.dead_letter(d, f"internal error: {error}", gave_up=failures)
                    return

    async def _attempts(self, d: Delivery, msg: Msg) -> None:
        unsettled = await self.loop.unsettled(d)
        if not unsettled:
            await self._attempt_until_settled(d, msg, 0)
            return
        # A suspect: an earlier attempt stopped its process. Suspects run one at a time.
        async with self.loop.suspects:
            await self._attempt_until_settled(d, msg, unsettled)

    async def _attempt_until_settled(self, d: Delivery, msg: Msg, unsettled: int) -> None:
        limit = self.spec.max_unsettled
        if limit >= 0 and unsettled >= limit:
            d.msg = self.held.get(d.stream_seq, msg)
            await self.loop.dead_letter(
                d,
                f"delivered {d.num_delivered} times; {unsettled} attempts never ended"
                f" (limit {limit}): handling it stops the process",
            )
            await self.loop.unmark(d)
            return
        await self.loop.mark(d, unsettled)
        if not await self._attempt_loop(d, msg):
            await self.loop.unmark(d)

    async def _attempt_loop(self, d: Delivery, msg: Msg) -> bool:
        """Attempt until settled; True if the attempt mark was already cleared (a message
        handed back is unmarked *before* the nak: its redelivery may be fetched at once,
        and must not find this attempt's mark and count it as one that never ended)."""
        while True:
            outcome = await self.loop.attempt(d)
            current = self.held.get(d.stream_seq, msg)
            match outcome:
                case None:
                    ack = current.ack_sync(timeout=5) if self.spec.sync_ack else current.ack()
                    await self.loop.settle(ack)
                    self.loop.handled += 1
                    return False
                case _DeadLetter(reason):
                    d.msg = current
                    await self.loop.dead_letter(d, reason)
                    return False
                case _Abandon(delay):
                    await self.loop.unmark(d)
                    await self.loop.settle(current.nak(delay=delay or None))
                    return True
                case _Retry(error, delay, outage):
                    if not outage:
                        d.errors.append(AttemptError(attempt=d.attempt, error=_clip(error)))
                        if self.spec.retry.last(d.attempt):
                            d.msg = current
                            await self.loop.dead_letter(d, error, gave_up=d.attempt)
                            return False
                    self.loop.log_retry(d, error, delay)
                    if await _wait(self.stop, delay):
                        await self.loop.unmark(d)
                        await self.loop.settle(current.nak())  # shutting down: hand it back
                        return True
                    if not outage:
                        d.attempt += 1

    async def _heartbeat(self) -> None:
        """Keep every held message alive while it waits behind its subject's queue."""
        while True:
            await asyncio.sleep(self.spec.ack_wait / 3)
            self._prune()
            for msg in list(self.held.values()):
                with contextlib.suppress(*_NATS_TRANSIENT):
                    await msg.in_progress()
