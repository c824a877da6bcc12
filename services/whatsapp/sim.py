"""The sim transport: a stand-in WhatsApp network over NATS subjects.

Users publish `{chat, sender, text, message_id}` on `sim.whatsapp.<account>.in`; the
`SIM` work-queue stream keeps it until the account's receiver takes it, so nothing sent
while no owner is attached is lost. Every accepted send is stored on
`sim.whatsapp.<account>.out` (stream `SIM_OUT`) with holder and lease token; its stream
sequence is the transport message id. Faults come from settings (SIM_* variables).

Like a network that knows the current session, the sim refuses a send whose fence is
stale: after the latency it reads the account's lease and refuses a token that is no
longer the current one, then refuses a send past the fence's deadline -- the last step
before the publish, with nothing awaited in between (ADR 0007, "the remaining window").
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import NoReturn, assert_never

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.codec import decode, encode
from contracts.errors import DecodeError
from contracts.events import CHANNEL_WHATSAPP
from contracts.payloads import (
    PresenceAction,
    SimControl,
    SimFailure,
    SimInbound,
    SimOutbound,
    SimPresence,
)
from contracts.streams import LEASES, SIM, sim_consumer
from services.channel.port import (
    Connected,
    Events,
    Fence,
    Incoming,
    LoggedOut,
    Outgoing,
    Receipt,
    SessionEnding,
    SessionEvent,
    StaleFenceError,
    StreamReplaced,
    TemporaryBan,
    TransportError,
    end_of,
)
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, ConsumerSpec, Delivery
from services.runtime.errors import AbandonError
from services.runtime.lease import read_lease
from services.runtime.settings import SimFaults
from services.whatsapp import jids

log = logging.getLogger(__name__)

SIM_TEXT_LIMIT = 65_536
# What a sim send takes besides its injected latency: one lease read, then the publish
# leaves. Declared as part of the send timeout the lease proof must cover.
SIM_NETWORK_SLACK = 0.25


def sim_send_timeout(faults: SimFaults) -> float:
    """The longest a sim send may take before it reaches the network."""
    return faults.latency_ms / 1000 + SIM_NETWORK_SLACK


def incoming(account: str, payload: SimInbound) -> Incoming:
    """The sim's mapping: a user's message as the channel layer sees it (a `@g.us` chat
    is a group; the account is mentioned by its own JID; LID/phone senders normalised)."""
    who = jids.normalise(payload.chat, payload.sender, payload.sender_alt)
    return Incoming(
        chat=who.chat,
        sender=who.sender,
        sender_alt=who.sender_alt,
        text=payload.text,
        message_id=payload.message_id,
        is_group=jids.is_group(who.chat),
        sender_name=payload.sender_name,
        mentions=tuple(payload.mentions),
        mentioned=jids.mentions_account(payload.mentions, (jids.own_jid(account),)),
        quoted_id=payload.quoted_id,
    )


class SimSession(SessionEnding):
    """One account attached to the simulated network."""

    def __init__(self, bus: Bus, account: str, faults: SimFaults, rng: random.Random) -> None:
        super().__init__()
        self.bus = bus
        self.account = account
        self.faults = faults
        self.rng = rng
        self.subject = subjects.sim_out(account)
        # The sim network reports receipts only when told to (SIM_AUTO_RECEIPTS).
        self.reports_receipts = faults.auto_receipts
        self.send_timeout = sim_send_timeout(faults)
        self.lease_key = subjects.lease_key(CHANNEL_WHATSAPP, account)
        self._leases: KeyValue | None = None
        # The sim network answers keepalives while it is reachable: the session hears
        # "now" until a `silence` signal makes it a zombie (heard last at that moment).
        self._silent_since: float | None = None

    def last_heard(self) -> float | None:
        """When the network was last heard: now, unless the session was silenced."""
        return time.monotonic() if self._silent_since is None else self._silent_since

    def silence(self) -> None:
        """The network stops talking to this session (a zombie); a new session hears."""
        if self._silent_since is None:
            self._silent_since = time.monotonic()

    async def presence(
        self, chat: str, action: PresenceAction, message_ids: tuple[str, ...], sender: str = ""
    ) -> None:
        """Show `chat` a read receipt or typing state: the sim network publishes what it saw
        on `sim.whatsapp.<account>.presence` (a send clears typing by itself, as on
        WhatsApp: the sim records nothing for that)."""
        seen = SimPresence(chat=chat, action=action, message_ids=list(message_ids))
        try:
            await self.bus.nc.publish(subjects.sim_presence(self.account), encode(seen))
        except nats.errors.Error as exc:
            log.info("sim presence not shown", extra={"account": self.account, "error": repr(exc)})

    async def send(self, out: Outgoing) -> str:
        """Publish the message on the sim network (unless its fence is stale); its stream
        sequence is its id."""
        chat, text, job_id, fence = out.chat, out.text, out.job_id, out.fence
        if self.faults.latency_ms:
            await asyncio.sleep(self.faults.latency_ms / 1000)
        if chat in self.faults.failing_chats:
            await self._refuse(job_id, chat, f"sim: {chat} is not on WhatsApp", permanent=True)
        if len(text) > SIM_TEXT_LIMIT:
            await self._refuse(
                job_id,
                chat,
                f"sim: text of {len(text)} chars is over {SIM_TEXT_LIMIT}",
                permanent=True,
            )
        if self.faults.failure_rate and self.rng.random() < self.faults.failure_rate:
            await self._refuse(job_id, chat, "sim: injected transient failure", permanent=False)
        sent = SimOutbound(
            chat=chat,
            text=text,
            job_id=job_id,
            holder=fence.holder,
            lease_token=fence.token,
            reply_to=out.reply_to.message_id if out.reply_to else None,
        )
        await self._check_token(job_id, chat, fence)
        # The last check: nothing is awaited between it and the publish leaving.
        if time.monotonic() >= fence.deadline:
            late = time.monotonic() - fence.deadline
            await self._refuse(
                job_id,
                chat,
                f"sim: send refused, {late:.3f} s past its lease deadline (token {fence.token})",
                stale=True,
            )
        ack = await self.bus.publish_bytes(
            self.subject, encode(sent), msg_id=f"sim-out:{job_id}:{fence.token}"
        )
        transport_id = f"sim-{ack.seq}"
        if self.faults.auto_receipts:
            receipt = SimControl(event="receipt", chat=chat, message_ids=[transport_id])
            await self.bus.nc.publish(subjects.sim_control(self.account), encode(receipt))
        return transport_id

    async def _check_token(self, job_id: str, chat: str, fence: Fence) -> None:
        """The network's side of fencing: refuse a token that is no longer the account's
        current lease (taken over, released or parked) -- what WhatsApp does to a socket
        whose session another client replaced."""
        if self._leases is None:
            self._leases = await self.bus.js.key_value(LEASES.name)
        found = await read_lease(self._leases, self.lease_key)
        current = found[0] if found else None
        if current is None or current.parked or current.token != fence.token:
            now = "nobody" if current is None else f"token {current.token}"
            await self._refuse(
                job_id,
                chat,
                f"sim: send refused, lease token {fence.token} is not current ({now} holds it)",
                stale=True,
            )

    async def _refuse(
        self, job_id: str, chat: str, error: str, *, permanent: bool = False, stale: bool = False
    ) -> NoReturn:
        failure = SimFailure(job_id=job_id, chat=chat, error=error, permanent=permanent)
        await self.bus.nc.publish(subjects.sim_failures(self.account), encode(failure))
        if stale:
            raise StaleFenceError(error)
        raise TransportError(error, permanent=permanent)


class SimTransport:
    """Opens sim sessions; its inbound path is separate (a durable queue on `SIM`)."""

    name = "sim"
    channel = CHANNEL_WHATSAPP

    def __init__(self, bus: Bus, faults: SimFaults, *, seed: int | None = None) -> None:
        self.bus = bus
        self.faults = faults
        self.send_timeout = sim_send_timeout(faults)
        self.rng = random.Random(seed)
        self.inbound = SimInbox(bus)

    @asynccontextmanager
    async def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AsyncIterator[SimSession]:
        """Attach to `account`; with `receive`, also relay what users sent it."""
        session = SimSession(self.bus, account, self.faults, self.rng)
        signals = await self.bus.nc.subscribe(
            subjects.sim_control(account), cb=_control_relay(session, events)
        )
        events.post(Connected())  # attached is connected: the sim network has no dial
        try:
            if not receive:
                yield session
                return
            async with self.inbound.receiver(account, events):
                yield session
        finally:
            with contextlib.suppress(nats.errors.Error):
                await signals.unsubscribe()


class SimInbox:
    """The sim's receive-only inbound path: a shared durable consumer per account on
    `SIM`, so any number of receivers may run (role whatsapp-ingress) without the lease."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def receiver(self, account: str, events: Events) -> AbstractAsyncContextManager[None]:
        """Relay what users sent `account` until the context exits."""
        return _receive(self.bus, account, events)


