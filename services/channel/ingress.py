"""Ingress: what a transport tells us about an account becomes events.

Session events arrive through the account's `EventDispatch` (in order, one at a time):
messages become `MessageReceived` on INBOUND, receipts `DeliveryReceipt` linked to the
job that sent the message, and session signals are recorded on ACCOUNTS. Whether the
session ended is the session's own report (`Session.ended()`), not inferred here.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import assert_never

from contracts import subjects
from contracts.errors import InvalidSubjectError
from contracts.events import (
    DeliveryReceipt,
    MessageReceived,
    SessionBanned,
    SessionLoggedOut,
    derived_id,
)
from services.channel.ledger import SendLedger
from services.channel.port import (
    ClientOutdated,
    Connected,
    Disconnected,
    Incoming,
    LoggedOut,
    NeedsPairing,
    Receipt,
    SessionEvent,
    StreamReplaced,
    TemporaryBan,
    end_of,
)
from services.runtime.bus import Bus
from services.runtime.metrics import instruments, labels

log = logging.getLogger(__name__)

MAX_MENTIONS = 64  # JIDs one message may mention (WhatsApp caps a mention list well below)


def check_incoming(channel: str, account: str, msg: Incoming) -> None:
    """Refuse ids outside the bounds where they enter (ADR 0013): the account, chat and
    sender JIDs, mentions and the message ids; InvalidSubjectError (a ContractError) with
    one line, which a consumer dead-letters. A chat that would make any derived subject
    too long for nats-server's control line is refused here, before anything is published."""
    subjects.check_account(account)
    subjects.inbound(channel, account, msg.chat)  # length, characters, encoding
    subjects.check_jid(msg.sender, "sender JID")
    subjects.check_message_id(msg.message_id)
    if msg.sender_alt:
        subjects.check_jid(msg.sender_alt, "sender's other JID")
    if msg.quoted_id:
        subjects.check_message_id(msg.quoted_id)
    if len(msg.mentions) > MAX_MENTIONS:
        raise InvalidSubjectError(f"message mentions {len(msg.mentions)} JIDs, over {MAX_MENTIONS}")
    for jid in msg.mentions:
        subjects.check_jid(jid, "mentioned JID")
    if len(msg.sender_name) > subjects.MAX_JID_CHARS:
        raise InvalidSubjectError(
            f"sender name of {len(msg.sender_name)} characters is over {subjects.MAX_JID_CHARS}"
        )


def inbound_event(channel: str, account: str, msg: Incoming) -> MessageReceived:
    """The event for a received message; its id derives from the transport's message id,
    so the same message relayed twice (redelivery, two receivers) is stored once. Ids
    outside the bounds raise InvalidSubjectError (see `check_incoming`)."""
    check_incoming(channel, account, msg)
    return MessageReceived(
        id=derived_id("inbound", channel, account, msg.message_id),
        channel=channel,
        account=account,
        chat=msg.chat,
        sender=msg.sender,
        message_id=msg.message_id,
        text=msg.text,
        from_me=msg.from_me,
        is_group=msg.is_group,
        sender_name=msg.sender_name,
        mentioned=msg.mentioned,
        mentions=list(msg.mentions),
        quoted_id=msg.quoted_id,
        sender_alt=msg.sender_alt,
    )


class Ingress:
    """Records one account's session events (the handler of its EventDispatch)."""

    def __init__(
        self,
        bus: Bus,
        channel: str,
        account: str,
        holder: str = "",
        ledger: SendLedger | None = None,
        on_connection: Callable[[Connected | Disconnected], None] | None = None,
    ) -> None:
        self.bus = bus
        self.channel = channel
        self.account = account
        self.holder = holder
        self.ledger = ledger
        # Told of every Connected / Disconnected (the owner's status board); it must not
        # block: it runs on the session's event pump.
        self.on_connection = on_connection
        self._labels = labels(("channel", channel), ("account", account))

    async def __call__(self, event: SessionEvent) -> None:
        """Record one session event (raises to get it delivered again)."""
        account_subject = subjects.accounts(self.channel, self.account)
        where = {"account": self.account, "channel": self.channel}
        match event:
            case Incoming():
                msg = inbound_event(self.channel, self.account, event)
                ack = await self.bus.publish(
                    subjects.inbound(msg.channel, msg.account, msg.chat), msg
                )
                if not ack.duplicate:  # a redelivered session event is not a new message
                    instruments().messages_received.add(1, self._labels)
            case Receipt():
                await self._receipt(event)
            case Connected():
                log.info("session connected", extra=where)
                if self.on_connection is not None:
                    self.on_connection(event)
            case Disconnected(reason=reason):
                log.warning(
                    "session disconnected; the transport reconnects",
                    extra={**where, "reason": reason},
                )
                if self.on_connection is not None:
                    self.on_connection(event)
            case NeedsPairing() | StreamReplaced() | LoggedOut() | ClientOutdated():
                end = end_of(event)
                assert end is not None
                log.warning("session ended", extra={**where, "reason": end.reason})
                await self.bus.publish(
                    account_subject,
                    SessionLoggedOut(
                        channel=self.channel,
                        account=self.account,
                        holder=self.holder,
                        reason=end.reason,
                    ),
                )
            case TemporaryBan():
                log.warning("session banned", extra={**where, "reason": event.reason})
                await self.bus.publish(
                    account_subject,
                    SessionBanned(
                        channel=self.channel,
                        account=self.account,
                        holder=self.holder,
                        reason=event.reason,
                        until=event.until,
                    ),
                )
            case _:
                assert_never(event)

    async def _receipt(self, receipt: Receipt) -> None:
        """Record a receipt per message we sent, linked to its job."""
        for tid in receipt.transport_message_ids:
            sent = await self.ledger.job_of(tid) if self.ledger else None
            if sent is None:
                log.debug("receipt for a message we did not send", extra={"id": tid})
                continue
            await self.bus.publish(
                subjects.delivery(self.channel, self.account, sent.chat),
                DeliveryReceipt(
                    id=derived_id("receipt", self.account, tid, receipt.status),
                    channel=self.channel,
                    job_id=sent.job_id,
                    account=self.account,
                    chat=sent.chat,
                    transport_message_id=tid,
                    status=receipt.status,
                ),
            )
