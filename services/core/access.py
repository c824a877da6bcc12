"""The core's access check (ADR 0023): before any model call, fold what is new on ACCESS
into the view and decide whether the message may reach the model.

A refused message is recorded as `MessageRefused` on AGENT (its outcome). Under
`approval` an unknown sender is recorded as pending (`AccessRequested` on ACCESS, with
the waiting message's INBOUND sequence so `svc access approve` can send it back to be
answered) and gets the waiting reply -- a normal SendMessage job -- at most once per
period; the period is derived from the recorded requests, so it holds across restarts
and core replicas (a chat's turns run one at a time across replicas).

Freshness without a round trip per message (ADR 0038): the gate subscribes to ACCESS's
subjects before its first read, so every change stored after that read also arrives on the
subscription -- on this connection, ahead of any inbound message published after the
change was acknowledged. The view is read again (one STREAM.INFO, then what is new) only
when the subscription holds something, after a reconnect (changes may have passed while
the subscription was gone), or when it was last checked more than `RECHECK` seconds ago
(a backstop for a cluster, where the change and the message may reach this server by
different routes).
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from datetime import timedelta

from nats.aio.subscription import Subscription

from contracts import subjects
from contracts.codec import decode_any
from contracts.errors import ContractError
from contracts.events import (
    AccessRequested,
    MessageReceived,
    SendMessage,
    derived_id,
    utcnow,
)
from contracts.streams import ACCESS
from projections.access import HANDLED_TYPES, AccessView
from services.core import turn
from services.runtime.bus import Bus, take_pending
from services.runtime.reader import read
from services.runtime.settings import CoreSettings

log = logging.getLogger(__name__)

DEFAULT_WAITING_TEXT = CoreSettings.access_waiting_text
DEFAULT_WAITING_PERIOD = CoreSettings.access_waiting_period
# Seconds after which the view is read again even when no change was seen (a backstop).
RECHECK = 1.0
# Changes buffered between two checks; more are dropped by nats-py, harmlessly: the
# buffer is not empty, so the next check reads the stream anyway.
_BUFFERED = 1024


async def catch_up(bus: Bus, view: AccessView, *, upto: int | None = None) -> int:
    """Apply every ACCESS event after `view.position` (up to `upto`); return how many.
    A malformed or foreign event is skipped with a warning (it cannot change access)."""
    applied = 0
    async for stored in read(bus, ACCESS.name, start_seq=view.position + 1, stop_seq=upto):
        view.position = stored.seq
        try:
            event = decode_any(stored.data)
        except ContractError as exc:
            log.warning(
                "skipped malformed access event", extra={"seq": stored.seq, "error": str(exc)}
            )
            continue
        if not isinstance(event, HANDLED_TYPES):
            log.warning(
                "skipped event of another kind",
                extra={"seq": stored.seq, "type": type(event).__name__},
            )
            continue
        view.apply(event, stored.seq)
        applied += 1
    return applied


class AccessGate:
    """Decides, per inbound message, whether it may reach the model. Its subscription to
    ACCESS lives as long as the connection (one per core process)."""

    def __init__(
        self,
        bus: Bus,
        *,
        waiting_text: str = DEFAULT_WAITING_TEXT,
        waiting_period: float = DEFAULT_WAITING_PERIOD,
        recheck: float = RECHECK,
    ) -> None:
        self.bus = bus
        self.recheck = recheck
        self.view = AccessView()
        self.waiting_text = waiting_text
        self.waiting_period = timedelta(seconds=waiting_period)
        self._changes: Subscription | None = None
        self._checked_at = -math.inf
        self._reconnects = 0
        self._checking = asyncio.Lock()

    async def fresh(self) -> None:
        """Fold every ACCESS event stored before now into the view; a read of the stream
        only when something may have changed since the last one."""
        async with self._checking:  # one read at a time; a waiter then finds it fresh
            nc = self.bus.nc
            reconnects = nc.stats["reconnects"]
            if self._changes is None:
                # Subscribed before the read: a change the read misses arrives here.
                self._changes = await nc.subscribe(ACCESS.subjects[0], pending_msgs_limit=_BUFFERED)
            elif (
                not self._changes.pending_msgs
                and reconnects == self._reconnects
                and time.monotonic() - self._checked_at < self.recheck
            ):
                return
            self._checked_at = -math.inf  # stale until the read below succeeds
            while take_pending(self._changes) is not None:
                pass  # what the read below covers
            checked_at = time.monotonic()
            await catch_up(self.bus, self.view)
            self._checked_at, self._reconnects = checked_at, reconnects

    async def refused(self, inbound: MessageReceived, inbound_seq: int) -> bool:
        """True if the policy refused `inbound` (and its outcome is recorded)."""
        await self.fresh()
        decision = self.view.resolve(
            inbound.channel,
            inbound.account,
            inbound.sender,
            inbound.chat,
            is_group=inbound.is_group,
            sender_alt=inbound.sender_alt,
        )
        if decision.allowed:
            return False
        if decision.pending:
            await self._pending(inbound, inbound_seq)
        record = turn.refused(inbound, decision.rule, decision.detail)
        subject = subjects.agent(inbound.channel, inbound.account, inbound.chat)
        await self.bus.publish(subject, record)
        log.info(
            "refused",
            extra={"inbound_id": inbound.id, "rule": record.rule, "detail": record.detail},
        )
        return True

    async def _pending(self, inbound: MessageReceived, inbound_seq: int) -> None:
        """Record the sender as pending and, if it is owed one, send the waiting reply.
        Idempotent on redelivery: ids derive from the inbound event, and a message whose
        request is already recorded is not recorded (or answered) again."""
        if inbound.id in self.view.requested:
            return
        jid = inbound.chat if inbound.is_group else inbound.sender
        now = utcnow()
        job_id = ""
        # No waiting reply into a group: the group did not ask, its members would all see it.
        if not inbound.is_group and self.view.waiting_due(
            inbound.channel, inbound.account, jid, now, self.waiting_period
        ):
            job_id = derived_id("access-waiting", inbound.id)
            job = SendMessage(
                id=job_id,
                job_id=job_id,
                channel=inbound.channel,
                account=inbound.account,
                chat=inbound.chat,
                text=self.waiting_text,
                cause_id=inbound.id,
            )
            await self.bus.publish(
                subjects.outbound(inbound.channel, inbound.account, inbound.chat), job
            )
        request = AccessRequested(
            id=derived_id("access-requested", inbound.id),
            at=now,
            channel=inbound.channel,
            account=inbound.account,
            jid=jid,
            chat=inbound.chat,
            message_id=inbound.message_id,
            inbound_id=inbound.id,
            inbound_seq=inbound_seq,
            waiting_job=job_id,
        )
        ack = await self.bus.publish(subjects.access(inbound.channel, inbound.account), request)
        # Fold our own write now: the next message of this sender must see it, and a
        # catch-up that reads it again skips it (`requested`).
        self.view.apply(request)
        if ack.seq == self.view.position + 1:
            self.view.position = ack.seq
