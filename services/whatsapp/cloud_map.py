"""The WhatsApp Cloud API mapping (ADR 0026): webhook verification, webhook bodies to the
channel port's types, a job to the Graph API send body, and Graph error codes to what the
egress does. Pure: no HTTP, no NATS, no clock.

Facts are in ../shared/WHATSAPP.md ("WhatsApp Cloud API"). What is dropped, and why:
reactions, unsupported and system messages, and messages with no text (a sticker, a
caption-less image). Statuses are not dropped: `sent` / `delivered` / `read` become
receipts and `failed` carries its Graph error; `biz_opaque_callback_data` is our job id.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from services.channel.port import Incoming, Outgoing, Receipt
from services.runtime.errors import ServiceError
from services.whatsapp import jids

SIGNATURE_PREFIX = "sha256="
OPAQUE_LIMIT = 512  # biz_opaque_callback_data's documented maximum

# --- webhook verification ------------------------------------------------------------


def verify_handshake(
    mode: str | None, token: str | None, challenge: str | None, expected_token: str
) -> str | None:
    """The GET handshake: the raw `hub.challenge` to answer 200 with, or None (403)."""
    if mode != "subscribe" or token is None or challenge is None or not expected_token:
        return None
    if not hmac.compare_digest(token.encode(), expected_token.encode()):
        return None
    return challenge


def signature(app_secret: bytes, raw_body: bytes) -> str:
    """The `X-Hub-Signature-256` header Meta sends for `raw_body` (used by test clients)."""
    return SIGNATURE_PREFIX + hmac.new(app_secret, raw_body, hashlib.sha256).hexdigest()


def signature_ok(app_secret: bytes, raw_body: bytes, header: str | None) -> bool:
    """Whether `header` is `sha256=<hex HMAC-SHA256(app_secret, raw_body)>`; constant time,
    hex case ignored; False when missing or malformed (and with no app secret)."""
    if not header or not app_secret:
        return False
    prefix, sep, given = header.strip().partition("=")
    if not sep or prefix.lower() != "sha256" or len(given) != 64:
        return False
    try:
        given_bytes = bytes.fromhex(given)
    except ValueError:
        return False
    return hmac.compare_digest(given_bytes, hmac.new(app_secret, raw_body, hashlib.sha256).digest())


# --- webhook bodies ------------------------------------------------------------------


class _Metadata(msgspec.Struct, kw_only=True):
    phone_number_id: str = ""
    display_phone_number: str = ""


class _Profile(msgspec.Struct, kw_only=True):
    name: str = ""


class _Contact(msgspec.Struct, kw_only=True):
    wa_id: str = ""
    profile: _Profile = msgspec.field(default_factory=_Profile)


class _Text(msgspec.Struct, kw_only=True):
    body: str = ""


class _Media(msgspec.Struct, kw_only=True):
    caption: str = ""


class _Context(msgspec.Struct, kw_only=True):
    id: str = ""
    from_: str = msgspec.field(default="", name="from")


class _Message(msgspec.Struct, kw_only=True):
    id: str
    from_: str = msgspec.field(name="from")
    type: str = ""
    timestamp: str = ""
    group_id: str = ""
    text: _Text | None = None
    image: _Media | None = None
    video: _Media | None = None
    document: _Media | None = None
    context: _Context | None = None


class _Error(msgspec.Struct, kw_only=True):
    code: int | None = None
    title: str = ""
    message: str = ""


class _Status(msgspec.Struct, kw_only=True):
    id: str
    status: str
    recipient_id: str = ""
    timestamp: str = ""
    biz_opaque_callback_data: str = ""
    errors: list[_Error] = []


class _Value(msgspec.Struct, kw_only=True):
    messaging_product: str = ""
    metadata: _Metadata = msgspec.field(default_factory=_Metadata)
    contacts: list[_Contact] = []
    messages: list[_Message] = []
    statuses: list[_Status] = []


class _Change(msgspec.Struct, kw_only=True):
    field: str = ""
    value: _Value = msgspec.field(default_factory=_Value)


class _Entry(msgspec.Struct, kw_only=True):
    id: str = ""
    changes: list[_Change] = []


class _Body(msgspec.Struct, kw_only=True):
    object: str = ""
    entry: list[_Entry] = []


_DECODER = msgspec.json.Decoder(_Body)


@dataclass(frozen=True)
class Dropped:
    """A webhook message or status that is not ours to act on, and why (for the log)."""

    reason: str


StatusName = Literal["sent", "delivered", "read", "failed"]
_STATUSES: tuple[str, ...] = ("sent", "delivered", "read", "failed")


class WebhookError(ServiceError):
    """A webhook body that cannot be used: one line saying what was wrong."""


@dataclass(frozen=True)
class StatusReport:
    """A status webhook for a message we sent: `message_id` is the wamid the send returned,
    `job_id` our job (from `biz_opaque_callback_data`: resolves an uncertain send), and for
    `failed` the Graph error's code and title."""

    chat: str
    message_id: str
    status: StatusName
    job_id: str = ""
    error_code: int | None = None
    error_title: str = ""

    def receipt(self) -> Receipt | None:
        """The port receipt for sent / delivered / read; None for failed."""
        if self.status == "failed":
            return None
        return Receipt(chat=self.chat, transport_message_ids=(self.message_id,), status=self.status)


