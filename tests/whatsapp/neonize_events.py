"""One factory of real neonize events (`neonize.proto.Neonize_pb2`), as neonize's Go side
hands them to Python: every proto2 `required` field set, so each one survives
`SerializeToString()` (which refuses a missing required field) and parses back.

`unset(ev, field)` builds what neonize sends for a value it does not map: the field
left out (its bytes parse, and the field reads back as the enum's first value).
`serialized(ev)` is the bytes neonize's event entry point receives.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import Message as Proto
from neonize.proto import Neonize_pb2 as nz
from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as wa

P = TypeVar("P", bound=Proto)

ACCOUNT_PHONE = "15550000001@s.whatsapp.net"
ACCOUNT_LID = "900000000001@lid"
ACCOUNT_JIDS = (ACCOUNT_PHONE, ACCOUNT_LID)
ALICE = "15551110000@s.whatsapp.net"
ALICE_LID = "811110000@lid"
GROUP = "120363000000000001@g.us"


def jid(text: str = "") -> nz.JID:
    """A JID protobuf from whatsmeow's string form (`user[.agent][:device]@server`)."""
    if not text:
        return nz.JID(User="", RawAgent=0, Device=0, Integrator=0, Server="", IsEmpty=True)
    address, _, server = text.rpartition("@")
    if not address:
        address, server = "", text
    user, _, device = address.partition(":")
    user, _, agent = user.partition(".")
    return nz.JID(
        User=user,
        RawAgent=int(agent or 0),
        Device=int(device or 0),
        Integrator=0,
        Server=server,
        IsEmpty=False,
    )


def source(
    chat: str,
    sender: str,
    *,
    from_me: bool = False,
    is_group: bool | None = None,
    sender_alt: str = "",
    recipient_alt: str = "",
) -> nz.MessageSource:
    """Who a message or receipt is from, in which chat."""
    return nz.MessageSource(
        Chat=jid(chat),
        Sender=jid(sender),
        IsFromMe=from_me,
        IsGroup=chat.endswith("@g.us") if is_group is None else is_group,
        SenderAlt=jid(sender_alt),
        RecipientAlt=jid(recipient_alt),
        BroadcastListOwner=jid(),
    )


def text_body(text: str) -> wa.Message:
    """A plain text message body (`conversation`)."""
    return wa.Message(conversation=text)


def extended_body(
    text: str, *, mentions: tuple[str, ...] = (), quoted_id: str = "", participant: str = ""
) -> wa.Message:
    """An extended text body (what phones send for mentions and replies)."""
    context = wa.ContextInfo(mentionedJID=list(mentions))
    if quoted_id:
        context.stanzaID = quoted_id
        context.participant = participant
        context.quotedMessage.conversation = "the quoted text"
    return wa.Message(extendedTextMessage=wa.ExtendedTextMessage(text=text, contextInfo=context))


def message(
    body: wa.Message | None = None,
    *,
    chat: str = ALICE,
    sender: str = "",
    message_id: str = "3EB0AAAA0001",
    from_me: bool = False,
    sender_alt: str = "",
    recipient_alt: str = "",
    pushname: str = "Alice",
    edit: str = "",
    is_edit: bool = False,
) -> nz.Message:
    """A Message event (neonize's MessageEv). In a direct chat the sender is the chat."""
    info = nz.MessageInfo(
        MessageSource=source(
            chat,
            sender or chat,
            from_me=from_me,
            sender_alt=sender_alt,
            recipient_alt=recipient_alt,
        ),
        ID=message_id,
        ServerID=0,
        Type="text",
        Pushname=pushname,
        Timestamp=1_764_500_000_000,
        Category="",
        Multicast=False,
        MediaType="",
        Edit=edit,
    )
    ev = nz.Message(
        Info=info,
        IsEphemeral=False,
        IsViewOnce=False,
        IsViewOnceV2=False,
        IsViewOnceV2Extension=False,
        IsDocumentWithCaption=False,
        IsLottieSticker=False,
        IsEdit=is_edit,
        UnavailableRequestID="",
        RetryCount=0,
    )
    if body is not None:
        ev.Message.CopyFrom(body)
        ev.Raw.CopyFrom(body)
    return ev


def receipt(
    ids: tuple[str, ...] = ("3EB0SENT0001",),
    kind: int = nz.Receipt.DELIVERED,
    *,
    chat: str = ALICE,
    sender: str = "",
    from_me: bool = False,
    sender_alt: str = "",
) -> nz.Receipt:
    """A Receipt event for messages `ids` (the ids our sends returned)."""
    return nz.Receipt(
        MessageSource=source(chat, sender or chat, from_me=from_me, sender_alt=sender_alt),
        MessageIDs=list(ids),
        Timestamp=1_764_500_000,
        Type=kind,
    )


def temporary_ban(
    code: int = nz.TemporaryBan.SEND_TO_TOO_MANY_PEOPLE, expire: int = 3600
) -> nz.TemporaryBan:
    """A TemporaryBan event: `expire` is a duration in seconds."""
    return nz.TemporaryBan(Code=code, Expire=expire)


def logged_out(
    reason: int = nz.ConnectFailureReason.LOGGED_OUT, *, on_connect: bool = False
) -> nz.LoggedOut:
    """A LoggedOut event (whatsmeow has deleted the device)."""
    return nz.LoggedOut(OnConnect=on_connect, Reason=reason)


def connect_failure(
    reason: int = nz.ConnectFailureReason.SERVICE_UNAVAILABLE, text: str = "service unavailable"
) -> nz.ConnectFailure:
    """A ConnectFailure event (whatsmeow retries these)."""
    return nz.ConnectFailure(Reason=reason, Message=text, Raw=nz.Node(Tag="failure"))


def connected() -> nz.Connected:
    """A Connected event."""
    return nz.Connected(status=True)


def disconnected() -> nz.Disconnected:
    """A Disconnected event (whatsmeow reconnects by itself)."""
    return nz.Disconnected(status=True)


def keepalive_timeout(missed: int = 3) -> nz.KeepAliveTimeout:
    """A KeepAliveTimeout event."""
    return nz.KeepAliveTimeout(ErrorCount=missed, LastSuccess=1_764_500_000)


def keepalive_restored() -> nz.KeepAliveRestored:
    """whatsmeow's keepalive answered again (after a timeout)."""
    return nz.KeepAliveRestored()


def stream_replaced() -> nz.StreamReplaced:
    """A StreamReplaced event (another client took the session)."""
    return nz.StreamReplaced()


def client_outdated() -> nz.ClientOutdated:
    """A ClientOutdated event."""
    return nz.ClientOutdated()


def presence() -> nz.Presence:
    """An event the mapping has no use for."""
    return nz.Presence(From=jid(ALICE), Unavailable=False, LastSeen=0)


def serialized(ev: Proto) -> bytes:
    """The bytes neonize's event entry point gets (raises if a required field is missing)."""
    return ev.SerializeToString()


def roundtrip(ev: P) -> P:
    """`ev` serialized and parsed back, as Python receives it from the Go side."""
    back = type(ev)()
    back.ParseFromString(serialized(ev))
    return back


def unset(ev: P, *fields: str) -> P:
    """`ev` as neonize sends it when it does not map a value: `fields` left out."""
    partial = type(ev)()
    partial.CopyFrom(ev)
    for name in fields:
        partial.ClearField(name)
    back = type(ev)()
    back.ParseFromString(partial.SerializePartialToString())
    return back
