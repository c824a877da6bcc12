"""Events (past-tense facts) and commands (imperative intents), v1.

Every message carries the envelope `type` (the tag), `id` (unique; also the
`Nats-Msg-Id`) and `at` (UTC). Evolve only by adding defaulted fields; a breaking
change is a new tag plus an upcaster, pinned by the golden files in tests/contracts.
"""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import msgspec

CHANNEL_WHATSAPP = "whatsapp"


UtcDatetime = Annotated[datetime, msgspec.Meta(tz=True)]


def utcnow() -> datetime:
    """The current time in UTC (the envelope's `at`)."""
    return datetime.now(UTC)


def new_id() -> str:
    """A fresh random message id."""
    return uuid.uuid4().hex


def derived_id(*parts: str) -> str:
    """A deterministic id from its cause, so a retried publish dedupes on `Nats-Msg-Id`."""
    digest = hashlib.blake2b("\x1f".join(parts).encode(), digest_size=16)
    return digest.hexdigest()


class Message(msgspec.Struct, frozen=True, kw_only=True, tag_field="type", tag=True):
    """Envelope shared by every event and command."""

    id: str = msgspec.field(default_factory=new_id)
    at: UtcDatetime = msgspec.field(default_factory=utcnow)


class Event(Message, frozen=True, kw_only=True):
    """A fact that happened."""


class Command(Message, frozen=True, kw_only=True):
    """An intent for some worker to carry out."""


# --- INBOUND ---------------------------------------------------------------------------


class MessageReceived(Event, frozen=True, kw_only=True):
    """A user's message arrived on a channel account."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    sender: str
    message_id: str
    text: str
    from_me: bool = False
    is_group: bool = False
    sender_name: str = ""
    mentioned: bool = False  # the message mentions the account itself (groups)
    mentions: list[str] = msgspec.field(default_factory=list)  # every JID it mentions
    quoted_id: str = ""  # the message it replies to, if any
    # The sender's other id when the network reports one person under two (WhatsApp's
    # LID and phone JIDs); `sender` (and a direct chat's `chat`) is the normalised one.
    sender_alt: str = ""


# --- AGENT -----------------------------------------------------------------------------


class ToolCallRecord(msgspec.Struct, frozen=True, kw_only=True):
    """One tool call made during a turn."""

    name: str
    arguments: dict[str, Any] = msgspec.field(default_factory=dict)
    result_digest: str = ""
    error: str | None = None
    latency_ms: float = 0.0


class TokenUsage(msgspec.Struct, frozen=True, kw_only=True):
    """Token counts reported by the model provider."""

    prompt_tokens: int = 0
    completion_tokens: int = 0


class OperatorOrigin(msgspec.Struct, frozen=True, kw_only=True):
    """Who made an operator-originated turn (a proactive send from the console or API):
    `actor` is the user or token name, `kind` says which, `client` the address it came
    from, `via` the way in (`web`)."""

    actor: str
    kind: Literal["user", "token"] = "user"
    client: str = ""
    via: str = "web"


class TurnCompleted(Event, frozen=True, kw_only=True):
    """The agent answered one inbound message -- or, with `origin` set, an operator sent
    `reply_ids` on their own (a proactive send: no inbound message, `inbound_id` empty)."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    inbound_id: str
    model: str
    tools_called: list[ToolCallRecord] = msgspec.field(default_factory=list)
    reply_ids: list[str] = msgspec.field(default_factory=list)
    latency_ms: float = 0.0
    usage: TokenUsage | None = None
    skipped: str | None = None
    # PLUGINS stream position of the projection the turn's tools were resolved from
    # (0: no projection, plugin defaults), so an audit can rebuild the policy it saw.
    plugins_seq: int = 0
    origin: OperatorOrigin | None = None  # set on an operator-originated turn (ADR 0041)


class TurnFailed(Event, frozen=True, kw_only=True):
    """The agent gave up on one inbound message (after its retries)."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    inbound_id: str
    model: str
    error: str
    reply_ids: list[str] = msgspec.field(default_factory=list)
    tools_called: list[ToolCallRecord] = msgspec.field(default_factory=list)
    plugins_seq: int = 0


class MessageRefused(Event, frozen=True, kw_only=True):
    """An inbound message a policy refused: it never reached the model, and it ends its
    `MessageReceived` like a turn does (`rule` names the policy, e.g. `rate:chat`)."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    sender: str
    message_id: str
    rule: str
    inbound_id: str = ""  # the refused MessageReceived's event id
    detail: str = ""


# --- OUTBOUND --------------------------------------------------------------------------