WebhookEvent = Incoming | Dropped | StatusReport


def user_jid(wa_id: str) -> str:
    """A Cloud API phone (`wa_id`, digits) as the JID the channel layer keys chats by."""
    return f"{wa_id}@{jids.USER_SERVER}"


def parse_webhook(raw_body: bytes, *, phone_number_id: str) -> list[WebhookEvent]:
    """Map one webhook POST body, all of it addressed to `phone_number_id`, to port events
    in the order they appear (see `route_webhook`; WebhookError for anything else)."""
    return [event for _, event in route_webhook(raw_body, {phone_number_id: phone_number_id})]


def route_webhook(raw_body: bytes, numbers: Mapping[str, str]) -> list[tuple[str, WebhookEvent]]:
    """Map one webhook POST body to (account, event) pairs in the order they appear, each
    item routed by its `metadata.phone_number_id` through `numbers` (phone number id ->
    account): one Meta app has one callback URL for all its numbers.

    Raises WebhookError (one line) for a body that is not the Graph webhook shape, or with
    an item for a phone number id none of `numbers` has."""
    try:
        body = _DECODER.decode(raw_body)
    except msgspec.ValidationError as exc:
        raise WebhookError(f"webhook body does not have the Graph API shape: {exc}") from None
    except msgspec.DecodeError as exc:
        raise WebhookError(f"webhook body is not JSON: {exc}") from None
    if body.object and body.object != "whatsapp_business_account":
        raise WebhookError(
            f"webhook object {body.object!r} is not whatsapp_business_account:"
            " subscribe the app to the WhatsApp Business Account's messages field"
        )
    routed: list[tuple[str, WebhookEvent]] = []
    for entry in body.entry:
        for change in entry.changes:
            value = change.value
            if not (value.messages or value.statuses):
                continue
            got = value.metadata.phone_number_id
            account = numbers.get(got)
            if account is None:
                known = ", ".join(repr(n) for n in sorted(numbers)) or "none"
                raise WebhookError(
                    f"webhook is for phone number id {got!r}, which no account here has"
                    f" (configured: {known}): check the accounts' phone_number_id"
                )
            names = {c.wa_id: c.profile.name for c in value.contacts}
            routed.extend((account, message(m, names.get(m.from_, ""))) for m in value.messages)
            routed.extend((account, status(s)) for s in value.statuses)
    return routed


