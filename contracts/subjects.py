"""Subject builders for every stream, and the reversible chat-JID <-> token encoding.

A chat JID such as `123@s.whatsapp.net` contains `.`, which NATS treats as a token
separator, so chats travel as one escaped token: bytes outside the safe set are written
`~XX` (upper-case hex of their UTF-8 bytes), e.g. `123@s~2Ewhatsapp~2Enet`.
"""

from __future__ import annotations

import functools
import hashlib
import re
from typing import Literal

import msgspec

from contracts.errors import InvalidSubjectError

CHANNELS: frozenset[str] = frozenset({"whatsapp"})
ACCOUNT_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_ACCOUNT_RE = re.compile(ACCOUNT_PATTERN)
_SAFE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789@-_:+=!")
_ESCAPE = "~"
_TOKEN_RE = re.compile(r"(?:[A-Za-z0-9@\-_:+=!]|~[0-9A-F]{2})+")
# Chats whose token (and back) is remembered: every event of a turn names its chat several
# times, and the encoding is pure (a refused JID raises and is not remembered).
_CHATS_CACHED = 8192

Kind = Literal["inbound", "agent", "outbound", "delivery"]

# Input bounds (ADR 0013). nats-server closes a connection whose control line (`PUB
# <subject> <reply> <size>`) passes 4,096 bytes, so every id that ends up in a subject is
# bounded where it enters. Real JIDs are short (`123@s.whatsapp.net`, `1203-4567@g.us`,
# `123456789012345@lid`, `1203@newsletter`): 256 characters leaves a wide margin.
MAX_JID_CHARS = 256
# The encoded chat token (a non-ASCII character costs up to 12 bytes, `~XX` per byte).
MAX_CHAT_TOKEN_BYTES = 1024
# Sender JIDs and transport message ids are not in subjects but are stored and logged.
MAX_ID_CHARS = 256
# The longest subject a dead letter may carry as `deadletter.<subject>`: every derived
# chat subject is under 1,200 bytes (`deadletter.delivery.whatsapp.<64>.<1024>`).
MAX_SUBJECT_BYTES = 1536
# What a message shows of a bad id: enough to recognise it, never a 4,000-char line.
_SHOWN = 40


