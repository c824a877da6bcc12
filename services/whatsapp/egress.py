"""Egress: the lease holder sends an account's SendMessage jobs, fenced by its token."""

from __future__ import annotations

import asyncio
import logging

from contracts import subjects
from contracts.codec import decode
from contracts.events import (
    DeliveryDeadLettered,
    DeliveryFailed,
    MessageSent,
    SendMessage,
    derived_id,
)
from contracts.streams import OUTBOUND, egress_consumer
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerSpec, Delivery
from services.runtime.errors import PermanentError, TransientError
from services.runtime.lease import Lease
from services.whatsapp.transport import Fence, Session, TransportError

log = logging.getLogger(__name__)


def egress_consumer_spec(channel: str, account: str) -> ConsumerSpec:
    """One durable consumer per account; only the lease holder pulls from it.

    max_ack_pending=1: a job is sent only after the one before it is settled, which keeps
    per-chat (indeed per-account) order through redelivery and failover.
    """
    return ConsumerSpec(
        stream=OUTBOUND.name,
        durable=egress_consumer(channel, account),
        filter_subject=subjects.outbound_filter(channel, account),
        max_ack_pending=1,
        batch=1,
        max_deliver=5,
        ack_wait=30.0,
        fetch_timeout=0.25,  # a handover waits for the idle fetch to end
    )


class Egress:
    """Sends jobs through `session` while `lease` is proven."""

    def __init__(self, bus: Bus, session: Session, lease: Lease, lost: asyncio.Event) -> None:
        self.bus = bus
        self.session = session
        self.lease = lease
        self.lost = lost

    async def handle(self, d: Delivery) -> None:
        """Send one job and record `MessageSent` (or a failure event, then raise)."""
        job = decode(d.data, SendMessage)
        # Fencing: send only while we can prove nobody else can hold the lease.
        if not await self.lease.prove():
            self.lost.set()
            raise TransientError("lease not proven; job left for the next owner", delay=1.0)
        fence = Fence(holder=self.lease.holder, token=self.lease.token)
        where = subjects.delivery(job.channel, job.account, job.chat)
        try:
            transport_id = await self.session.send(
                job.chat, job.text, job_id=job.job_id, fence=fence
            )
        except TransportError as exc:
            await self.bus.publish(
                where,
                DeliveryFailed(
                    job_id=job.job_id,
                    channel=job.channel,
                    account=job.account,
                    chat=job.chat,
                    attempt=d.num_delivered,
                    error=str(exc),
                    permanent=exc.permanent,
                ),
            )
            if exc.permanent:
                raise PermanentError(str(exc)) from exc
            raise TransientError(
                str(exc), delay=min(30.0, 0.5 * 2 ** (d.num_delivered - 1))
            ) from exc
        sent = MessageSent(
            id=derived_id("sent", job.job_id),
            job_id=job.job_id,
            channel=job.channel,
            account=job.account,
            chat=job.chat,
            holder=fence.holder,
            lease_token=fence.token,
            transport_message_id=transport_id,
            attempt=d.num_delivered,
        )
        await self.bus.publish(where, sent)

    async def dead_lettered(self, d: Delivery, reason: str) -> None:
        """Record on DELIVERY that a job will not be sent."""
        try:
            job = decode(d.data, SendMessage)
        except Exception:  # a malformed job has no job id to record; DEADLETTER keeps it
            return
        await self.bus.publish(
            subjects.delivery(job.channel, job.account, job.chat),
            DeliveryDeadLettered(
                id=derived_id("deadlettered", job.job_id),
                job_id=job.job_id,
                channel=job.channel,
                account=job.account,
                chat=job.chat,
                reason=reason,
                attempts=d.num_delivered,
            ),
        )