def message(msg: _Message, sender_name: str = "") -> Incoming | Dropped:
    """Map one webhook message (see the module doc for what is dropped)."""
    if msg.type in ("reaction", "unsupported", "system", "ephemeral", "request_welcome"):
        return Dropped(f"{msg.type} message")
    text = _text(msg)
    if not text.strip():
        return Dropped(f"no text ({msg.type or 'untyped'} message)")
    sender = user_jid(msg.from_)
    group = f"{msg.group_id}@{jids.GROUP_SERVER}" if msg.group_id else ""
    return Incoming(
        chat=group or sender,
        sender=sender,
        text=text,
        message_id=msg.id,
        is_group=bool(group),
        sender_name=sender_name,
        quoted_id=msg.context.id if msg.context else "",
    )


def _text(msg: _Message) -> str:
    if msg.text is not None:
        return msg.text.body
    for media in (msg.image, msg.video, msg.document):
        if media is not None:
            return media.caption
    return ""


def status(st: _Status) -> StatusReport | Dropped:
    """Map one status webhook; an unknown status is dropped with its name."""
    if st.status not in _STATUSES:
        return Dropped(f"status {st.status!r}")
    error = st.errors[0] if st.errors else None
    return StatusReport(
        chat=user_jid(st.recipient_id) if st.recipient_id else "",
        message_id=st.id,
        status=st.status,  # type: ignore[arg-type]  # checked against _STATUSES
        job_id=st.biz_opaque_callback_data,
        error_code=error.code if error else None,
        error_title=(error.title or error.message) if error else "",
    )


# --- outgoing ------------------------------------------------------------------------


def recipient(chat: str) -> str:
    """The Graph API `to` for a chat JID: the digits of its user part."""
    digits = "".join(ch for ch in jids.user(chat) if ch.isdigit())
    if not digits:
        raise ValueError(f"chat {chat!r} has no phone number to send to")
    return digits


def _opaque(job_id: str) -> str:
    if len(job_id) > OPAQUE_LIMIT:
        raise ValueError(f"job id is {len(job_id)} chars: biz_opaque_callback_data allows 512")
    return job_id


def send_body(out: Outgoing, *, job_id: str) -> dict[str, Any]:
    """The POST /{phone_number_id}/messages body for a text job (a quoted reply carries
    `context.message_id`; `biz_opaque_callback_data` is the job id)."""
    body: dict[str, Any] = {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": recipient(out.chat),
        "type": "text",
        "text": {"body": out.text},
        "biz_opaque_callback_data": _opaque(job_id),
    }
    if out.reply_to is not None and out.reply_to.message_id:
        body["context"] = {"message_id": out.reply_to.message_id}
    return body


def template_body(
    chat: str, *, template: str, language: str = "en_US", job_id: str
) -> dict[str, Any]:
    """The body of a template send: the fallback for 131047 (outside the 24-hour window)."""
    return {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": recipient(chat),
        "type": "template",
        "template": {"name": template, "language": {"code": language}},
        "biz_opaque_callback_data": _opaque(job_id),
    }


# --- errors --------------------------------------------------------------------------

ErrorClass = Literal["transient", "permanent", "account", "window", "unknown"]

WINDOW_CODES = frozenset({131047})
# 4: app call rate, 2: service temporarily unavailable, 131000: Graph's "something went wrong".
TRANSIENT_CODES = frozenset({130429, 131056, 80007, 4, 2, 131000})
# 10 / 200 / 131005: the token lacks the permission (an operator must fix the app).
ACCOUNT_CODES = frozenset({190, 368, 131031, 10, 200, 131005})


def classify_cloud_error(status: int, code: int | None) -> ErrorClass:
    """What the egress does with a Graph API error (HTTP `status`, `error.code`):
    window -> template or permanent; transient -> back off and retry in place; account ->
    park the account; permanent -> fail the job; unknown -> treat as uncertain (a timeout
    never reaches here: it is the caller's)."""
    if code in WINDOW_CODES:
        return "window"
    if code in TRANSIENT_CODES or status == 429 or status >= 500:
        return "transient"
    if code in ACCOUNT_CODES or status == 401:
        return "account"
    if code is not None and (131000 <= code <= 131999 or 132000 <= code <= 132999):
        return "permanent"
    if code == 100 or (400 <= status < 500 and code is not None):
        return "permanent"
    return "unknown"
