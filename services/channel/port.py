"""The transport port, owned by the channel layer that uses it (ADR 0016).

A `Transport` opens one `Session` per account for the account's lease holder. A session
carries both directions, like a neonize/whatsmeow socket: `send(Outgoing)` goes out, and
what the network says arrives as session events, handed to `Events` (the channel layer's
`EventDispatch`: at least once, in order, one at a time). A session reports its own
end (`await session.ended()`); disconnects and "needs pairing" are events, not errors.
A transport whose inbound path is separate from its sessions (the sim's durable queue,
Cloud API webhooks) also offers an `InboundSource`, which any number of receive-only
workers may run without the lease.

Everything here is channel-agnostic: the channel name comes from `Transport.channel`.

Optional session capabilities (ADR 0025), looked up with `getattr` so a transport that
cannot simply lacks them: `last_heard()` (the zombie watchdog's input), `presence()`
(read receipts and typing) and `confirmed(job_id)` (the network's own word that a job
went out: resolves an uncertain send, ADR 0028). `SessionCapabilities` documents their
shape.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Literal, Protocol

from contracts.payloads import PresenceAction
from services.runtime.errors import ServiceError


@dataclass(frozen=True)
class Fence:
    """Who sends, under which lease token, and until when (`deadline`, time.monotonic()):
    carried by every send. A transport must not let a send reach the network after the
    deadline -- past it another holder may own the account."""

    holder: str
    token: int
    deadline: float = math.inf


@dataclass(frozen=True)
class Quote:
    """The message a send replies to, with what a transport needs to quote it: its id,
    who wrote it (a group participant) and its text (WhatsApp shows the quoted bubble)."""

    message_id: str
    sender: str = ""
    text: str = ""


@dataclass(frozen=True)
class Outgoing:
    """One message to send: a job's text to its chat, fenced by the sender's lease."""

    chat: str
    text: str
    job_id: str
    fence: Fence
    reply_to: Quote | None = None
    template: str = ""  # send this template instead of `text` (transports that have them)


@dataclass(frozen=True)
class Incoming:
    """A user's message arrived.

    `sender` is normalised by the transport's mapping: one person reported under two ids
    (WhatsApp's LID and phone JIDs) yields one sender, and a direct chat's `chat` is that
    sender, so both ids give one chat key; the other id is kept in `sender_alt`.
    `mentioned` says the account itself is among `mentions`.
    """

    chat: str
    sender: str
    text: str
    message_id: str
    from_me: bool = False
    is_group: bool = False
    sender_name: str = ""
    sender_alt: str = ""
    mentions: tuple[str, ...] = ()
    mentioned: bool = False
    quoted_id: str = ""


@dataclass(frozen=True)
class Receipt:
    """The network delivered (or the user read) messages we sent: `transport_message_ids`
    are the ids `Session.send` returned."""

    chat: str
    transport_message_ids: tuple[str, ...]
    status: str  # delivered | read | played


@dataclass(frozen=True)
class Connected:
    """The session is up (again)."""


@dataclass(frozen=True)
class Disconnected:
    """The connection dropped; the transport reconnects by itself and keeps the session
    (sends fail transiently meanwhile). Not an end."""

    reason: str = ""


@dataclass(frozen=True)
class NeedsPairing:
    """The account has no usable device: it must be paired before it can connect."""

    reason: str = ""


@dataclass(frozen=True)
class StreamReplaced:
    """Another client took over this account's session (never reconnect in a loop)."""


@dataclass(frozen=True)
class LoggedOut:
    """The account was unlinked; it must be paired again."""

    reason: str = ""


@dataclass(frozen=True)
class ClientOutdated:
    """The network refuses this client version: nothing reconnects until the transport
    library is upgraded (pairing again does not help)."""


@dataclass(frozen=True)
class TemporaryBan:
    """The network banned the account for a while."""

    reason: str = ""
    until: datetime | None = None


SessionEvent = (
    Incoming
    | Receipt
    | Connected
    | Disconnected
    | NeedsPairing
    | StreamReplaced
    | LoggedOut
    | TemporaryBan
    | ClientOutdated
)
EventHandler = Callable[[SessionEvent], Awaitable[None]]

EndState = Literal["needs_pairing", "replaced", "banned", "outdated", "connect_failed"]


@dataclass(frozen=True)
class SessionEnd:
    """Why a session ended by itself: the account is parked with `reason` until an
    operator resumes it (`svc accounts resume`)."""

    state: EndState
    reason: str
    until: datetime | None = None


def end_of(event: SessionEvent) -> SessionEnd | None:
    """The end a session event means, or None for events a session lives through."""
    match event:
        case NeedsPairing(reason=reason):
            return SessionEnd(
                "needs_pairing", f"needs pairing: {reason}" if reason else "needs pairing"
            )
        case StreamReplaced():
            return SessionEnd("replaced", "stream replaced")
        case LoggedOut(reason=reason):
            # The device is gone (unlinked from the phone): pairing again is the way back.
            return SessionEnd("needs_pairing", reason or "logged out")
        case TemporaryBan(reason=reason, until=until):
            return SessionEnd("banned", f"banned: {reason}", until)
        case ClientOutdated():
            return SessionEnd("outdated", "client outdated: upgrade the WhatsApp library")
        case _:
            return None


class TransportError(ServiceError):
    """A send failed; `permanent` says whether retrying can help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class UncertainSendError(TransportError):
    """The send may or may not have reached the network (it timed out waiting for the
    server's acknowledgement): the egress records `DeliveryUncertain` at once and resolves
    it by the DELIVERY_UNCERTAIN policy instead of retrying blind."""


class NotConnectedError(TransportError):
    """The session is between connections (its transport reconnects by itself): nothing
    was sent. The egress keeps the job, in its place, and tries again once the session
    may be back, without spending an attempt or the send budget."""


class StaleFenceError(TransportError):
    """The send was refused before reaching the network: its fence is past its deadline,
    or the network knows a newer lease token. Nothing was sent; the sender lost the lease."""


class Session(Protocol):
    """An attached account session (one per account, owned by the lease holder)."""

    reports_receipts: bool  # receipts will refer to the ids send() returns
    # The longest a send() may take (seconds): it returns or raises by then. The egress
    # starts a send only while its lease proof covers this long.
    send_timeout: float

    async def send(self, out: Outgoing) -> str:
        """Send `out` unless past `out.fence.deadline`; return the network's message id."""
        ...

    async def ended(self) -> SessionEnd:
        """Return when the session has ended by itself (logged out, replaced, banned, not
        paired); never for a session closed by its owner."""
        ...


class SessionCapabilities(Protocol):
    """Optional extras of a `Session`: a transport offers each one it can, or none."""

    def last_heard(self) -> float | None:
        """time.monotonic() of the last thing the network sent this session (a message,
        a receipt, a keepalive answer), or None before anything was heard."""
        ...

    async def presence(
        self, chat: str, action: PresenceAction, message_ids: tuple[str, ...], sender: str = ""
    ) -> None:
        """Show `chat` an action: `read` marks `message_ids` (by `sender`) read, `typing`
        shows "typing...", `paused` clears it. Best effort: bounded in time, never raises."""
        ...

    async def confirmed(self, job_id: str) -> str | None:
        """The transport message id under which the network confirmed `job_id` went out
        (e.g. a Cloud API status webhook echoing the job id), or None. The egress asks it
        before applying DELIVERY_UNCERTAIN: a confirmed job is recorded sent, not resent.
        Bounded in time (it may wait a little for a confirmation in flight)."""
        ...


def last_heard_of(session: object) -> float | None:
    """The session's `last_heard()`, or None when the transport cannot tell."""
    probe = getattr(session, "last_heard", None)
    return probe() if callable(probe) else None


class Events(Protocol):
    """Where a transport hands a session's events (the channel layer's `EventDispatch`):
    the handler sees them at least once, in order, one at a time."""

    def post(self, event: SessionEvent) -> None:
        """Queue `event` (never blocks; for network callbacks). A failing handler is
        retried, then the event is logged and dropped: later events never stall."""
        ...

    async def deliver(self, event: SessionEvent) -> None:
        """Deliver `event` now, in order after what came before; raise what the handler
        raised (for callers with their own redelivery, like a durable queue)."""
        ...

    async def relay(self, event: Incoming) -> None:
        """Handle a received message now, beside other events (not after them); raise
        what the handler raised. For a caller that keeps per-chat order itself and
        relays several chats at once (the sim receiver, ADR 0034)."""
        ...


class InboundSource(Protocol):
    """Receives an account's inbound messages without a session (receive-only workers)."""

    def receiver(self, account: str, events: Events) -> AbstractAsyncContextManager[None]:
        """Deliver what arrives for `account` to `events` until the context exits."""
        ...


class Transport(Protocol):
    """Opens account sessions; `inbound` is its separate inbound path, if it has one."""

    name: str
    channel: str  # the channel its accounts are on: the <channel> of every subject
    send_timeout: float  # what its sessions declare; checked against the lease TTL at start

    @property
    def inbound(self) -> InboundSource | None:
        """Its separate inbound path (receive-only workers), or None: a session transport
        receives on the account's socket, so only the lease holder receives."""
        ...

    def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AbstractAsyncContextManager[Session]:
        """Attach to `account`; deliver its session events to `events`, and with
        `receive` also what users send it (a transport with a separate inbound path
        relays it only then)."""
        ...


class SessionEnding:
    """The `ended()` half of a Session, for transports to reuse: `end()` once, first wins."""

    def __init__(self) -> None:
        self._ended: asyncio.Event = asyncio.Event()
        self._end: SessionEnd | None = None

    def end(self, end: SessionEnd) -> None:
        """Record that the session ended (the first end counts)."""
        if self._end is None:
            self._end = end
            self._ended.set()

    async def ended(self) -> SessionEnd:
        """Return when the session has ended by itself."""
        await self._ended.wait()
        assert self._end is not None
        return self._end
