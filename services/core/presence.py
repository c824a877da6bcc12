"""The core's half of read receipts and typing (ADR 0025): best-effort presence commands.

A turn that reaches the model first marks the user's message read, then shows "typing..."
(per account, SVC_PRESENCE: off | read | read+typing); a turn that ends without a reply
to send (failed, or an empty answer) clears it with `paused` -- a sent reply clears it by
itself on WhatsApp. Commands go on plain NATS (`presence.<channel>.<account>.<chat>`) to
the account's owner: nothing is stored, nothing waits, and a failure is only logged.
"""

from __future__ import annotations

import logging

import nats.errors

from contracts import subjects
from contracts.codec import encode
from contracts.errors import ContractError
from contracts.events import MessageReceived
from contracts.payloads import PresenceAction, PresenceCommand
from services.runtime.bus import Bus
from services.runtime.settings import PresenceMode

log = logging.getLogger(__name__)


class Presence:
    """Publishes one turn's presence commands, as the account's SVC_PRESENCE allows."""

    def __init__(self, bus: Bus, mode: PresenceMode) -> None:
        self.bus = bus
        self.mode = mode

    async def started(self, inbound: MessageReceived) -> None:
        """The turn starts: mark the message read, then show typing."""
        if self.mode == "off":
            return
        await self._publish(inbound, "read", (inbound.message_id,))
        if self.mode == "read+typing":
            await self._publish(inbound, "typing")

    async def ended_without_reply(self, inbound: MessageReceived) -> None:
        """The turn ended and nothing will be sent: clear the typing indicator."""
        if self.mode == "read+typing":
            await self._publish(inbound, "paused")

    async def _publish(
        self, inbound: MessageReceived, action: PresenceAction, message_ids: tuple[str, ...] = ()
    ) -> None:
        command = PresenceCommand(
            chat=inbound.chat, action=action, message_ids=list(message_ids), sender=inbound.sender
        )
        try:
            subject = subjects.presence(inbound.channel, inbound.account, inbound.chat)
            await self.bus.nc.publish(subject, encode(command))
        except (nats.errors.Error, ContractError) as exc:
            log.info("presence not published", extra={"inbound_id": inbound.id, "error": repr(exc)})
