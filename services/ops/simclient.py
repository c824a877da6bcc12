"""A simulated WhatsApp user: sends on `sim.whatsapp.<account>.in`, reads `.out`."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from contracts import subjects
from contracts.codec import decode, encode
from contracts.errors import DecodeError
from contracts.events import CHANNEL_WHATSAPP, derived_id, new_id
from contracts.payloads import SimInbound, SimOutbound
from services.runtime.bus import Bus
from services.whatsapp.jids import own_jid

__all__ = ["Exchange", "SimUser", "first_reply_job_id", "own_jid"]


def first_reply_job_id(account: str, message_id: str) -> str:
    """The job id the core derives for the first reply to a sim message."""
    inbound_id = derived_id("inbound", CHANNEL_WHATSAPP, account, message_id)
    return derived_id("job", inbound_id, "0")


@dataclass
class Exchange:
    """One message a user sent and the reply it got."""

    chat: str
    text: str
    message_id: str
    sent_at: float
    reply: SimOutbound | None = None
    replied_at: float = 0.0

    @property
    def latency_ms(self) -> float:
        """Send-to-reply time in milliseconds."""
        return (self.replied_at - self.sent_at) * 1000 if self.reply else float("nan")


@dataclass
class SimUser:
    """Talks to one account; matches replies to messages by their derived job id."""

    bus: Bus
    account: str
    exchanges: dict[str, Exchange] = field(default_factory=dict)  # first-reply job id -> exchange
    others: list[SimOutbound] = field(default_factory=list)
    _sub: Subscription | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> SimUser:
        self._sub = await self.bus.nc.subscribe(subjects.sim_out(self.account), cb=self._on_out)
        await self.bus.nc.flush()  # subscribed on the server before the first message goes out
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on_out(self, msg: Msg) -> None:
        try:
            out = decode(msg.data, SimOutbound)
        except DecodeError:
            return
        exchange = self.exchanges.get(out.job_id)
        if exchange is not None and exchange.reply is None:
            exchange.reply, exchange.replied_at = out, time.perf_counter()
        else:
            self.others.append(out)
        self._changed.set()

    async def send(
        self,
        chat: str,
        text: str,
        *,
        sender: str | None = None,
        mentions: list[str] | None = None,
        quoted_id: str = "",
        sender_name: str = "",
        sender_alt: str = "",
    ) -> Exchange:
        """Publish a user message (durably: the SIM stream keeps it until an owner reads
        it). In a group chat (`…@g.us`) pass the `sender`; `mentions` may name the
        account's own JID (`own_jid`)."""
        message_id = new_id()
        exchange = Exchange(chat, text, message_id, time.perf_counter())
        self.exchanges[first_reply_job_id(self.account, message_id)] = exchange
        payload = SimInbound(
            chat=chat,
            sender=sender or chat,
            text=text,
            message_id=message_id,
            mentions=mentions or [],
            quoted_id=quoted_id,
            sender_name=sender_name,
            sender_alt=sender_alt,
        )
        await self.bus.publish_bytes(
            subjects.sim_in(self.account), encode(payload), msg_id=f"sim-in:{message_id}"
        )
        return exchange

    async def changed(self) -> None:
        """Wait for the next reply (or other send) to arrive."""
        self._changed.clear()
        await self._changed.wait()

    def pending(self) -> list[Exchange]:
        """Messages still waiting for their reply."""
        return [e for e in self.exchanges.values() if e.reply is None]

    async def wait_replies(self, timeout: float, *, exchange: Exchange | None = None) -> bool:
        """Wait until every sent message (or just `exchange`) has its reply; False on timeout."""
        deadline = time.monotonic() + timeout
        while (exchange.reply is None) if exchange is not None else self.pending():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return exchange.reply is not None if exchange is not None else not self.pending()
        return True