def _control_relay(session: SimSession, events: Events) -> Callable[[Msg], Awaitable[None]]:
    """Turn sim control messages into the session events a real socket would raise; an
    ending signal also ends the session (after the event, in order)."""

    async def relay(msg: Msg) -> None:
        try:
            control = decode(msg.data, SimControl)
        except DecodeError as exc:
            log.warning("bad sim control message", extra={"error": str(exc)})
            return
        event: SessionEvent
        match control.event:
            case "silence":
                session.silence()
                return
            case "stream_replaced":
                event = StreamReplaced()
            case "logged_out":
                event = LoggedOut(reason=control.reason or "logged out")
            case "temporary_ban":
                event = TemporaryBan(reason=control.reason or "temporary ban")
            case "receipt":
                event = Receipt(
                    chat=control.chat,
                    transport_message_ids=tuple(control.message_ids),
                    status=control.status,
                )
            case _:
                assert_never(control.event)
        events.post(event)  # a callback only enqueues (as a network callback must)
        if end := end_of(event):
            session.end(end)

    return relay


# The sim receiver's window (ADR 0034): messages one receiver holds at once, fetched in
# one pull; chats are relayed in parallel, each chat's messages one after another.
SIM_RECEIVE_WINDOW = 128
# A message whose earlier same-chat message is still unrelayed elsewhere looks again
# after this long, doubling up to the max (each look is one stream read).
BLOCKED_POLL_S = 0.005
BLOCKED_POLL_MAX_S = 0.05


