"""The Cloud API mapping (issue 15, first slice; ADR 0026): webhook verification, webhook
bodies (shaped as Meta's Graph API sends them) to port events, send bodies, error classes."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.channel.port import Fence, Incoming, Outgoing, Quote, Receipt
from services.whatsapp.cloud_map import (
    Dropped,
    StatusReport,
    WebhookError,
    classify_cloud_error,
    parse_webhook,
    send_body,
    signature,
    signature_ok,
    template_body,
    verify_handshake,
)

PHONE_ID = "106540352242922"
SECRET = b"app-secret-123"
USER = "16315551181"
WAMID_IN = "wamid.HBgLMTYzMTU1NTExODEVAgASGBQzQTdCNTg5RjY1MEMyRjlGMjRGNgA="
WAMID_OUT = "wamid.HBgLMTYzMTU1NTExODEVAgARGBI5QTNDQTVCM0Q0Q0Q2RTY3RTcA"


def webhook(value: dict[str, Any], phone_id: str = PHONE_ID) -> bytes:
    """A POST body as Meta sends it: one entry, one `messages` change."""
    full = {
        "messaging_product": "whatsapp",
        "metadata": {"display_phone_number": "15550783881", "phone_number_id": phone_id},
        **value,
    }
    return json.dumps(
        {
            "object": "whatsapp_business_account",
            "entry": [{"id": "102290129340398", "changes": [{"value": full, "field": "messages"}]}],
        }
    ).encode()


def inbound(message: dict[str, Any], name: str = "Kerry Fisher") -> bytes:
    base = {"from": USER, "id": WAMID_IN, "timestamp": "1706698882"}
    return webhook(
        {
            "contacts": [{"profile": {"name": name}, "wa_id": USER}],
            "messages": [{**base, **message}],
        }
    )


def status(state: str, **extra: Any) -> bytes:
    st = {
        "id": WAMID_OUT,
        "status": state,
        "timestamp": "1706698890",
        "recipient_id": USER,
        "biz_opaque_callback_data": "job-42",
        **extra,
    }
    if state != "failed":
        st["conversation"] = {"id": "c1", "origin": {"type": "service"}}
        st["pricing"] = {"billable": True, "pricing_model": "CBP", "category": "service"}
    return webhook({"statuses": [st]})


def only(raw: bytes) -> Incoming | Dropped | StatusReport:
    events = parse_webhook(raw, phone_number_id=PHONE_ID)
    assert len(events) == 1
    return events[0]


# --- verification --------------------------------------------------------------------


def test_the_handshake_answers_the_raw_challenge_only_for_the_right_token() -> None:
    assert verify_handshake("subscribe", "vt", "1158201444", "vt") == "1158201444"
    assert verify_handshake("subscribe", "wrong", "1158201444", "vt") is None
    assert verify_handshake("unsubscribe", "vt", "1158201444", "vt") is None
    assert verify_handshake(None, None, None, "vt") is None
    assert verify_handshake("subscribe", "vt", None, "vt") is None
    # No verify token configured: nothing verifies (an empty token must not match "").
    assert verify_handshake("subscribe", "", "c", "") is None


def test_a_signature_over_the_raw_body_is_accepted_in_either_hex_case() -> None:
    body = inbound({"type": "text", "text": {"body": "hi"}})
    header = signature(SECRET, body)
    assert header.startswith("sha256=")
    assert len(header) == 7 + 64
    assert signature_ok(SECRET, body, header)
    assert signature_ok(SECRET, body, "sha256=" + header[7:].upper())
    assert signature_ok(SECRET, body, "SHA256=" + header[7:])


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "sha256=",
        "sha1=" + "0" * 64,
        "sha256=" + "zz" * 32,
        "sha256=" + "00" * 31,
        "deadbeef",
        "sha256=" + "0" * 64,
    ],
)
def test_a_missing_malformed_or_wrong_signature_is_refused(header: str | None) -> None:
    assert not signature_ok(SECRET, b'{"object":"whatsapp_business_account"}', header)


def test_a_signature_made_with_another_secret_or_another_body_is_refused() -> None:
    body = inbound({"type": "text", "text": {"body": "hi"}})
    assert not signature_ok(SECRET, body, signature(b"other-secret", body))
    assert not signature_ok(SECRET, body + b" ", signature(SECRET, body))
    assert not signature_ok(b"", body, signature(b"", body))


# --- inbound messages ------------------------------------------------------------------


def test_a_text_message_becomes_incoming_with_the_sender_name_and_wamid() -> None:
    event = only(inbound({"type": "text", "text": {"body": "Hello there"}}))
    assert event == Incoming(
        chat=f"{USER}@s.whatsapp.net",
        sender=f"{USER}@s.whatsapp.net",
        text="Hello there",
        message_id=WAMID_IN,
        sender_name="Kerry Fisher",
    )


@pytest.mark.parametrize("kind", ["image", "video", "document"])
def test_a_media_caption_is_the_text(kind: str) -> None:
    media = {"caption": "look at this", "mime_type": "image/jpeg", "sha256": "x", "id": "m1"}
    event = only(inbound({"type": kind, kind: media}))
    assert isinstance(event, Incoming)
    assert event.text == "look at this"


def test_a_reply_carries_the_quoted_wamid() -> None:
    event = only(
        inbound(
            {
                "type": "text",
                "text": {"body": "yes, that one"},
                "context": {"from": "15550783881", "id": WAMID_OUT},
            }
        )
    )
    assert isinstance(event, Incoming)
    assert event.quoted_id == WAMID_OUT


def test_a_group_message_is_keyed_by_the_group() -> None:
    event = only(inbound({"type": "text", "text": {"body": "hi all"}, "group_id": "1203630"}))
    assert isinstance(event, Incoming)
    assert (event.chat, event.is_group, event.sender) == (
        "1203630@g.us",
        True,
        f"{USER}@s.whatsapp.net",
    )


@pytest.mark.parametrize(
    ("message", "reason"),
    [
        ({"type": "reaction", "reaction": {"message_id": WAMID_OUT, "emoji": "👍"}}, "reaction"),
        (
            {"type": "unsupported", "errors": [{"code": 131051, "title": "Unsupported"}]},
            "unsupported",
        ),
        (
            {"type": "system", "system": {"body": "changed number", "type": "user_changed_number"}},
            "system",
        ),
        ({"type": "image", "image": {"id": "m1", "mime_type": "image/jpeg"}}, "no text"),
        ({"type": "sticker", "sticker": {"id": "s1"}}, "no text"),
        ({"type": "text", "text": {"body": "   "}}, "no text"),
    ],
)
def test_what_is_not_a_message_to_answer_is_dropped_with_a_reason(
    message: dict[str, Any], reason: str
) -> None:
    event = only(inbound(message))
    assert isinstance(event, Dropped)
    assert reason in event.reason


def test_messages_and_statuses_keep_their_order_across_entries() -> None:
    one = json.loads(inbound({"type": "text", "text": {"body": "first"}}))
    two = json.loads(status("read"))
    one["entry"].append(two["entry"][0])
    events = parse_webhook(json.dumps(one).encode(), phone_number_id=PHONE_ID)
    assert [type(e) for e in events] == [Incoming, StatusReport]


# --- statuses ----------------------------------------------------------------------------


@pytest.mark.parametrize("state", ["sent", "delivered", "read"])
def test_a_status_is_a_receipt_linked_to_the_job(state: str) -> None:
    event = only(status(state))
    assert isinstance(event, StatusReport)
    assert (event.status, event.job_id, event.message_id) == (state, "job-42", WAMID_OUT)
    assert event.receipt() == Receipt(
        chat=f"{USER}@s.whatsapp.net", transport_message_ids=(WAMID_OUT,), status=state
    )


def test_a_failed_status_carries_the_graph_error() -> None:
    error = {
        "code": 131047,
        "title": "Re-engagement message",
        "message": "Re-engagement message",
        "error_data": {"details": "Message failed to send because more than 24 hours"},
    }
    event = only(status("failed", errors=[error]))
    assert isinstance(event, StatusReport)
    assert (event.error_code, event.error_title, event.job_id) == (
        131047,
        "Re-engagement message",
        "job-42",
    )
    assert event.receipt() is None


def test_a_status_without_callback_data_has_no_job() -> None:
    raw = json.loads(status("delivered"))
    del raw["entry"][0]["changes"][0]["value"]["statuses"][0]["biz_opaque_callback_data"]
    event = only(json.dumps(raw).encode())
    assert isinstance(event, StatusReport)
    assert event.job_id == ""


def test_an_unknown_status_is_dropped() -> None:
    event = only(status("deleted"))
    assert isinstance(event, Dropped)
    assert "deleted" in event.reason


# --- malformed bodies --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "needle"),
    [
        (b"not json", "not JSON"),
        (b'{"object": "whatsapp_business_account", "entry": {}}', "Graph API shape"),
        (b'{"object": "page", "entry": []}', "whatsapp_business_account"),
        (
            b'{"entry": [{"changes": [{"value": {"messages": [{"type": "text"}]}}]}]}',
            "Graph API shape",
        ),
        (b"[]", "Graph API shape"),
    ],
)
def test_a_malformed_body_is_one_clear_line(raw: bytes, needle: str) -> None:
    with pytest.raises(WebhookError) as caught:
        parse_webhook(raw, phone_number_id=PHONE_ID)
    assert needle in str(caught.value)
    assert "\n" not in str(caught.value)


def test_a_body_for_another_phone_number_is_refused() -> None:
    raw = webhook(
        {"messages": [{"from": USER, "id": WAMID_IN, "type": "text", "text": {"body": "x"}}]},
        phone_id="999",
    )
    with pytest.raises(WebhookError) as caught:
        parse_webhook(raw, phone_number_id=PHONE_ID)
    assert "'999'" in str(caught.value)
    assert PHONE_ID in str(caught.value)


def test_a_change_with_neither_messages_nor_statuses_is_nothing() -> None:
    assert parse_webhook(webhook({}), phone_number_id=PHONE_ID) == []


# --- outgoing ----------------------------------------------------------------------------

FENCE = Fence(holder="h", token=1)


def test_a_send_body_has_the_digits_the_text_and_the_job_id() -> None:
    out = Outgoing(chat=f"{USER}@s.whatsapp.net", text="Hi!", job_id="job-7", fence=FENCE)
    assert send_body(out, job_id="job-7") == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": USER,
        "type": "text",
        "text": {"body": "Hi!"},
        "biz_opaque_callback_data": "job-7",
    }


def test_a_quoted_reply_carries_the_context() -> None:
    out = Outgoing(
        chat=f"{USER}@s.whatsapp.net",
        text="answer",
        job_id="j",
        fence=FENCE,
        reply_to=Quote(message_id=WAMID_IN),
    )
    assert send_body(out, job_id="j")["context"] == {"message_id": WAMID_IN}


def test_a_job_id_over_512_chars_or_a_chat_without_digits_is_refused() -> None:
    out = Outgoing(chat=f"{USER}@s.whatsapp.net", text="x", job_id="j", fence=FENCE)
    with pytest.raises(ValueError, match="512"):
        send_body(out, job_id="j" * 513)
    assert send_body(out, job_id="j" * 512)["biz_opaque_callback_data"] == "j" * 512
    with pytest.raises(ValueError, match="no phone number"):
        send_body(Outgoing(chat="@s.whatsapp.net", text="x", job_id="j", fence=FENCE), job_id="j")


def test_the_template_body_for_the_window_fallback() -> None:
    body = template_body(f"{USER}@s.whatsapp.net", template="hello_world", job_id="job-9")
    assert body == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": USER,
        "type": "template",
        "template": {"name": "hello_world", "language": {"code": "en_US"}},
        "biz_opaque_callback_data": "job-9",
    }


# --- error classes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status_code", "code", "expected"),
    [
        (400, 131047, "window"),
        (400, 130429, "transient"),
        (400, 131056, "transient"),
        (400, 80007, "transient"),
        (429, None, "transient"),
        (500, None, "transient"),
        (503, 1, "transient"),
        (401, 190, "account"),
        (400, 368, "account"),
        (400, 131031, "account"),
        (400, 131026, "permanent"),
        (400, 131051, "permanent"),
        (400, 131008, "permanent"),
        (400, 100, "permanent"),
        (400, None, "unknown"),
        (200, None, "unknown"),
    ],
)
def test_graph_errors_are_classified_as_the_issue_table_says(
    status_code: int, code: int | None, expected: str
) -> None:
    assert classify_cloud_error(status_code, code) == expected
