"""The neonize mapping: whatsmeow's events (neonize's protobufs) to the channel port's
types, and a job's text to the message neonize sends. Pure: no client, no I/O.

What is dropped, and why (docs/runbook.md, "Real WhatsApp (neonize): what is mapped";
ADR 0020): status updates, broadcast and newsletter copies, reactions, protocol messages
(revokes, edits, key shares, history-sync notices) and messages with no text. An edit is
not a new message to answer: it changes one the agent has already seen.

neonize's protobufs are proto2: a value neonize does not map is sent unset and reads back
as the enum's first value, so every enum is read through `HasField` first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from neonize.proto import Neonize_pb2 as nz
from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as wa

from services.channel.port import (
    ClientOutdated,
    Connected,
    Disconnected,
    Incoming,
    LoggedOut,
    Outgoing,
    Receipt,
    SessionEvent,
    StreamReplaced,
    TemporaryBan,
)
from services.whatsapp import jids

STATUS_BROADCAST = "status@broadcast"
BROADCAST_SERVER = "broadcast"  # status updates and a broadcast list's own copies
NEWSLETTER_SERVER = "newsletter"  # WhatsApp channels: nobody to answer

# Wrappers whose `.message` is the real message (whatsmeow unwraps these before neonize
# sees them; a wrapped message is still read right if one slips through).
_WRAPPERS = (
    "ephemeralMessage",
    "viewOnceMessage",
    "viewOnceMessageV2",
    "viewOnceMessageV2Extension",
    "documentWithCaptionMessage",
    "deviceSentMessage",
)
# Messages that carry text, and where: (field, text attribute). The order is the order a
# message is read in; one message has one of them.
_TEXT_FIELDS = (
    ("extendedTextMessage", "text"),
    ("imageMessage", "caption"),
    ("videoMessage", "caption"),
    ("documentMessage", "caption"),
)

_RECEIPTS = {
    nz.Receipt.DELIVERED: "delivered",
    nz.Receipt.READ: "read",
    nz.Receipt.PLAYED: "played",
}


def jid(proto: nz.JID, *, device: bool = False) -> str:
    """A JID protobuf as whatsmeow writes it (`user@server`, `user:device@server`,
    `user.agent:device@server`), '' for an empty one. Without `device`, the person or
    chat (whatsmeow's ToNonAD): one person's phones and computers are one sender."""
    if proto.IsEmpty or not (proto.User or proto.Server):
        return ""
    if not proto.User:
        return str(proto.Server)
    if device and proto.RawAgent:
        return f"{proto.User}.{proto.RawAgent}:{proto.Device}@{proto.Server}"
    if device and proto.Device:
        return f"{proto.User}:{proto.Device}@{proto.Server}"
    return f"{proto.User}@{proto.Server}"


@dataclass(frozen=True)
class Dropped:
    """A message event that is not a user's message to answer, and why (for the log)."""

    reason: str


def message(account_jids: tuple[str, ...], ev: nz.Message) -> Incoming | Dropped:
    """Map a neonize Message event; `account_jids` are the account's own JIDs (its phone
    JID and its LID), by which a mention names the account."""
    info = ev.Info
    source = info.MessageSource
    chat = jid(source.Chat)
    if chat == STATUS_BROADCAST:
        return Dropped("status update (status@broadcast)")
    if jids.server(chat) in (BROADCAST_SERVER, NEWSLETTER_SERVER):
        return Dropped(f"{jids.server(chat)} message")
    body = _unwrap(ev.Message)
    if body.HasField("reactionMessage") or body.HasField("encReactionMessage"):
        return Dropped("reaction")
    if ev.IsEdit or info.Edit or body.HasField("editedMessage"):
        # An edit changes a message already seen (and answered); revokes, pins and admin
        # edits share whatsmeow's edit attribute.
        return Dropped(f"edit (edit attribute {info.Edit or 'unset'!r})")
    if body.HasField("protocolMessage"):
        kind = (
            wa.ProtocolMessage.Type.Name(body.protocolMessage.type)
            if body.protocolMessage.HasField("type")
            else "unset"
        )
        return Dropped(f"protocol message ({kind})")
    text, context = _text(body)
    if not text.strip():
        kinds = [field.name for field, _ in body.ListFields()]
        return Dropped(f"no text ({', '.join(kinds) or 'empty message'})")
    sender, sender_alt = jid(source.Sender), jid(source.SenderAlt)
    if source.IsFromMe and not source.IsGroup:
        # Our own message in a direct chat addressed by the other person's LID: their
        # phone JID is the recipient's other id, so the chat key is the same as theirs.
        alt = jid(source.RecipientAlt)
        if jids.server(chat) == jids.LID_SERVER and jids.server(alt) == jids.USER_SERVER:
            chat = alt
    who = jids.normalise(chat, sender, sender_alt)
    mentions = tuple(context.mentionedJID) if context is not None else ()
    return Incoming(
        chat=who.chat,
        sender=who.sender,
        sender_alt=who.sender_alt,
        text=text,
        message_id=info.ID,
        from_me=source.IsFromMe,
        is_group=source.IsGroup or jids.is_group(who.chat),
        sender_name=info.Pushname,
        mentions=mentions,
        mentioned=jids.mentions_account(mentions, account_jids),
        quoted_id=context.stanzaID if context is not None else "",
    )


def incoming(account_jids: tuple[str, ...], ev: nz.Message) -> Incoming | None:
    """The user's message in `ev`, or None when it is dropped (`message` says why)."""
    mapped = message(account_jids, ev)
    return mapped if isinstance(mapped, Incoming) else None


def _unwrap(body: wa.Message) -> wa.Message:
    for _ in range(4):  # wrappers nest at most a few deep
        for name in _WRAPPERS:
            if body.HasField(name) and getattr(body, name).HasField("message"):
                body = getattr(body, name).message
                break
        else:
            return body
    return body


def _text(body: wa.Message) -> tuple[str, wa.ContextInfo | None]:
    """The message's text and the contextInfo beside it (mentions, the quoted id)."""
    for field, attr in _TEXT_FIELDS:
        if body.HasField(field):
            sub: Any = getattr(body, field)
            context = sub.contextInfo if sub.HasField("contextInfo") else None
            return str(getattr(sub, attr)), context
    return body.conversation, None


def receipt(ev: nz.Receipt) -> Receipt | None:
    """Delivered / read / played receipts from others; None for the rest: our own other
    devices (`*_SELF`, from me), retries, server errors and types neonize sent unset."""
    if not ev.HasField("Type") or ev.MessageSource.IsFromMe:
        return None
    status = _RECEIPTS.get(ev.Type)
    if status is None or not ev.MessageIDs:
        return None
    source = ev.MessageSource
    who = jids.normalise(jid(source.Chat), jid(source.Sender), jid(source.SenderAlt))
    return Receipt(chat=who.chat, transport_message_ids=tuple(ev.MessageIDs), status=status)


def ban(ev: nz.TemporaryBan, now: datetime | None = None) -> TemporaryBan:
    """A temporary ban: its code in the reason; `Expire` is a duration in seconds."""
    code = (
        nz.TemporaryBan.TempBanReason.Name(ev.Code).lower().replace("_", " ")
        if ev.HasField("Code")
        else "reason not given"
    )
    expire = ev.Expire if ev.HasField("Expire") else 0
    start = now if now is not None else datetime.now(UTC)
    until = start + timedelta(seconds=expire) if expire > 0 else None
    return TemporaryBan(reason=f"{code}, for {expire} s" if expire > 0 else code, until=until)


def logged_out(ev: nz.LoggedOut) -> LoggedOut:
    """The device was unlinked (whatsmeow deleted it from the store): pair again."""
    why = (
        nz.ConnectFailureReason.Name(ev.Reason).lower().replace("_", " ")
        if ev.HasField("Reason")
        else "reason not given"
    )
    when = " while connecting" if ev.OnConnect else ""
    return LoggedOut(reason=f"logged out{when} ({why}): pair the account again")


def session_event(
    account_jids: tuple[str, ...], ev: Any, now: datetime | None = None
) -> SessionEvent | Dropped:
    """Any neonize event as a session event, or Dropped (with why) for one the channel
    layer does not need (presence, history sync, calls, ...)."""
    match ev:
        case nz.Message():
            return message(account_jids, ev)
        case nz.Receipt():
            return receipt(ev) or Dropped("receipt not from others or not delivered/read/played")
        case nz.Connected():
            return Connected()
        case nz.Disconnected():
            return Disconnected(reason="disconnected")
        case nz.ConnectFailure():
            # The ends (logged out, banned, outdated) come as their own events; the rest
            # of the connect failures whatsmeow retries by itself.
            why = (
                nz.ConnectFailureReason.Name(ev.Reason).lower()
                if ev.HasField("Reason")
                else "unknown"
            )
            return Disconnected(reason=f"connect failure ({why}) {ev.Message}".strip())
        case nz.KeepAliveTimeout():
            return Disconnected(reason=f"keepalive timeout ({ev.ErrorCount} missed)")
        case nz.StreamReplaced():
            return StreamReplaced()
        case nz.LoggedOut():
            return logged_out(ev)
        case nz.TemporaryBan():
            return ban(ev, now)
        case nz.ClientOutdated():
            return ClientOutdated()
        case _:
            return Dropped(f"{type(ev).__name__} event (not mapped)")


def outgoing_message(out: Outgoing) -> wa.Message:
    """The message to send for a job: plain `conversation` text, or an extended text
    quoting `out.reply_to`. Never the `str` path of neonize's send_message, which parses
    `@digits` into mentions and looks up every `…@g.us` it finds on the network."""
    quote = out.reply_to
    if quote is None:
        return wa.Message(conversation=out.text)
    context = wa.ContextInfo(
        stanzaID=quote.message_id, quotedMessage=wa.Message(conversation=quote.text)
    )
    if quote.sender:
        context.participant = quote.sender
    reply = wa.ExtendedTextMessage(text=out.text, contextInfo=context)
    return wa.Message(extendedTextMessage=reply)


SendErrorKind = Literal["transient", "permanent", "unknown", "account", "offline"]

# Go error strings of a failed send (SendMessageError's text), matched as lower-case
# substrings, most specific first. "unknown": the message may have gone out (whatsmeow
# gave up waiting for the server's ack), so the egress records DeliveryUncertain rather
# than retrying blindly. "account": the account itself may not send (not this chat).
_SEND_ERRORS: tuple[tuple[str, SendErrorKind], ...] = (
    ("timed out waiting for message send response", "unknown"),
    ("server returned error 463", "account"),  # barred from messaging new contacts
    ("server returned error 479", "permanent"),
    ("can't send message to unknown server", "permanent"),
    ("no lid found for", "permanent"),
    ("websocket not connected", "offline"),  # nothing left: whatsmeow reconnects
    ("info query timed out", "transient"),
    ("failed to send usync query", "transient"),
    ("client is nil", "offline"),  # stopped, or not connected yet
)


def classify_send_error(text: str) -> SendErrorKind:
    """What a send error means for the job. An unknown string is transient: retries are
    bounded (the egress dead-letters after its last attempt), so a wrong "transient"
    costs a few attempts, while a wrong "permanent" dead-letters a message a retry would
    have sent, and a wrong "unknown" would report a send that never happened."""
    lowered = text.lower()
    for needle, kind in _SEND_ERRORS:
        if needle in lowered:
            return kind
    return "transient"


BOT_TAG_ENV = "NEONIZE_BOT_TAG"


def bot_tag(setting: str) -> dict[str, str]:
    """The environment neonize's Go side reads for the bot label (`NEONIZE_BOT_TAG`,
    read on every 1:1 send: `off` never adds it, anything else adds it): `on` or `off`,
    explicit, so no inherited value decides it. ValueError (one line) for other values."""
    value = setting.strip().lower()
    if value in ("on", "true", "1", "yes"):
        return {BOT_TAG_ENV: "on"}
    if value in ("off", "false", "0", "no"):
        return {BOT_TAG_ENV: "off"}
    raise ValueError(f"{BOT_TAG_ENV}={setting!r} is not valid: use 'on' or 'off'")
