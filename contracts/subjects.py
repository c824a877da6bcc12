"""Subject builders for every stream, and the reversible chat-JID <-> token encoding.

A chat JID such as `123@s.whatsapp.net` contains `.`, which NATS treats as a token
separator, so chats travel as one escaped token: bytes outside the safe set are written
`~XX` (upper-case hex of their UTF-8 bytes), e.g. `123@s~2Ewhatsapp~2Enet`.
"""

from __future__ import annotations

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

Kind = Literal["inbound", "agent", "outbound", "delivery"]


def encode_chat(jid: str) -> str:
    """Encode a chat JID as one subject token (reversible, deterministic)."""
    if not jid:
        raise InvalidSubjectError("chat JID is empty: pass the chat's JID, e.g. 123@s.whatsapp.net")
    out: list[str] = []
    for ch in jid:
        if ch in _SAFE:
            out.append(ch)
        else:
            out.extend(f"{_ESCAPE}{b:02X}" for b in ch.encode("utf-8", "surrogatepass"))
    return "".join(out)


def decode_chat(token: str) -> str:
    """Invert `encode_chat`; raise InvalidSubjectError for a token it could not produce."""
    if not _TOKEN_RE.fullmatch(token):
        raise InvalidSubjectError(f"chat token {token!r} is not an encoded chat JID")
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
        jid = raw.decode("utf-8", "surrogatepass")
    except UnicodeDecodeError:
        raise InvalidSubjectError(f"chat token {token!r} is not valid UTF-8") from None
    if encode_chat(jid) != token:  # only the canonical form is accepted (e.g. no escaped 'a')
        raise InvalidSubjectError(f"chat token {token!r} is not in canonical form")
    return jid


def check_account(account: str) -> str:
    """Return `account` if it matches the account grammar, else raise."""
    if not _ACCOUNT_RE.fullmatch(account):
        raise InvalidSubjectError(f"account {account!r} is invalid: use 1-64 of A-Z a-z 0-9 _ -")
    return account


def check_channel(channel: str) -> str:
    """Return `channel` if it is a known channel, else raise."""
    if channel not in CHANNELS:
        raise InvalidSubjectError(
            f"channel {channel!r} is unknown: expected one of {', '.join(sorted(CHANNELS))}"
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


def outbound_filter(channel: str, account: str) -> str:
    """Every outbound job of one account."""
    return f"outbound.{check_channel(channel)}.{check_account(account)}.*"


def accounts(channel: str, account: str) -> str:
    """`accounts.<channel>.<account>` (leases and session events)."""
    return f"accounts.{check_channel(channel)}.{check_account(account)}"


def deadletter(source_subject: str) -> str:
    """`deadletter.<original subject>`: dead letters keep where they came from."""
    return f"deadletter.{source_subject}"


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


_JOB_ID_RE = re.compile(r"[A-Za-z0-9_-]{1,128}")


def send_key(account: str, job_id: str) -> str:
    """Key of a job's SendRecord in the `sends` bucket."""
    if not _JOB_ID_RE.fullmatch(job_id):
        raise InvalidSubjectError(f"job id {job_id!r} is invalid: use 1-128 of A-Z a-z 0-9 _ -")
    return f"{check_account(account)}.{job_id}"


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
            f"subject {subject!r} is not"
            " <inbound|agent|outbound|delivery>.<channel>.<account>.<chat>"
        )
    kind, channel, account, token = parts
    return ChatSubject(kind, check_channel(channel), check_account(account), decode_chat(token))