class SendMessage(Command, frozen=True, kw_only=True):
    """Send `text` to `chat` from `account`; `job_id` equals the envelope `id`."""

    job_id: str
    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    text: str
    reply_to: str | None = None  # the message id the reply quotes
    cause_id: str = ""
    requeued_from: str | None = None
    # What a transport needs to show the quote besides its id: who wrote the quoted
    # message (in a group) and its text (cut to QUOTE_TEXT_LIMIT).
    reply_to_sender: str = ""
    reply_to_text: str = ""
    # A template to send instead of `text` (the Cloud API's answer to a chat outside its
    # 24-hour window, error 131047); `text` then says what was meant, for the transcript.
    template: str = ""


# --- DELIVERY --------------------------------------------------------------------------


class MessageSent(Event, frozen=True, kw_only=True):
    """The transport accepted a job's message; sent by `holder` under `lease_token`."""

    job_id: str
    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    holder: str
    lease_token: int
    transport_message_id: str
    attempt: int = 1
    # The job's OUTBOUND stream sequence (its enqueue position; 0 when unknown), when the
    # transport call began (after the lease was proven), and what was sent: enough for an
    # audit to check order and fencing, and for a transcript, after the job is consumed.
    job_seq: int = 0
    sent_at: UtcDatetime | None = None
    text: str = ""
    # The message id the send quoted (None: no quote). UNSET (omitted) in records made
    # before it was recorded, when a turn's first reply always named the message it
    # answered.
    reply_to: str | msgspec.UnsetType | None = msgspec.UNSET


class DeliveryFailed(Event, frozen=True, kw_only=True):
    """One delivery attempt failed."""

    job_id: str
    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    attempt: int  # 0: reported by the network after it accepted the send (a status webhook)
    error: str
    permanent: bool = False
    code: int | None = None  # the network's error code, when it gave one (Graph: 131047 ...)


class DeliveryDeadLettered(Event, frozen=True, kw_only=True):
    """A job was moved to the dead letters and will not be sent."""

    job_id: str
    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    reason: str
    attempts: int = 0
    job_seq: int = 0


class DeliveryUncertain(Event, frozen=True, kw_only=True):
    """A job may or may not have reached the transport (crash between send and record)."""

    job_id: str
    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    holder: str
    lease_token: int
    resolution: str = ""


class DeliveryReceipt(Event, frozen=True, kw_only=True):
    """The transport reported a delivery or read receipt for a sent message."""

    job_id: str
    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    transport_message_id: str
    status: str


# --- DEADLETTER ------------------------------------------------------------------------


class AttemptError(msgspec.Struct, frozen=True, kw_only=True):
    """The error of one processing attempt."""

    attempt: int
    error: str
    at: datetime = msgspec.field(default_factory=utcnow)


class DeadLettered(Event, frozen=True, kw_only=True):
    """A message that could not be processed, kept with every attempt's error."""

    source_stream: str
    source_subject: str
    source_seq: int
    reason: str
    errors: list[AttemptError] = msgspec.field(default_factory=list)
    payload: bytes = b""
    headers: dict[str, str] = msgspec.field(default_factory=dict)
    job_id: str | None = None
    source_msg_id: str = ""
    # Bounds (ADR 0013): a payload over the letter's limit is kept cut, with the original's
    # size and sha256; a subject that cannot be carried is kept cut, with its sha256.
    payload_truncated: bool = False
    payload_size: int = 0  # the original payload's size in bytes (0: not recorded)
    payload_sha256: str = ""
    source_subject_sha256: str = ""  # set when `source_subject` is not the whole subject
    hook_error: str = ""  # the dead-letter hook's own failure, recorded instead of raised


class DeadLetterRequeued(Event, frozen=True, kw_only=True):
    """An operator sent a dead letter back (an OUTBOUND job as `new_job_id`)."""

    letter_seq: int
    letter_id: str
    new_job_id: str | None = None
    actor: str = ""
    reason: str = ""
    # Where the operator acted from: the client address and the way in (`web`, `cli`);
    # empty in events recorded before these were.
    client: str = ""
    via: str = ""


class DeadLetterDropped(Event, frozen=True, kw_only=True):
    """An operator discarded a dead letter."""

    letter_seq: int
    letter_id: str
    actor: str = ""
    reason: str = ""
    # Where the operator acted from: the client address and the way in (`web`, `cli`);
    # empty in events recorded before these were.
    client: str = ""
    via: str = ""


# --- PLUGINS ---------------------------------------------------------------------------


class Scope(msgspec.Struct, frozen=True, kw_only=True):
    """Where a plugin setting or tool policy applies: global, a channel, or an account."""

    channel: str | None = None
    account: str | None = None


