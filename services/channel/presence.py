"""Read receipts and typing (ADR 0025): the core asks, the account's owner shows.

The core publishes a `PresenceCommand` on `presence.<channel>.<account>.<chat>` when a
turn starts (read, then typing) and when it fails (paused). These are plain NATS
messages, not JetStream: a lost typing indicator harms nobody, and a stored one delivered
late (after a failover, minutes on) would show "typing..." for a turn long over. Only the
lease holder subscribes, while it owns the account, and hands each command to its
session's optional `presence()` capability; a transport without it ignores them.
Commands of one subscription run one at a time, in order (read before typing), each
bounded by `PRESENCE_TIMEOUT`; a failure is logged and dropped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats.errors
from nats.aio.msg import Msg

from contracts import subjects
from contracts.codec import decode
from contracts.errors import ContractError
from contracts.payloads import PresenceCommand
from services.runtime.bus import Bus

log = logging.getLogger(__name__)

PRESENCE_TIMEOUT = 5.0  # a presence call that hangs never holds up the next one longer


@asynccontextmanager
async def presence_relay(
    bus: Bus, channel: str, account: str, session: object
) -> AsyncIterator[None]:
    """Show the core's presence commands for `account` on `session` until the exit."""
    show = getattr(session, "presence", None)
    if show is None:  # the transport cannot: no subscription at all
        yield
        return

    async def on_command(msg: Msg) -> None:
        try:
            command = decode(msg.data, PresenceCommand)
        except ContractError as exc:
            log.warning(
                "bad presence command dropped", extra={"account": account, "error": str(exc)}
            )
            return
        try:
            await asyncio.wait_for(
                show(command.chat, command.action, tuple(command.message_ids), command.sender),
                PRESENCE_TIMEOUT,
            )
        except Exception as exc:  # best effort: never stops the relay
            log.info(
                "presence not shown",
                extra={"account": account, "action": command.action, "error": repr(exc)},
            )

    sub = await bus.nc.subscribe(subjects.presence_filter(channel, account), cb=on_command)
    try:
        yield
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
