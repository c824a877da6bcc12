"""Egress: the lease holder sends an account's SendMessage jobs, fenced by its token.

Per job: look at its SendRecord when it may have been attempted before (a redelivery, or
the first jobs after a takeover): `sent` -> ack without sending; `sending` -> the outcome
of that attempt is unknown: record `DeliveryUncertain` and resend or skip (policy
DELIVERY_UNCERTAIN); `failed` -> continue counting attempts. Then, per attempt: spend
the account's send budget, prove the lease for the transport's whole send timeout, write
`sending`, check the proof again (no I/O) and call the transport with the proof's
deadline in the fence; record `MessageSent` + `sent` -- or `DeliveryFailed`, wait the
backoff in place, retry; a permanent error or the last attempt dead-letters the job with
every attempt's error. A send whose outcome the transport cannot tell (UncertainSendError:
it timed out waiting for the network's ack) is recorded `DeliveryUncertain` at once, with
the transport's error, and resolved by the same policy: skip, or resend after the backoff.
A send refused for a stale fence was never sent: its `sending` record is taken back
(revision-checked) and the job waits for the next owner.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from typing import Any

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import PubAck

from contracts import subjects
from contracts.codec import decode
from contracts.errors import ContractError
from contracts.events import (
    AttemptError,
    DeliveryDeadLettered,
    DeliveryEvent,
    DeliveryFailed,
    DeliveryUncertain,
    MessageSent,
    SendMessage,
    derived_id,
    utcnow,
)
from contracts.payloads import SendRecord
from contracts.streams import OUTBOUND, egress_consumer
from services.channel.budget import FirstContactRefusedError, Grant, SendBudget
from services.channel.ledger import SendLedger
from services.channel.port import (
    Fence,
    NotConnectedError,
    Outgoing,
    Quote,
    Session,
    StaleFenceError,
    TransportError,
    UncertainSendError,
)
from services.runtime.bus import Bus, acked
from services.runtime.consumer import ConsumerSpec, Delivery
from services.runtime.errors import AbandonError, PermanentError
from services.runtime.lease import Lease
from services.runtime.metrics import instruments, labels
from services.runtime.reader import queued
from services.runtime.seen import Seen
from services.runtime.settings import Delivery as DeliverySettings

log = logging.getLogger(__name__)

# A session between connections: look again after 0.5 s, doubling up to 5 s.
OFFLINE_WAIT_FIRST = 0.5
OFFLINE_WAIT_MAX = 5.0
# A job whose chat has an earlier job still queued and unsettled looks again after this.
TURN_POLL = 0.2
# A job record in one of these states is settled: the job is sent or never will be.
_SETTLED = frozenset({"sent", "skipped", "dead"})

# switchboard_jobs_total's outcome per DELIVERY fact, and the in-place retries' label.
_OUTCOMES: dict[type[DeliveryEvent], str] = {
    MessageSent: "sent",
    DeliveryFailed: "failed",
    DeliveryDeadLettered: "dead_lettered",
    DeliveryUncertain: "uncertain",
}
_SEND_RETRY = labels(("stream", "OUTBOUND"), ("consumer", "send"))

MAX_IN_FLIGHT = 256  # jobs held per account: one per chat at a time, chats in parallel


def egress_consumer_spec(
    channel: str, account: str, delivery: DeliverySettings | None = None
) -> ConsumerSpec:
    """One durable consumer per account; only the lease holder pulls from it.

    Ordered by subject (= chat): a chat's jobs go one at a time in enqueue order, other
    chats meanwhile; retries wait in place so nothing overtakes them.
    """
    return ConsumerSpec(
        stream=OUTBOUND.name,
        durable=egress_consumer(channel, account),
        filter_subject=subjects.outbound_filter(channel, account),
        ordered_by_subject=True,
        max_ack_pending=MAX_IN_FLIGHT,
        batch=64,
        # The one policy (DELIVERY_BACKOFF): the egress's transport attempts, counted in
        # the SendRecord across owners, and the loop's in-place retries of other errors
        # (a bug, a NATS error of the job's own), so a poison job cannot hold its chat
        # forever. A NATS outage uses up none: it is waited out (ADR 0045).
        retry=(delivery or DeliverySettings()).retry,
        # Deleted under us = taken over (the new owner deletes it, ADR 0033): recreating it
        # would pull jobs beside the new owner. The loop stops instead.
        recreate=False,
        letter_job=letter_job,
        ack_wait=30.0,
        fetch_timeout=0.25,  # a handover waits for the idle fetch to end
        # The SendRecord says `sent` before the ack goes out, and a new owner checks the
        # records of every job its predecessor had been handed: a lost ack resends nothing.
        sync_ack=False,
    )


def _event(
    job: SendMessage, kind: type[DeliveryEvent], id_parts: tuple[str, ...], **fields: Any
) -> DeliveryEvent:
    """A DELIVERY event about `job`; its id derives from the job and `id_parts`, so the
    same fact reported twice dedupes."""
    return kind(
        id=derived_id(id_parts[0], job.job_id, *id_parts[1:]),
        job_id=job.job_id,
        channel=job.channel,
        account=job.account,
        chat=job.chat,
        **fields,
    )


def _count(job: SendMessage, kind: type[DeliveryEvent], ack: PubAck) -> None:
    """switchboard_jobs_total: the same fact reported again (a redelivery) counts once."""
    if not ack.duplicate:
        outcome = _OUTCOMES[kind]
        instruments().jobs.add(
            1, labels(("channel", job.channel), ("account", job.account), ("outcome", outcome))
        )


def letter_job(d: Delivery) -> str | None:
    """The job a dead letter names: a job is published with its id as Nats-Msg-Id."""
    try:
        return subjects.check_job_id(d.msg_id) if d.msg_id else None
    except ContractError:
        return None


def check_job(subject: str, job: SendMessage) -> None:
    """Refuse a job whose ids are outside the bounds or whose payload names another
    channel, account or chat than the subject it was queued on (ADR 0013): sending it
    would use this account's session for someone else's job."""
    subjects.check_job_id(job.job_id)
    subjects.check_agrees(subject, "outbound", job.channel, job.account, job.chat)


def outgoing(job: SendMessage, fence: Fence) -> Outgoing:
    """What the transport sends for `job`: its text, quoting the message it replies to."""
    quote = None
    if job.reply_to:
        quote = Quote(job.reply_to, sender=job.reply_to_sender, text=job.reply_to_text)
    return Outgoing(
        chat=job.chat,
        text=job.text,
        job_id=job.job_id,
        fence=fence,
        reply_to=quote,
        template=job.template,
    )


class Egress:
    """Sends jobs through `session` while `lease` is proven."""

    def __init__(
        self,
        bus: Bus,
        session: Session,
        lease: Lease,
        lost: asyncio.Event,
        *,
        settings: DeliverySettings,
        ledger: SendLedger,
        budget: SendBudget,
        stop: asyncio.Event,
        in_flight_upto: int = 0,
    ) -> None:
        self.bus = bus
        self.session = session
        self.lease = lease
        self.lost = lost
        self.settings = settings
        self.ledger = ledger
        self.budget = budget
        self.stop = stop
        # Jobs the previous owner's consumer had delivered (stream seq <= this) may have
        # been mid-send when it stopped: only those need a look at their SendRecord.
        self.in_flight_upto = in_flight_upto
        # The consumer's deliveries this owner was handed (ADR 0035). The owner made the
        # consumer anew (the takeover deletes it), so its deliveries count from 1: while
        # every one came here, a chat's earlier jobs are known without reading the queue.
        self.seen = Seen(known_upto=0)

    async def handle(self, job: SendMessage, d: Delivery) -> None:
        """Deliver one job (with its retries); return when it is settled either way."""
        with self.seen.handling(d):  # settled when it returns: its record says sent or skipped
            await self._handle(job, d)

    async def _handle(self, job: SendMessage, d: Delivery) -> None:
        try:
            check_job(d.subject, job)
        except ContractError as exc:
            raise PermanentError(str(exc)) from None
        record = None
        # Only a job that may have been attempted before has a record worth a read: a
        # redelivery, a job the previous owner was handed, or an in-place retry after an
        # unexpected error (its send may have gone out before the error).
        if d.num_delivered > 1 or d.attempt > 1 or d.stream_seq <= self.in_flight_upto:
            record = await self.ledger.get(job.job_id)
        attempt, errors = (record.attempt, list(record.errors)) if record else (0, [])
        if record is not None and record.state in _SETTLED:
            log.info("job already settled", extra={"job_id": job.job_id, "state": record.state})
            return
        # Nothing of the chat goes out before its earlier jobs, a resend of an uncertain
        # one neither.
        await self._wait_turn(job, d)
        if record is not None and record.state == "sending":  # ("failed": count on)
            why = "outcome unknown: the sender stopped mid-send"
            fence = Fence(record.holder, record.lease_token)
            began = (d.stream_seq, record.sent_at)
            if await self._uncertain(job, record.attempt, fence, why, errors, began):
                return
        current = record  # the job's record as it stands before each attempt
        retry = self.settings.retry
        reproofs = 0
        offline = 0  # tries that found the session between connections
        while True:
            attempt += 1
            if attempt > retry.attempts:
                raise PermanentError(f"gave up after {attempt - 1} attempts", errors=errors)
            grant = await self._budget(job)
            # Fencing: send only while the proof covers the whole send (its timeout), so it
            # reaches the network before the lease could have passed to someone else.
            cover = self.session.send_timeout
            if not await self.lease.prove(cover):
                self.lost.set()
                raise AbandonError("lease not proven; the job waits for the next owner")
            fence = Fence(holder=self.lease.holder, token=self.lease.token)
            # When the attempt began, proven: what a send confirmed later is recorded with.
            sending = self._record(job, "sending", attempt, fence, errors, sent_at=utcnow())
            revision = await self.ledger.put(sending)
            # The proof again, after the write and with nothing awaited before the call.
            if not self.lease.covers(cover):
                await self.ledger.undo(job.job_id, revision, current)
                self.budget.refund(grant)  # never sent: the next try takes it again
                reproofs += 1
                if reproofs > 3:
                    self.lost.set()
                    raise AbandonError("the lease proof keeps running out before the send")
                attempt -= 1  # never started: prove (renew) again
                continue
            fence = Fence(fence.holder, fence.token, deadline=self.lease.deadline)
            sent_at = utcnow()  # proven and recorded as `sending`: the send starts now
            try:
                transport_id = await self._send(job, fence)
            except StaleFenceError as exc:
                # Refused before reaching the network: nothing was sent, and the lease is
                # gone (paused past the deadline, or taken over). No `sending` left behind.
                await self.ledger.undo(job.job_id, revision, current)
                self.lost.set()
                raise AbandonError(f"send refused with a stale fence: {exc}") from exc
            except NotConnectedError as exc:
                # Nothing was sent and the session reconnects by itself: the job keeps its
                # place (so the chat's order holds), and neither an attempt nor the budget
                # is spent -- an outage outlasting the backoff dead-letters nothing.
                await self.ledger.undo(job.job_id, revision, current)
                self.budget.refund(grant)
                attempt -= 1
                offline += 1
                if offline == 1:
                    log.warning(
                        "session not connected; the job waits for it",
                        extra={"job_id": job.job_id, "error": str(exc)},
                    )
                await self._wait(min(OFFLINE_WAIT_MAX, OFFLINE_WAIT_FIRST * 2 ** (offline - 1)))
                continue
            except UncertainSendError as exc:
                # The transport cannot tell whether the message went out (timed out waiting
                # for the server's ack): say so now, then resend or skip by the policy.
                why = f"outcome unknown: {exc}"
                began = (d.stream_seq, sent_at)
                if await self._uncertain(job, attempt, fence, why, errors, began):
                    return
                current = self._record(job, "failed", attempt, fence, errors)
                await self.ledger.put(current)
                if not retry.last(attempt):
                    await self._backoff(attempt)
                continue
            except TransportError as exc:
                errors.append(AttemptError(attempt=attempt, error=str(exc)))
                await self._failed(job, attempt, str(exc), exc.permanent)
                if exc.permanent:
                    raise PermanentError(str(exc), errors=errors) from exc
                current = self._record(job, "failed", attempt, fence, errors)
                await self.ledger.put(current)
                if not retry.last(attempt):
                    await self._backoff(attempt)
                continue
            await self._sent(job, attempt, fence, transport_id, d.stream_seq, sent_at)
            return

    async def _wait_turn(self, job: SendMessage, d: Delivery) -> None:
        """Hold the job until every earlier job of its chat still queued is settled (ADR
        0033): whoever holds an earlier one -- a stale owner's late pull, a consumer a
        stale owner recreated -- a later one never reaches the network first. An earlier
        job that comes back to this process goes first (the job steps aside)."""
        if (
            d.num_delivered == 1
            and d.stream_seq > self.in_flight_upto
            and self.seen.clear_before(d)
        ):
            # Every delivery of the consumer up to this one came to this owner, and the
            # chat's earlier ones are settled here: no other puller holds one (ADR 0035).
            return
        waiting = False
        while not await self._my_turn(d):
            if d.overtaken():
                raise AbandonError("an earlier job of the chat is back; it goes first")
            if not waiting:
                waiting = True
                log.info(
                    "job waits for an earlier job of its chat",
                    extra={"job_id": job.job_id, "seq": d.stream_seq},
                )
            await d.in_progress()
            await self._wait(TURN_POLL)

    async def _my_turn(self, d: Delivery) -> bool:
        """True if no earlier job of the chat is still queued unsettled: each stored one
        before it (read from the stream leader, in order) has a settled SendRecord -- sent
        and acked, its ack not yet applied."""
        try:
            async with contextlib.aclosing(
                queued(self.bus, OUTBOUND.name, subject=d.subject)
            ) as jobs:
                async for stored in jobs:
                    if stored.seq >= d.stream_seq:
                        return True
                    if not await self._settled(stored.headers.get("Nats-Msg-Id", "")):
                        return False
        except (nats.errors.Error, TimeoutError) as exc:  # e.g. an election: look again
            log.warning("cannot read the chat's queue", extra={"error": repr(exc)})
            return False  # never send out of turn on a read failure
        return True  # nothing stored before it (this job was settled meanwhile)

    async def _settled(self, job_id: str) -> bool:
        """True if the job's SendRecord says it is settled."""
        try:
            record = await self.ledger.get(job_id) if job_id else None
        except ContractError:  # an id out of bounds: that job is being dead-lettered
            return False
        return record is not None and record.state in _SETTLED

    async def _send(self, job: SendMessage, fence: Fence) -> str:
        """The transport call, timed (switchboard_send_duration_seconds by outcome)."""
        began = time.perf_counter()
        outcome = "error"
        try:
            transport_id = await self.session.send(outgoing(job, fence))
            outcome = "ok"
            return transport_id
        except (StaleFenceError, NotConnectedError):
            outcome = "not_sent"
            raise
        except UncertainSendError:
            outcome = "uncertain"
            raise
        finally:
            instruments().send_duration.record(
                time.perf_counter() - began,
                labels(("channel", job.channel), ("account", job.account), ("outcome", outcome)),
            )

    async def _uncertain(
        self,
        job: SendMessage,
        attempt: int,
        fence: Fence,
        why: str,
        errors: list[AttemptError],
        began: tuple[int, datetime | None],
    ) -> bool:
        """Record that `attempt`'s outcome is unknown (`why`, added to the job's errors);
        True if the job is settled: the network confirmed it (recorded `MessageSent` under
        the attempt's fence), or the policy skips it (its record then says `skipped`).
        `began` is the job's OUTBOUND seq and when the attempt's send began."""
        confirmed = await self._confirmed(job)
        resolution = "confirmed" if confirmed else self.settings.uncertain
        log.warning(
            "delivery uncertain",
            extra={
                "job_id": job.job_id,
                "attempt": attempt,
                "resolution": resolution,
                "error": why,
            },
        )
        await self._report(
            job,
            DeliveryUncertain,
            ("uncertain", str(attempt)),
            holder=fence.holder,
            lease_token=fence.token,
            resolution=resolution,
        )
        if confirmed:
            # The network says it went out (a status webhook named the job): the attempt
            # that looked unsure was the send. Recorded as it happened -- its holder, token
            # and start -- and never sent again.
            job_seq, sent_at = began
            fence = Fence(fence.holder, fence.token)
            await self._sent(job, attempt, fence, confirmed, job_seq, sent_at)
            return True
        errors.append(AttemptError(attempt=attempt, error=why))
        if resolution == "skip":
            skipped = Fence(fence.holder, fence.token)
            await self.ledger.put(self._record(job, "skipped", attempt, skipped, errors))
            return True
        return False

    async def _confirmed(self, job: SendMessage) -> str | None:
        """The transport message id the network confirmed for `job`, when the session can
        tell (the optional `confirmed` capability; None otherwise or on trouble)."""
        probe = getattr(self.session, "confirmed", None)
        if not callable(probe):
            return None
        try:
            found = await probe(job.job_id)
        except Exception as exc:  # a capability's trouble must not decide the job's outcome
            log.warning(
                "could not ask whether the network confirmed the send",
                extra={"job_id": job.job_id, "error": repr(exc)},
            )
            return None
        return found if isinstance(found, str) and found else None

    async def _report(
        self, job: SendMessage, kind: type[DeliveryEvent], id_parts: tuple[str, ...], **fields: Any
    ) -> None:
        """Publish a DELIVERY event about `job`; its id derives from the job and `id_parts`,
        so reporting the same fact twice dedupes."""
        event = _event(job, kind, id_parts, **fields)
        ack = await self.bus.publish(subjects.delivery(job.channel, job.account, job.chat), event)
        _count(job, kind, ack)

    async def _failed(self, job: SendMessage, attempt: int, error: str, permanent: bool) -> None:
        await self._report(
            job,
            DeliveryFailed,
            ("failed", str(attempt)),
            attempt=attempt,
            error=error,
            permanent=permanent,
        )

    async def _sent(
        self,
        job: SendMessage,
        attempt: int,
        fence: Fence,
        transport_id: str,
        job_seq: int,
        sent_at: datetime | None,
    ) -> None:
        event = _event(
            job,
            MessageSent,
            ("sent",),
            holder=fence.holder,
            lease_token=fence.token,
            transport_message_id=transport_id,
            attempt=attempt,
            job_seq=job_seq,
            sent_at=sent_at,
            text=job.text,
            reply_to=job.reply_to,
        )
        record = self._record(job, "sent", attempt, fence, [], transport_id)
        # Independent writes, sent back to back and waited for once: one round trip, no
        # task per write (ADR 0039). Both are stored before the job is acked (returned).
        where = subjects.delivery(job.channel, job.account, job.chat)
        writes = [
            await self.bus.publish_async(where, event),
            await self.ledger.put_async(record),
        ]
        if self.session.reports_receipts:
            await asyncio.gather(
                acked(*writes), self.ledger.index(transport_id, job.job_id, job.chat)
            )
        else:
            await acked(*writes)
        _count(job, MessageSent, writes[0].result())

    async def _budget(self, job: SendMessage) -> Grant:
        """Spend the account's send budget for one send of `job`, waiting for it if it is
        spent; give the job back (AbandonError) on stop or loss instead of waiting it out.
        A first contact the budget refuses is permanent: the job is dead-lettered."""
        if self.budget.unlimited:
            # Nothing to wait for or look up (the default): no task per send (ADR 0039).
            return Grant()
        taking = asyncio.ensure_future(self.budget.acquire(job))
        waiters = [asyncio.ensure_future(e.wait()) for e in (self.stop, self.lost)]
        try:
            await asyncio.wait([taking, *waiters], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waiters:
                w.cancel()
        if not taking.done():
            taking.cancel()  # nothing was taken: the budget gives back a cancelled take
            with contextlib.suppress(asyncio.CancelledError):
                await taking
            raise AbandonError("stopping while waiting for the send budget")
        try:
            return taking.result()
        except FirstContactRefusedError as exc:
            log.warning("first contact refused", extra={"job_id": job.job_id, "error": str(exc)})
            raise PermanentError(str(exc)) from None

    async def _backoff(self, attempt: int) -> None:
        """Wait before the next attempt, keeping the job ours; give it back on stop/loss."""
        instruments().retries.add(1, _SEND_RETRY)
        await self._wait(self.settings.retry.delay(attempt))

    async def _wait(self, delay: float) -> None:
        """Wait `delay` s holding the job; give it back (AbandonError) on stop or loss."""
        waiters = [asyncio.create_task(e.wait()) for e in (self.stop, self.lost)]
        try:
            done, _ = await asyncio.wait(waiters, timeout=delay)
        finally:
            for w in waiters:
                w.cancel()
        if done:
            raise AbandonError("stopping during a retry wait")

    @staticmethod
    def _record(
        job: SendMessage,
        state: str,
        attempt: int,
        fence: Fence,
        errors: list[AttemptError],
        transport_id: str = "",
        *,
        sent_at: datetime | None = None,
    ) -> SendRecord:
        return SendRecord(
            job_id=job.job_id,
            state=state,  # type: ignore[arg-type]
            attempt=attempt,
            holder=fence.holder,
            lease_token=fence.token,
            transport_message_id=transport_id,
            errors=errors[-20:],
            sent_at=sent_at,
        )

    async def dead_lettered(self, d: Delivery, reason: str) -> None:
        """Record on DELIVERY (and in the ledger) that a job will not be sent."""
        try:
            job = d.body if d.decoded else decode(d.data, SendMessage)
            subjects.check_job_id(job.job_id)
            where = subjects.parse_chat_subject(d.subject)
        except ContractError:  # no job id or no chat to record it under; DEADLETTER keeps it
            return
        # Recorded for the queue it was in (the subject), never for the account or chat a
        # mismatched payload names: that one never had this job.
        job = msgspec.structs.replace(
            job, channel=where.channel, account=where.account, chat=where.chat
        )
        await self._report(
            job,
            DeliveryDeadLettered,
            ("deadlettered",),
            reason=reason,
            attempts=len(d.errors) or d.attempt,
            job_seq=d.stream_seq,
        )
        with contextlib.suppress(ContractError):
            await self.ledger.put(self._record(job, "dead", d.attempt, Fence("", 0), d.errors))
            self.seen.settled(d)  # its record says dead: settled