class PluginInstalled(Event, frozen=True, kw_only=True):
    """A plugin was installed in a scope."""

    name: str
    version: str
    scope: Scope = msgspec.field(default_factory=Scope)
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    actor: str = ""


class PluginConfigured(Event, frozen=True, kw_only=True):
    """A plugin's configuration changed in a scope."""

    name: str
    scope: Scope = msgspec.field(default_factory=Scope)
    config: dict[str, Any] = msgspec.field(default_factory=dict)
    actor: str = ""


class PluginUninstalled(Event, frozen=True, kw_only=True):
    """A plugin was removed from a scope."""

    name: str
    scope: Scope = msgspec.field(default_factory=Scope)
    actor: str = ""


class ToolPolicySet(Event, frozen=True, kw_only=True):
    """Allow/deny glob patterns over `plugin.tool` for a scope."""

    scope: Scope = msgspec.field(default_factory=Scope)
    allow: list[str] = msgspec.field(default_factory=list)
    deny: list[str] = msgspec.field(default_factory=list)
    actor: str = ""


class FactRemembered(Event, frozen=True, kw_only=True):
    """The memory plugin stored a fact for a chat."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    key: str
    value: str


class FactForgotten(Event, frozen=True, kw_only=True):
    """The memory plugin dropped a chat's fact."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    chat: str
    key: str


# --- ACCOUNTS --------------------------------------------------------------------------


class AccountRegistered(Event, frozen=True, kw_only=True):
    """An account is served by this deployment."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    transport: str


class LeaseAcquired(Event, frozen=True, kw_only=True):
    """`holder` became the account's only sender; `token` is the fencing token."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    holder: str
    token: int


class LeaseReleased(Event, frozen=True, kw_only=True):
    """The holder gave the lease up on purpose."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    holder: str
    token: int
    reason: str = ""


class LeaseLost(Event, frozen=True, kw_only=True):
    """The holder could no longer prove its lease and stopped sending."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    holder: str
    token: int
    reason: str = ""


class SessionLoggedOut(Event, frozen=True, kw_only=True):
    """The transport session was logged out or replaced; the account needs an operator."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    holder: str
    reason: str = ""


class SessionBanned(Event, frozen=True, kw_only=True):
    """The channel banned the account (temporarily, until `until` when known)."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    holder: str
    reason: str = ""
    until: datetime | None = None


class SendBudgetChanged(Event, frozen=True, kw_only=True):
    """The account's send budget moved: cut by a ban or an account-level send error, or
    restored one step after it. `factor` scales the configured budgets (1.0: as
    configured); `per_minute`/`burst` are the reply budget it gives (0: unlimited);
    `next_step_at` is when the next doubling is due (None: none scheduled)."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    reason: str
    per_minute: float = 0.0
    burst: int = 0
    factor: float = 1.0
    next_step_at: UtcDatetime | None = None
    holder: str = ""


class SessionZombie(Event, frozen=True, kw_only=True):
    """The account's session said it was connected but heard nothing from the network
    (no message, receipt or keepalive) for `silent_for` seconds; `recycled` says the owner
    closed and reopened it under the same lease (at most once per cap window, ADR 0025)."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    holder: str
    token: int = 0
    silent_for: float
    recycled: bool = False


