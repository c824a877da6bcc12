"""Payloads that are not events: the simulated WhatsApp network (`sim.whatsapp.<account>.*`),
presence commands, and the records kept in KV buckets."""

from __future__ import annotations

from datetime import datetime
from typing import Literal

import msgspec

from contracts.events import AttemptError, UtcDatetime


class SimInbound(msgspec.Struct, frozen=True, kw_only=True):
    """A simulated user's message to an account."""

    chat: str
    sender: str
    text: str
    message_id: str
    # What real networks have (optional, so older payloads still decode): the JIDs the
    # message mentions (the account's own is `<account>@s.whatsapp.net`), the message
    # it quotes, the sender's display name, and the sender's other id (a LID or phone JID).
    mentions: list[str] = msgspec.field(default_factory=list)
    quoted_id: str = ""
    sender_name: str = ""
    sender_alt: str = ""


class SimControl(msgspec.Struct, frozen=True, kw_only=True):
    """A session signal the simulated network sends the account's attached owner."""

    # `silence`: the session stops hearing from the network (no keepalives), as a zombie
    # WhatsApp Web socket does; a session opened afterwards hears again (ADR 0025).
    event: Literal["stream_replaced", "logged_out", "temporary_ban", "receipt", "silence"]
    reason: str = ""
    # receipt only: which messages (transport ids, `sim-<seq>`) reached which state
    chat: str = ""
    message_ids: list[str] = msgspec.field(default_factory=list)
    status: str = "delivered"


PresenceAction = Literal["read", "typing", "paused"]


class PresenceCommand(msgspec.Struct, frozen=True, kw_only=True):
    """What the core asks an account's owner to show a chat (`presence.<channel>.<account>.
    <chat>`, plain NATS, best effort): `read` marks `message_ids` (written by `sender`)
    read, `typing` shows "typing...", `paused` clears it."""

    chat: str
    action: PresenceAction
    message_ids: list[str] = msgspec.field(default_factory=list)
    sender: str = ""  # who wrote message_ids (a group participant; the chat in a 1:1)


class SimPresence(msgspec.Struct, frozen=True, kw_only=True):
    """What the simulated network saw an account show a chat (`sim.whatsapp.<account>.
    presence`): read receipts and typing indicators, for tests to observe their order."""

    chat: str
    action: PresenceAction
    message_ids: list[str] = msgspec.field(default_factory=list)


class SimFailure(msgspec.Struct, frozen=True, kw_only=True):
    """A send the simulated network refused (published on `sim.whatsapp.<acct>.failures`)."""

    job_id: str
    chat: str
    error: str
    permanent: bool


class SimOutbound(msgspec.Struct, frozen=True, kw_only=True):
    """A message the account's owner sent through the simulated network."""

    chat: str
    text: str
    job_id: str
    holder: str
    lease_token: int
    reply_to: str | None = None  # the user message id the send quotes


SendState = Literal["sending", "failed", "sent", "skipped", "dead"]


class SendRecord(msgspec.Struct, frozen=True, kw_only=True):
    """The durable state of one job's delivery (bucket `sends`, key `<account>.<job_id>`).

    `sending` is written before every transport call: found on redelivery it means the
    outcome of that attempt is unknown (the sender stopped in between).
    """

    job_id: str
    state: SendState
    attempt: int
    holder: str = ""
    lease_token: int = 0
    transport_message_id: str = ""
    errors: list[AttemptError] = msgspec.field(default_factory=list)
    # `sending`: when the attempt's send began (under the proven lease). A send the network
    # confirms later (Cloud API status webhook) is recorded as having begun then.
    sent_at: UtcDatetime | None = None


class SentIndex(msgspec.Struct, frozen=True, kw_only=True):
    """Which job a transport message id belongs to (for receipts)."""

    job_id: str
    chat: str


class HistoryEntry(msgspec.Struct, frozen=True, kw_only=True):
    """One line of a chat's conversation as the model sees it."""

    role: Literal["user", "assistant"]
    text: str
    ref: str = ""  # the inbound event id or the reply job id


class ChatState(msgspec.Struct, frozen=True, kw_only=True):
    """A chat as the core knows it (bucket `chats`): the stream sequence of the last
    inbound message whose turn is settled, and the recent history. Written with a
    revision check after each turn, so replicas agree on both."""

    chat: str
    last_seq: int = 0
    history: list[HistoryEntry] = msgspec.field(default_factory=list)
    # The chat's inbound rate budget (GCRA): the theoretical arrival time, in epoch
    # seconds, of its next message within the rate (0: no message counted yet).
    rate_tat: float = 0.0


class DeviceRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Which device an account's session resumes (bucket `devices`, key
    `<channel>.<account>`): written when the account is paired, removed when the network
    unlinks it. The device's keys live in the transport's session store, never here."""

    channel: str
    account: str
    device_id: str  # e.g. whatsmeow's device JID `15551234567:7@s.whatsapp.net`
    paired_at: datetime
    paired_by: str = ""  # the holder (host) that paired it


SessionState = Literal[
    "connecting",
    "connected",
    "disconnected",
    "zombie",  # connected, but nothing heard for SVC_ZOMBIE_AFTER (ADR 0025)
    "needs_pairing",
    "logged_out",
    "replaced",
    "banned",
    "outdated",
    "connect_failed",
    "standby",
]


class SendBudgetStatus(msgspec.Struct, frozen=True, kw_only=True):
    """An account's send budget as its owner runs it (ADR 0024): the reply budget
    (`reply`, e.g. `12/min burst 3`, or `unlimited`), the first-contact budget
    (`first_contact`: `off` refuses, `any` counts replies only, or a rate), the factor a
    ban cut it to (1.0: as configured) and why, and how many jobs wait for it now."""

    reply: str = "unlimited"
    first_contact: str = "any"
    same_text: str = "off"
    factor: float = 1.0
    reason: str = ""
    waiting: int = 0
    next_step_at: datetime | None = None


class SessionStatus(msgspec.Struct, frozen=True, kw_only=True):
    """An account's session as its owner last reported it (bucket `sessions`, key
    `<channel>.<account>`): for `svc status`, best-effort, never a fencing fact (the lease
    is). `since` is when `state` began; `until` when a ban ends; `connected_at` when the
    session last came up."""

    state: SessionState
    reason: str = ""
    holder: str = ""
    token: int = 0
    device: str = ""
    since: datetime
    until: datetime | None = None
    connected_at: datetime | None = None
    budget: SendBudgetStatus | None = None  # the owner's send budget (None: not reported)