def _chat_of(account: str, data: bytes) -> str | None:
    """The chat a SIM message belongs to (as relayed), None if it cannot be decoded (its
    attempt dead-letters it)."""
    try:
        return incoming(account, decode(data, SimInbound)).chat
    except (DecodeError, ValueError):
        return None


def _chat_key(account: str) -> Callable[[Msg], str]:
    """The order key of a SIM message: its chat ("" when undecodable: any queue will do)."""

    def key(msg: Msg) -> str:
        return _chat_of(account, msg.data) or ""

    return key


class ChatOrder:
    """Per-chat arrival order across receivers of one account's SIM durable (ADR 0034).

    Before relaying SIM seq `s` of chat `c`, a receiver makes sure no earlier SIM message
    of `c` is still unrelayed anywhere: every seq between the consumer's ack floor and `s`
    is resolved from what is known here first -- messages this receiver fetched (their
    chat known from the payload), relayed, or read before -- and only the rest is read
    from SIM by seq. SIM is a work queue: an acked (relayed) message is gone, so a message
    still there, of `c`, earlier, not relayed here, is unrelayed: `s` waits (the loop's
    heartbeat keeps it alive) and looks again. With one receiver every earlier message is
    one it fetched itself: no reads at all. The floor is re-read (one consumer-info read)
    only when a seq must be read, at most once per fetch.
    """

    def __init__(self, bus: Bus, account: str, durable: str) -> None:
        self.bus = bus
        self.account = account
        self.subject = subjects.sim_in(account)
        self.durable = durable
        self.key = _chat_key(account)
        self.loop: ConsumerLoop[SimInbound] | None = None
        self.stop = asyncio.Event()  # the receiver stops: waiting messages are handed back
        self.floor = 0  # every SIM seq of this account up to here was acked
        self._floor_fresh = False  # read since the last fetch
        self._floor_read: asyncio.Future[None] | None = None
        # seq -> its chat, or None when it can never block (gone, or another account's)
        self.chat_of: dict[int, str | None] = {}
        self.reads = 0  # stream reads made (seqs and floors), for figures and tests

    def fetched(self, msg: Msg) -> str:
        """The consumer loop's key: records the fetched message's chat (and that the
        floor may have moved since it was read)."""
        chat = self.key(msg)
        self.chat_of[msg.metadata.sequence.stream] = chat
        self._floor_fresh = False
        return chat

    def relayed(self, seq: int) -> None:
        """`seq` is in INBOUND: it can no longer hold anything back."""
        self.chat_of[seq] = None

    async def wait_turn(self, d: Delivery, chat: str) -> None:
        """Return once no earlier message of `chat` is unrelayed; AbandonError if an
        earlier one of it came back to this receiver (it goes first: see overtaken)."""
        poll = BLOCKED_POLL_S
        while (blocker := await self._earlier(d.stream_seq, chat)) is not None:
            if d.overtaken():
                raise AbandonError(f"sim seq {blocker} of the chat came back; it goes first")
            if self.stop.is_set():
                raise AbandonError("the receiver stops; another one relays it in turn")
            log.debug(
                "sim message waits for an earlier one of its chat",
                extra={"seq": d.stream_seq, "earlier": blocker},
            )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stop.wait(), poll)
            poll = min(poll * 2, BLOCKED_POLL_MAX_S)

    async def _earlier(self, seq: int, chat: str) -> int | None:
        """An earlier seq of `chat` still unrelayed, or None."""
        refreshed = False
        if seq - self.floor > 4 * SIM_RECEIVE_WINDOW:
            # Keep the scan short (what is known here is forgotten below the floor).
            refreshed = True
            await self._refresh_floor()
        q = self.floor + 1
        while q < seq:
            known = self.chat_of.get(q, "?unknown")
            holds = self.loop is not None and self.loop.holds(q)
            if known is None or (known != chat and known != "?unknown"):
                q += 1
                continue
            if known == chat and holds:
                return q  # fetched here and unrelayed: it runs (or is queued) here
            if not refreshed:
                # A read is needed: first move the floor (one read per fetch at most).
                refreshed = True
                if await self._refresh_floor():
                    q = max(q, self.floor + 1)
                    continue
            if await self._read(q) == chat:
                return q
            q += 1
        return None

    async def _refresh_floor(self) -> bool:
        """Re-read the ack floor unless read since the last fetch; True if it moved."""
        if self._floor_fresh:
            return False
        if self._floor_read is None:
            self._floor_read = asyncio.ensure_future(self._read_floor())
        read = self._floor_read
        before = self.floor
        try:
            await asyncio.shield(read)
        finally:
            if self._floor_read is read and read.done():
                self._floor_read = None
        return self.floor > before

    async def _read_floor(self) -> None:
        self._floor_fresh = True  # a fetch during the read makes it stale again
        self.reads += 1
        info = await self.bus.js.consumer_info(SIM.name, self.durable)
        floor = info.ack_floor.stream_seq if info.ack_floor else 0
        if floor > self.floor:
            self.floor = floor
            for old in [s for s in self.chat_of if s <= floor]:
                del self.chat_of[old]

    async def _read(self, seq: int) -> str | None:
        """The chat of SIM `seq` if it is a message of this account still in SIM; None
        (remembered: it can never block) otherwise."""
        self.reads += 1
        try:
            raw = await self.bus.js.get_msg(SIM.name, seq)
        except nats.js.errors.NotFoundError:
            self.chat_of[seq] = None  # acked (work queue) or never this account's
            return None
        if raw.subject != self.subject or raw.data is None:
            self.chat_of[seq] = None
            return None
        chat = _chat_of(self.account, raw.data)
        if chat is None:  # dead-lettered when its turn comes; it never blocks a chat
            self.chat_of[seq] = None
        return chat