class AccountResumed(Event, frozen=True, kw_only=True):
    """An operator cleared a parked account (logged out, replaced, banned) for takeover."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    actor: str = ""
    reason: str = ""
    # Where the operator acted from: the client address and the way in (`web`, `cli`);
    # empty in events recorded before these were.
    client: str = ""
    via: str = ""


PairingOutcome = Literal["paired", "failed"]


class PairingStarted(Event, frozen=True, kw_only=True):
    """Someone started linking a WhatsApp number to an account (`svc whatsapp pair` or the
    console): who (`actor`), through what (`via`: cli | web) and from where (`client`, the
    web client's address). No QR or pairing code is ever recorded."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    attempt: str
    actor: str = ""
    via: str = ""
    client: str = ""
    by_code: bool = False  # a pairing code for a phone number instead of a QR
    force: bool = False


class PairingFinished(Event, frozen=True, kw_only=True):
    """How a pairing attempt ended: `paired` as `device` (masked), or `failed` with the
    one-line `reason` the operator saw."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    attempt: str
    outcome: PairingOutcome
    device: str = ""
    reason: str = ""
    actor: str = ""
    via: str = ""


# --- ACCESS ----------------------------------------------------------------------------
# Who may talk to the agent (ADR 0023). `account` "" is the channel-wide scope.

AccessMode = Literal["open", "allowlist", "approval"]
AccessKind = Literal["allow", "block"]


class AccessModeSet(Event, frozen=True, kw_only=True):
    """The access mode of a channel (`account` "") or of one account."""

    channel: str = CHANNEL_WHATSAPP
    account: str = ""
    mode: AccessMode
    actor: str = ""


class AccessRuleAdded(Event, frozen=True, kw_only=True):
    """An allow or block pattern (a JID, a phone number or a glob) for a scope."""

    channel: str = CHANNEL_WHATSAPP
    account: str = ""
    pattern: str
    kind: AccessKind
    actor: str = ""


class AccessRuleRemoved(Event, frozen=True, kw_only=True):
    """An allow or block pattern was taken out of a scope."""

    channel: str = CHANNEL_WHATSAPP
    account: str = ""
    pattern: str
    kind: AccessKind
    actor: str = ""


class AccessApproved(Event, frozen=True, kw_only=True):
    """An operator approved `jid` for an account; `released` are the inbound event ids of
    its waiting messages, sent back to the core to be answered."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    jid: str
    released: list[str] = msgspec.field(default_factory=list)
    actor: str = ""


class AccessRequested(Event, frozen=True, kw_only=True):
    """An unknown sender (or group) wrote under `approval`: pending for the operator.
    `waiting_job` is the waiting reply sent with it ("" : none, one was sent recently)."""

    channel: str = CHANNEL_WHATSAPP
    account: str
    jid: str
    chat: str
    message_id: str
    inbound_id: str = ""
    inbound_seq: int = 0  # the waiting message's INBOUND sequence, to answer it on approval
    waiting_job: str = ""


# --- Unions, one per stream ------------------------------------------------------------

InboundEvent = MessageReceived
AgentEvent = TurnCompleted | TurnFailed | MessageRefused
OutboundCommand = SendMessage
DeliveryEvent = (
    MessageSent | DeliveryFailed | DeliveryDeadLettered | DeliveryUncertain | DeliveryReceipt
)
DeadLetterEvent = DeadLettered | DeadLetterRequeued | DeadLetterDropped
PluginEvent = (
    PluginInstalled
    | PluginConfigured
    | PluginUninstalled
    | ToolPolicySet
    | FactRemembered
    | FactForgotten
)
AccountEvent = (
    AccountRegistered
    | LeaseAcquired
    | LeaseReleased
    | LeaseLost
    | SessionLoggedOut
    | SessionBanned
    | AccountResumed
    | SendBudgetChanged
    | SessionZombie
    | PairingStarted
    | PairingFinished
)
AccessEvent = AccessModeSet | AccessRuleAdded | AccessRuleRemoved | AccessApproved | AccessRequested
AnyMessage = (
    MessageReceived
    | TurnCompleted
    | TurnFailed
    | MessageRefused
    | SendMessage
    | MessageSent
    | DeliveryFailed
    | DeliveryDeadLettered
    | DeliveryUncertain
    | DeliveryReceipt
    | DeadLettered
    | DeadLetterRequeued
    | DeadLetterDropped
    | PluginInstalled
    | PluginConfigured
    | PluginUninstalled
    | ToolPolicySet
    | FactRemembered
    | FactForgotten
    | AccountRegistered
    | LeaseAcquired
    | LeaseReleased
    | LeaseLost
    | SessionLoggedOut
    | SessionBanned
    | AccountResumed
    | SendBudgetChanged
    | AccessModeSet
    | AccessRuleAdded
    | AccessRuleRemoved
    | AccessApproved
    | AccessRequested
    | SessionZombie
    | PairingStarted
    | PairingFinished
)

ALL_TYPES: tuple[type[Message], ...] = (
    MessageReceived,
    TurnCompleted,
    TurnFailed,
    MessageRefused,
    SendMessage,
    MessageSent,
    DeliveryFailed,
    DeliveryDeadLettered,
    DeliveryUncertain,
    DeliveryReceipt,
    DeadLettered,
    DeadLetterRequeued,
    DeadLetterDropped,
    PluginInstalled,
    PluginConfigured,
    PluginUninstalled,
    ToolPolicySet,
    FactRemembered,
    FactForgotten,
    AccountRegistered,
    LeaseAcquired,
    LeaseReleased,
    LeaseLost,
    SessionLoggedOut,
    SessionBanned,
    AccountResumed,
    SendBudgetChanged,
    AccessModeSet,
    AccessRuleAdded,
    AccessRuleRemoved,
    AccessApproved,
    AccessRequested,
    SessionZombie,
    PairingStarted,
    PairingFinished,
)
