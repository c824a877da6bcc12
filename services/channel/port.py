"""Ports of the WhatsApp channel: a Transport opens one Session per account.

A session carries both directions, like a neonize/whatsmeow socket: `send()` goes
out, and everything the network tells us arrives as a `TransportEvent` passed to the
owner's callback (message, receipt, connected, stream replaced, logged out, banned).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

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
class Incoming:
    """A user's message arrived."""

    chat: str
    sender: str
    text: str
    message_id: str
    from_me: bool = False
    is_group: bool = False
    sender_name: str = ""


@dataclass(frozen=True)
class Receipt:
    """The network delivered (or the user read) a message we sent."""

    chat: str
    transport_message_ids: tuple[str, ...]
    status: str  # delivered | read | played


@dataclass(frozen=True)
class Connected:
    """The session is up."""


@dataclass(frozen=True)
class StreamReplaced:
    """Another client took over this account's session (never reconnect in a loop)."""


@dataclass(frozen=True)
class LoggedOut:
    """The account was unlinked; it must be paired again."""

    reason: str = ""


@dataclass(frozen=True)
class TemporaryBan:
    """The network banned the account for a while."""

    reason: str = ""
    until: datetime | None = None


TransportEvent = Incoming | Receipt | Connected | StreamReplaced | LoggedOut | TemporaryBan
EventCallback = Callable[[TransportEvent], Awaitable[None]]


class TransportError(ServiceError):
    """A send failed; `permanent` says whether retrying can help."""

    def __init__(self, message: str, *, permanent: bool = False) -> None:
        super().__init__(message)
        self.permanent = permanent


class StaleFenceError(TransportError):
    """The send was refused before reaching the network: its fence is past its deadline,
    or the network knows a newer lease token. Nothing was sent; the sender lost the lease."""


class Session(Protocol):
    """An attached account session (one per account, owned by the lease holder)."""

    reports_receipts: bool  # receipts will refer to the ids send() returns
    # The longest a send() may take (seconds): it returns or raises by then. The egress
    # starts a send only while its lease proof covers this long.
    send_timeout: float

    async def send(self, chat: str, text: str, *, job_id: str, fence: Fence) -> str:
        """Send `text` to `chat` unless past `fence.deadline`; return the message id."""
        ...


class Transport(Protocol):
    """Opens account sessions. `separate_inbound`: can receive without owning the session."""

    name: str
    channel: str  # the channel its accounts are on: the <channel> of every subject
    separate_inbound: bool
    send_timeout: float  # what its sessions declare; checked against the lease TTL at start

    def session(
        self, account: str, on_event: EventCallback, *, receive: bool
    ) -> AbstractAsyncContextManager[Session]:
        """Attach to `account`; with `receive`, deliver what arrives to `on_event`."""
        ...

    def receiver(self, account: str, on_event: EventCallback) -> AbstractAsyncContextManager[None]:
        """Receive without a session (only where `separate_inbound` is true)."""
        ...