def shown(value: str, limit: int = _SHOWN) -> str:
    """`value` for an error line: repr, cut to `limit` characters with its length."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}... ({len(value)} chars)"


def _check_text_id(what: str, value: str, limit: int, example: str) -> str:
    """Refuse an empty, too long, non-printable or not-encodable id (one line)."""
    if not value:
        raise InvalidSubjectError(f"{what} is empty: pass e.g. {example}")
    if len(value) > limit:
        raise InvalidSubjectError(
            f"{what} {shown(value)} is too long: at most {limit} characters, e.g. {example}"
        )
    if not value.isprintable():  # control, format, separator or unassigned characters
        raise InvalidSubjectError(
            f"{what} {shown(value)} holds control characters: pass e.g. {example}"
        )
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidSubjectError(f"{what} {shown(value)} is not valid UTF-8") from None
    return value


def check_jid(jid: str, what: str = "chat JID") -> str:
    """Return `jid` if it can be a WhatsApp JID within the bounds, else raise."""
    return _check_text_id(what, jid, MAX_JID_CHARS, "123@s.whatsapp.net")


def check_message_id(message_id: str) -> str:
    """Return a transport message id if it is within the bounds, else raise."""
    return _check_text_id("message id", message_id, MAX_ID_CHARS, "3EB0C431C2A1")


@functools.lru_cache(maxsize=_CHATS_CACHED)
def encode_chat(jid: str) -> str:
    """Encode a chat JID as one subject token (reversible, deterministic); raise
    InvalidSubjectError for a JID outside the bounds (length, characters, encoding)."""
    check_jid(jid)
    out: list[str] = []
    for ch in jid:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"{_ESCAPE}{b:02X}" for b in ch.encode("utf-8"))
    token = "".join(out)
    if len(token) > MAX_CHAT_TOKEN_BYTES:
        raise InvalidSubjectError(
            f"chat JID {shown(jid)} encodes to {len(token)} bytes, over {MAX_CHAT_TOKEN_BYTES}:"
            " use a real JID, e.g. 123@s.whatsapp.net"
        )
    return token


@functools.lru_cache(maxsize=_CHATS_CACHED)
def decode_chat(token: str) -> str:
    """Invert `encode_chat`; raise InvalidSubjectError for a token it could not produce."""
    if len(token) > MAX_CHAT_TOKEN_BYTES or not _TOKEN_RE.fullmatch(token):
        raise InvalidSubjectError(f"chat token {shown(token)} is not an encoded chat JID")
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == _ESCAPE:
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(token[i].encode())
            i += 1
    try:
        jid = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidSubjectError(f"chat token {shown(token)} is not valid UTF-8") from None
    if encode_chat(jid) != token:  # only the canonical form is accepted (e.g. no escaped 'a')
        raise InvalidSubjectError(f"chat token {shown(token)} is not in canonical form")
    return jid


def check_account(account: str) -> str:
    """Return `account` if it matches the account grammar, else raise."""
    if not _ACCOUNT_RE.fullmatch(account):
        raise InvalidSubjectError(
            f"account {shown(account)} is invalid: use 1-64 of A-Z a-z 0-9 _ -"
        )
    return account


def check_channel(channel: str) -> str:
    """Return `channel` if it is a known channel, else raise."""
    if channel not in CHANNELS:
        raise InvalidSubjectError(
            f"channel {shown(channel)} is unknown: expected one of {', '.join(sorted(CHANNELS))}"
        )
    return channel


def _chat_subject(kind: Kind, channel: str, account: str, chat: str) -> str:
    return f"{kind}.{check_channel(channel)}.{check_account(account)}.{encode_chat(chat)}"


def inbound(channel: str, account: str, chat: str) -> str:
    """`inbound.<channel>.<account>.<chat>` (MessageReceived)."""
    return _chat_subject("inbound", channel, account, chat)


def agent(channel: str, account: str, chat: str) -> str:
    """`agent.<channel>.<account>.<chat>` (TurnCompleted, TurnFailed)."""
    return _chat_subject("agent", channel, account, chat)


def outbound(channel: str, account: str, chat: str) -> str:
    """`outbound.<channel>.<account>.<chat>` (SendMessage jobs)."""
    return _chat_subject("outbound", channel, account, chat)


def delivery(channel: str, account: str, chat: str) -> str:
    """`delivery.<channel>.<account>.<chat>` (MessageSent, DeliveryFailed, ...)."""
    return _chat_subject("delivery", channel, account, chat)


def presence(channel: str, account: str, chat: str) -> str:
    """`presence.<channel>.<account>.<chat>`: core -> owner presence commands (read,
    typing, paused) on plain NATS, best effort, never stored (ADR 0025)."""
    return f"presence.{check_channel(channel)}.{check_account(account)}.{encode_chat(chat)}"


def presence_filter(channel: str, account: str) -> str:
    """Every presence command of one account (what its owner subscribes to)."""
    return f"presence.{check_channel(channel)}.{check_account(account)}.*"


def outbound_filter(channel: str, account: str) -> str:
    """Every outbound job of one account."""
    return f"outbound.{check_channel(channel)}.{check_account(account)}.*"


def accounts(channel: str, account: str) -> str:
    """`accounts.<channel>.<account>` (leases and session events)."""
    return f"accounts.{check_channel(channel)}.{check_account(account)}"


ACCESS_CHANNEL_SCOPE = "_"


def access(channel: str, account: str = "") -> str:
    """`access.<channel>.<account>` (access policy; `_` for the channel-wide scope)."""
    if account == ACCESS_CHANNEL_SCOPE:
        raise InvalidSubjectError(
            "account '_' is reserved for the channel-wide access scope: leave --account out"
        )
    scope = check_account(account) if account else ACCESS_CHANNEL_SCOPE
    return f"access.{check_channel(channel)}.{scope}"


_SAFE_SUBJECT_RE = re.compile(r"[A-Za-z0-9@\-_:+=!~$]+(?:\.[A-Za-z0-9@\-_:+=!~$]+)*")
DEADLETTER_INVALID = "deadletter._invalid"


def carriable(subject: str) -> bool:
    """True if `subject` can be carried inside another subject: printable ASCII tokens of
    the subject grammar, no wildcards, within MAX_SUBJECT_BYTES."""
    return len(subject) <= MAX_SUBJECT_BYTES and _SAFE_SUBJECT_RE.fullmatch(subject) is not None


def deadletter(source_subject: str, source_stream: str = "") -> str:
    """`deadletter.<original subject>`: dead letters keep where they came from. A subject
    that cannot be carried (too long, not UTF-8, outside the grammar) is filed under
    `deadletter._invalid.<stream>`; the letter keeps it (cut, with its digest)."""
    if carriable(source_subject):
        return f"deadletter.{source_subject}"
    stream = source_stream if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", source_stream) else "_"
    return f"{DEADLETTER_INVALID}.{stream}"


_PLUGIN_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


def check_plugin(name: str) -> str:
    """Return `name` if it is a valid plugin name, else raise."""
    if not _PLUGIN_RE.fullmatch(name):
        raise InvalidSubjectError(
            f"plugin name {name!r} is invalid: use 1-64 of a-z 0-9 _ -,"
            " starting with a letter or digit"
        )
    return name


DEADLETTER_OPS_SUBJECT = "deadletter._ops"  # requeue/drop records, beside the letters


def plugins(name: str) -> str:
    """`plugins.<name>` (install, configure, uninstall of one plugin)."""
    return f"plugins.{check_plugin(name)}"


PLUGIN_POLICY_SUBJECT = "plugins._policy"


def memory(channel: str, account: str) -> str:
    """`plugins.memory.<channel>.<account>`: the memory plugin's facts."""
    return f"plugins.memory.{check_channel(channel)}.{check_account(account)}"


