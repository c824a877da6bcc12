"""One consumer-loop building block: durable pull consumer, explicit acks, errors -> acks.

The handler gets a `Delivery` and returns normally (ack), raises TransientError
(nak with its delay), or raises PermanentError / a ContractError such as a malformed
payload (dead-letter with the attempt history, then term). Any other exception is
treated as transient and logged with its traceback. On the last allowed delivery
anything but success is dead-lettered, so nothing stays stuck in a work queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts import subjects
from contracts.errors import ContractError
from contracts.events import AttemptError, DeadLettered
from contracts.streams import OUTBOUND
from services.runtime.bus import Bus
from services.runtime.errors import PermanentError, TransientError
from services.runtime.telemetry import consume_span

log = logging.getLogger(__name__)

_NATS_TRANSIENT = (nats.errors.Error, asyncio.TimeoutError, OSError)


@dataclass(frozen=True)
class ConsumerSpec:
    """A durable pull consumer and how its loop behaves."""

    stream: str
    durable: str
    filter_subject: str
    max_deliver: int = 5
    ack_wait: float = 30.0
    max_ack_pending: int = 1000
    batch: int = 100
    backoff: tuple[float, ...] = ()
    fetch_timeout: float = 1.0
    retry_delays: tuple[float, ...] = (0.5, 1.0, 2.0, 5.0, 10.0)

    def config(self) -> ConsumerConfig:
        """The nats-py consumer config."""
        return ConsumerConfig(
            durable_name=self.durable,
            filter_subject=self.filter_subject,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            max_deliver=self.max_deliver,
            ack_wait=self.ack_wait,
            max_ack_pending=self.max_ack_pending,
            backoff=list(self.backoff) or None,
        )


@dataclass
class Delivery:
    """One delivered message, as a handler sees it."""

    msg: Msg
    subject: str
    data: bytes
    headers: dict[str, str]
    stream_seq: int
    num_delivered: int
    errors: list[AttemptError] = field(default_factory=list)

    @property
    def msg_id(self) -> str:
        """The `Nats-Msg-Id` it was published with ('' if none)."""
        return self.headers.get("Nats-Msg-Id", "")

    async def in_progress(self) -> None:
        """Tell the server this slow message is still being worked on."""
        await self.msg.in_progress()


Handler = Callable[[Delivery], Awaitable[None]]
DeadLetterHook = Callable[[Delivery, str], Awaitable[None]]


class ConsumerLoop:
    """Pull, handle in order, ack. Stops (draining the current message) when `stop` is set."""

    def __init__(
        self,
        bus: Bus,
        spec: ConsumerSpec,
        handler: Handler,
        *,
        on_dead_letter: DeadLetterHook | None = None,
    ) -> None:
        self.bus = bus
        self.spec = spec
        self.handler = handler
        self.on_dead_letter = on_dead_letter
        self.handled = 0
        self.dead_lettered = 0

    async def ensure(self) -> None:
        """Create or update the durable consumer."""
        await self.bus.js.add_consumer(self.spec.stream, config=self.spec.config())

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set; connection trouble is waited out, not fatal."""
        await self.ensure()
        sub = await self.bus.js.pull_subscribe_bind(
            durable=self.spec.durable, stream=self.spec.stream
        )
        batch = max(1, min(self.spec.batch, self.spec.max_ack_pending))
        log.info(
            "consuming",
            extra={
                "stream": self.spec.stream,
                "consumer": self.spec.durable,
                "filter": self.spec.filter_subject,
            },
        )
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(batch, timeout=self.spec.fetch_timeout)
                except (TimeoutError, nats.errors.TimeoutError):
                    continue
                except nats.js.errors.NotFoundError:
                    # The consumer was deleted under us (e.g. by an operator): recreate it.
                    await self._wait(stop, 1.0)
                    await self._safe_ensure()
                    continue
                except _NATS_TRANSIENT as exc:
                    log.warning(
                        "fetch failed", extra={"consumer": self.spec.durable, "error": repr(exc)}
                    )
                    await self._wait(stop, 1.0)
                    continue
                for msg in msgs:
                    # Messages already fetched are handled even after stop: they are ours
                    # until acked, and handing them back would only delay them.
                    await self._handle(msg)
        finally:
            try:
                await sub.unsubscribe()
            except nats.errors.Error as exc:
                log.debug("unsubscribe failed", extra={"error": repr(exc)})

    async def _safe_ensure(self) -> None:
        try:
            await self.ensure()
        except _NATS_TRANSIENT as exc:
            log.warning("consumer re-create failed", extra={"error": repr(exc)})

    @staticmethod
    async def _wait(stop: asyncio.Event, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), seconds)

    async def _handle(self, msg: Msg) -> None:
        meta = msg.metadata
        delivery = Delivery(
            msg=msg,
            subject=msg.subject,
            data=msg.data,
            headers=dict(msg.headers or {}),
            stream_seq=meta.sequence.stream,
            num_delivered=meta.num_delivered,
        )
        last_try = delivery.num_delivered >= self.spec.max_deliver
        with consume_span(
            msg.subject, delivery.headers, self.spec.durable, delivery.msg_id
        ) as span:
            try:
                await self.handler(delivery)
            except (PermanentError, ContractError) as exc:
                span.set_attribute("switchboard.outcome", "dead-letter")
                await self._dead_letter(delivery, f"{type(exc).__name__}: {exc}")
                return
            except TransientError as exc:
                span.set_attribute("switchboard.outcome", "retry")
                await self._retry(delivery, str(exc), exc.delay, last_try)
                return
            except Exception as exc:
                span.set_attribute("switchboard.outcome", "retry")
                log.exception(
                    "handler failed",
                    extra={
                        "consumer": self.spec.durable,
                        "subject": msg.subject,
                        "seq": delivery.stream_seq,
                    },
                )
                delay = self._delay(delivery.num_delivered)
                await self._retry(delivery, f"{type(exc).__name__}: {exc}", delay, last_try)
                return
            span.set_attribute("switchboard.outcome", "ack")
        # Wait for the server to confirm: on a graceful handover the next owner must not
        # be handed a job whose ack was still in our socket buffer.
        await self._settle(msg.ack_sync(timeout=5))
        self.handled += 1

    def _delay(self, num_delivered: int) -> float:
        delays = self.spec.retry_delays
        return delays[min(num_delivered, len(delays)) - 1] if delays else 1.0

    async def _retry(self, d: Delivery, error: str, delay: float, last_try: bool) -> None:
        if last_try:
            await self._dead_letter(d, f"gave up after {d.num_delivered} attempts: {error}")
            return
        log.warning(
            "retrying",
            extra={
                "consumer": self.spec.durable,
                "subject": d.subject,
                "seq": d.stream_seq,
                "attempt": d.num_delivered,
                "delay_s": delay,
                "error": error,
            },
        )
        await self._settle(d.msg.nak(delay=delay))

    async def _dead_letter(self, d: Delivery, reason: str) -> None:
        errors = [*d.errors, AttemptError(attempt=d.num_delivered, error=reason)]
        letter = DeadLettered(
            source_stream=self.spec.stream,
            source_subject=d.subject,
            source_seq=d.stream_seq,
            reason=reason,
            errors=errors,
            payload=d.data,
            headers={k: v for k, v in d.headers.items() if k != "Nats-Msg-Id"},
            source_msg_id=d.msg_id,
            # An OUTBOUND job is published with its job id as Nats-Msg-Id.
            job_id=(d.msg_id or None) if self.spec.stream == OUTBOUND.name else None,
        )
        try:
            if self.on_dead_letter is not None:
                await self.on_dead_letter(d, reason)
            # Deterministic id: a crash after this publish and before term() dedupes.
            await self.bus.publish(
                subjects.deadletter(d.subject),
                letter,
                msg_id=f"dlq:{self.spec.stream}:{d.stream_seq}",
            )
        except _NATS_TRANSIENT as exc:
            # Could not park it: keep it in the source stream rather than lose it.
            log.error("dead-letter publish failed", extra={"error": repr(exc), "seq": d.stream_seq})
            await self._settle(d.msg.nak(delay=self._delay(d.num_delivered)))
            return
        log.error(
            "dead-lettered",
            extra={
                "consumer": self.spec.durable,
                "subject": d.subject,
                "seq": d.stream_seq,
                "reason": reason,
            },
        )
        await self._settle(d.msg.term())
        self.dead_lettered += 1

    async def _settle(self, ack: Awaitable[object]) -> None:
        # A lost ack only means a redelivery, which every handler tolerates (idempotence).
        try:
            await ack
        except _NATS_TRANSIENT as exc:
            log.warning("ack failed; the message will be redelivered", extra={"error": repr(exc)})