@asynccontextmanager
async def _receive(bus: Bus, account: str, events: Events) -> AsyncIterator[None]:
    durable = sim_consumer(account)
    order = ChatOrder(bus, account, durable)

    async def handle(payload: SimInbound, d: Delivery) -> None:
        message = incoming(account, payload)
        await order.wait_turn(d, message.chat)
        # Relayed now and acked only after: a failure is redelivered (at least once).
        await events.relay(message)
        order.relayed(d.stream_seq)

    # A window of messages, one queue per chat: chats in parallel, each chat in arrival
    # order, also across receivers (ChatOrder). ADR 0034.
    spec = ConsumerSpec(
        stream=SIM.name,
        durable=durable,
        filter_subject=subjects.sim_in(account),
        max_ack_pending=SIM_RECEIVE_WINDOW,
        batch=SIM_RECEIVE_WINDOW,
        ordered_by_subject=True,
        key=order.fetched,
        # A receiver killed mid-message holds its messages (and the later ones of their
        # chats, waiting in other receivers) only this long.
        ack_wait=5.0,
        # Closing the session waits for the idle fetch: keep handovers well under 1 s.
        fetch_timeout=0.25,
        # A redelivery republishes the same MessageReceived id, which JetStream dedupes.
        sync_ack=False,
    )
    loop = ConsumerLoop(bus, spec, SimInbound, handle)
    order.loop = loop
    await loop.ensure()
    stop = order.stop
    task = asyncio.create_task(loop.run(stop), name=f"sim-receive-{account}")
    try:
        yield
    finally:
        stop.set()
        await task