def lease_key(channel: str, account: str) -> str:
    """Key of an account's lease in the `leases` bucket: `<channel>.<account>`."""
    return f"{check_channel(channel)}.{check_account(account)}"


def lease_handover(channel: str, account: str) -> str:
    """Request subject the account's owner answers by releasing its lease gracefully."""
    return f"svc.lease.handover.{check_channel(channel)}.{check_account(account)}"


def lease_resume(channel: str, account: str) -> str:
    """Request subject a worker of the account answers by clearing its parked lease (so a
    least-privilege client, e.g. the web role, resumes an account without writing leases)."""
    return f"svc.lease.resume.{check_channel(channel)}.{check_account(account)}"


_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def check_job_id(job_id: str) -> str:
    """Return `job_id` if it matches the job id grammar, else raise."""
    if not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidSubjectError(
            f"job id {shown(job_id)} is invalid: use 1-128 of A-Z a-z 0-9 _ -"
        )
    return job_id


def send_key(account: str, job_id: str) -> str:
    """Key of a job's SendRecord in the `sends` bucket."""
    return f"{check_account(account)}.{check_job_id(job_id)}"


def confirm_key(account: str, job_id: str) -> str:
    """Key in the `sends` bucket where a receiver records that the network confirmed a job
    (a Cloud API status webhook carrying the job id): resolves an uncertain send."""
    return f"{check_account(account)}.ok.{check_job_id(job_id)}"


def followup_key(account: str, job_id: str) -> str:
    """Key in the `sends` bucket recording that a job's refusal was followed up by another
    job (the Cloud API's template after a 24-hour-window failure): enqueued once, ever."""
    return f"{check_account(account)}.tpl.{check_job_id(job_id)}"


def chat_key(channel: str, account: str, chat: str) -> str:
    """Key of a chat's ChatState in the `chats` bucket (KV keys cannot hold a JID's
    characters, so the chat is hashed; the value keeps the JID)."""
    digest = hashlib.blake2b(chat.encode("utf-8", "surrogatepass"), digest_size=12).hexdigest()
    return f"{check_channel(channel)}.{check_account(account)}.{digest}"


def sent_index_key(account: str, transport_message_id: str) -> str:
    """Key of the transport-id -> job index in the `sends` bucket."""
    token = "".join(c if c.isalnum() or c in "-_" else "_" for c in transport_message_id)[:200]
    return f"{check_account(account)}.tid.{token or '_'}"


def sim_failures(account: str) -> str:
    """Where the sim network reports each send it refused (observability for tests)."""
    return f"sim.whatsapp.{check_account(account)}.failures"


def sim_control(account: str) -> str:
    """Simulated session signals for `account` (stream replaced, logged out, banned)."""
    return f"sim.whatsapp.{check_account(account)}.control"


def sim_presence(account: str) -> str:
    """What the sim network saw `account` show its chats (read, typing, paused)."""
    return f"sim.whatsapp.{check_account(account)}.presence"


def sim_in(account: str) -> str:
    """What a simulated user sends to `account`."""
    return f"sim.whatsapp.{check_account(account)}.in"


def sim_out(account: str) -> str:
    """What `account`'s owner sends through the simulated network."""
    return f"sim.whatsapp.{check_account(account)}.out"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS wildcard match: `*` is one token, a final `>` is one or more tokens."""
    pat, sub = pattern.split("."), subject.split(".")
    for i, part in enumerate(pat):
        if part == ">":
            return len(sub) > i
        if i >= len(sub) or part not in ("*", sub[i]):
            return False
    return len(sub) == len(pat)


class ChatSubject(msgspec.Struct, frozen=True):
    """A parsed `<kind>.<channel>.<account>.<chat>` subject."""

    kind: str
    channel: str
    account: str
    chat: str


def parse_chat_subject(subject: str) -> ChatSubject:
    """Parse `<kind>.<channel>.<account>.<chat>`; raise InvalidSubjectError otherwise."""
    parts = subject.split(".")
    if len(parts) != 4 or parts[0] not in ("inbound", "agent", "outbound", "delivery"):
        raise InvalidSubjectError(
            f"subject {shown(subject, 80)} is not"
            " <inbound|agent|outbound|delivery>.<channel>.<account>.<chat>"
        )
    kind, channel, account, token = parts
    return ChatSubject(kind, check_channel(channel), check_account(account), decode_chat(token))


def check_agrees(subject: str, kind: str, channel: str, account: str, chat: str) -> ChatSubject:
    """The one subject/payload cross-check (ADR 0013): the chat subject a message came on
    must name the channel, account and chat its payload names; raise otherwise."""
    where = parse_chat_subject(subject)
    if where.kind != kind:
        raise InvalidSubjectError(f"subject {shown(subject, 80)} is not an {kind} subject")
    said = (channel, account, chat)
    if (where.channel, where.account, where.chat) != said:
        raise InvalidSubjectError(
            f"subject and payload disagree: the subject names {where.channel}/{where.account}/"
            f"{shown(where.chat)}, the payload {shown(channel)}/{shown(account)}/{shown(chat)}"
        )
    return where
