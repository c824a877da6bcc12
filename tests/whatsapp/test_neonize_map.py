"""The neonize mapping over real neonize protobuf events (issue 13, items 5 and 6):
inbound messages, what is dropped, receipts, session signals, outgoing message shapes and
send error classes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from neonize.proto import Neonize_pb2 as nz
from neonize.proto.waE2E import WAWebProtobufsE2E_pb2 as wa

from contracts import subjects
from contracts.events import CHANNEL_WHATSAPP, MessageReceived
from services.channel.ingress import Ingress
from services.channel.port import (
    ClientOutdated,
    Connected,
    Disconnected,
    Fence,
    Incoming,
    LoggedOut,
    Outgoing,
    Quote,
    Receipt,
    SessionEnd,
    StreamReplaced,
    TemporaryBan,
    end_of,
)
from services.runtime.bus import Bus
from services.whatsapp import neonize_map
from services.whatsapp.neonize_map import Dropped
from tests.conftest import REPO, read_stream
from tests.whatsapp import neonize_events as ev
from tests.whatsapp.neonize_events import ACCOUNT_JIDS, ACCOUNT_LID, ALICE, ALICE_LID, GROUP


def mapped(event: nz.Message) -> Incoming:
    """The Incoming a message maps to (after the trip through bytes neonize makes)."""
    result = neonize_map.message(ACCOUNT_JIDS, ev.roundtrip(event))
    assert isinstance(result, Incoming), result
    return result


def dropped(event: nz.Message) -> str:
    """Why a message is dropped (fails if it is not)."""
    result = neonize_map.message(ACCOUNT_JIDS, ev.roundtrip(event))
    assert isinstance(result, Dropped), result
    assert neonize_map.incoming(ACCOUNT_JIDS, event) is None
    return result.reason


# -- the factory ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "event",
    [
        ev.message(ev.text_body("hi")),
        ev.message(ev.extended_body("hi", mentions=(ALICE,), quoted_id="Q1"), chat=GROUP),
        ev.message(),
        ev.receipt(),
        ev.temporary_ban(),
        ev.logged_out(),
        ev.connect_failure(),
        ev.connected(),
        ev.disconnected(),
        ev.keepalive_timeout(),
        ev.stream_replaced(),
        ev.client_outdated(),
        ev.presence(),
    ],
    ids=lambda e: type(e).__name__,
)
def test_every_factory_event_has_its_required_fields_and_survives_the_trip_through_bytes(
    event: nz.Message,
) -> None:
    assert event.IsInitialized(), event.FindInitializationErrors()
    back = ev.roundtrip(event)  # SerializeToString refuses a missing required field
    assert back == event


def test_an_unset_enum_reads_back_as_its_first_value_which_is_why_the_mapping_checks_hasfield() -> (
    None
):
    # what neonize sends for a receipt type it does not map (e.g. server-error)
    sent = ev.unset(ev.receipt(kind=nz.Receipt.READ), "Type")
    assert not sent.HasField("Type")
    assert sent.Type == nz.Receipt.DELIVERED


def test_a_jid_protobuf_is_written_as_whatsmeow_writes_it() -> None:
    assert neonize_map.jid(ev.jid("15551110000@s.whatsapp.net")) == "15551110000@s.whatsapp.net"
    # a device (a person's second phone or computer) is the same person...
    assert neonize_map.jid(ev.jid("15551110000:7@s.whatsapp.net")) == ALICE
    assert neonize_map.jid(ev.jid("811110000.1:3@lid")) == ALICE_LID
    # ... unless the device is asked for
    assert neonize_map.jid(ev.jid("15551110000:7@s.whatsapp.net"), device=True) == (
        "15551110000:7@s.whatsapp.net"
    )
    assert neonize_map.jid(ev.jid("811110000.1:3@lid"), device=True) == "811110000.1:3@lid"
    assert neonize_map.jid(ev.jid("status@broadcast")) == "status@broadcast"
    assert neonize_map.jid(ev.jid("s.whatsapp.net")) == "s.whatsapp.net"
    assert neonize_map.jid(ev.jid("")) == ""


# -- inbound messages ------------------------------------------------------------------


def test_a_plain_text_message_in_a_direct_chat_maps_to_incoming() -> None:
    got = mapped(ev.message(ev.text_body("hello"), message_id="M1", pushname="Alice"))
    assert got == Incoming(
        chat=ALICE, sender=ALICE, text="hello", message_id="M1", sender_name="Alice"
    )


def test_extended_text_and_media_captions_are_the_message_text() -> None:
    assert mapped(ev.message(ev.extended_body("long text"))).text == "long text"
    for field in ("imageMessage", "videoMessage", "documentMessage"):
        body = wa.Message()
        getattr(body, field).caption = f"a {field} caption"
        assert mapped(ev.message(body)).text == f"a {field} caption"


def test_a_caption_inside_a_wrapper_is_read() -> None:
    # documents with captions and disappearing messages arrive wrapped
    inner = wa.Message()
    inner.documentMessage.caption = "the invoice"
    body = wa.Message()
    body.documentWithCaptionMessage.message.CopyFrom(inner)
    assert mapped(ev.message(body)).text == "the invoice"
    wrapped = wa.Message()
    wrapped.ephemeralMessage.message.conversation = "gone in 7 days"
    assert mapped(ev.message(wrapped)).text == "gone in 7 days"


def test_a_group_message_with_mentions_and_a_quote() -> None:
    body = ev.extended_body(
        "@15550000001 what about this?",
        mentions=("15550000001@s.whatsapp.net", "15552220000@s.whatsapp.net"),
        quoted_id="3EB0QUOTED",
        participant=ALICE,
    )
    got = mapped(ev.message(body, chat=GROUP, sender=ALICE, message_id="G1"))
    assert got.chat == GROUP
    assert got.sender == ALICE
    assert got.is_group
    assert got.mentions == ("15550000001@s.whatsapp.net", "15552220000@s.whatsapp.net")
    assert got.mentioned
    assert got.quoted_id == "3EB0QUOTED"


def test_a_mention_of_the_accounts_lid_names_the_account() -> None:
    body = ev.extended_body("hey bot", mentions=(ACCOUNT_LID,))
    assert mapped(ev.message(body, chat=GROUP, sender=ALICE)).mentioned
    other = ev.extended_body("hey you", mentions=("77777@lid",))
    got = mapped(ev.message(other, chat=GROUP, sender=ALICE))
    assert got.mentions == ("77777@lid",)
    assert not got.mentioned


def test_mentions_on_a_media_caption_are_read_from_its_context() -> None:
    body = wa.Message()
    body.imageMessage.caption = "look @bot"
    body.imageMessage.contextInfo.mentionedJID.append(ACCOUNT_JIDS[0])
    body.imageMessage.contextInfo.stanzaID = "Q7"
    got = mapped(ev.message(body, chat=GROUP, sender=ALICE))
    assert (got.text, got.mentioned, got.quoted_id) == ("look @bot", True, "Q7")


def test_a_lid_sender_and_its_phone_jid_give_one_chat_key() -> None:
    by_phone = mapped(ev.message(ev.text_body("one"), chat=ALICE))
    by_lid = mapped(ev.message(ev.text_body("two"), chat=ALICE_LID, sender_alt=ALICE))
    assert by_lid.chat == by_phone.chat == ALICE
    assert by_lid.sender == ALICE
    assert by_lid.sender_alt == ALICE_LID
    # from a second device of the same person, still the same chat and sender
    device = mapped(
        ev.message(
            ev.text_body("three"), chat=ALICE_LID, sender="811110000:4@lid", sender_alt=ALICE
        )
    )
    assert (device.chat, device.sender) == (ALICE, ALICE)
    # in a group, the LID sender is normalised and the chat stays the group
    group = mapped(ev.message(ev.text_body("four"), chat=GROUP, sender=ALICE_LID, sender_alt=ALICE))
    assert (group.chat, group.sender, group.sender_alt) == (GROUP, ALICE, ALICE_LID)


def test_our_own_message_is_marked_from_me_in_the_chat_key_of_the_person() -> None:
    # sent from the account's phone to Alice, addressed by her LID
    echo = mapped(
        ev.message(
            ev.text_body("sent from my phone"),
            chat=ALICE_LID,
            sender=ACCOUNT_LID,
            sender_alt=ACCOUNT_JIDS[0],
            recipient_alt=ALICE,
            from_me=True,
        )
    )
    assert echo.from_me
    assert echo.chat == ALICE
    assert echo.sender == ACCOUNT_JIDS[0]


def test_status_broadcasts_and_newsletters_are_dropped() -> None:
    assert "status" in dropped(
        ev.message(ev.text_body("my status"), chat="status@broadcast", sender=ALICE)
    )
    assert "broadcast" in dropped(ev.message(ev.text_body("list"), chat="1234@broadcast"))
    assert "newsletter" in dropped(ev.message(ev.text_body("news"), chat="1203@newsletter"))


def test_reactions_are_dropped() -> None:
    body = wa.Message()
    body.reactionMessage.text = "👍"
    body.reactionMessage.key.ID = "3EB0SENT0001"
    assert dropped(ev.message(body)) == "reaction"


def test_an_edit_is_not_a_new_message() -> None:
    # whatsmeow unwraps an edit into a protocol message of type MESSAGE_EDIT, sets
    # Info.Edit to "1" and IsEdit
    body = wa.Message()
    body.protocolMessage.type = wa.ProtocolMessage.MESSAGE_EDIT
    body.protocolMessage.key.ID = "M1"
    body.protocolMessage.editedMessage.conversation = "hello (fixed)"
    assert "edit" in dropped(ev.message(body, edit="1", is_edit=True))
    # any edit attribute alone drops it, even with text beside it
    assert "edit" in dropped(ev.message(ev.text_body("pinned"), edit="2"))
    assert "edit" in dropped(ev.message(ev.text_body("edited"), is_edit=True))


def test_revokes_and_other_protocol_messages_are_dropped() -> None:
    body = wa.Message()
    body.protocolMessage.type = wa.ProtocolMessage.REVOKE
    body.protocolMessage.key.ID = "M1"
    assert dropped(ev.message(body)) == "protocol message (REVOKE)"
    sync = wa.Message()
    sync.protocolMessage.type = wa.ProtocolMessage.HISTORY_SYNC_NOTIFICATION
    assert "HISTORY_SYNC_NOTIFICATION" in dropped(ev.message(sync))


def test_messages_without_text_are_dropped() -> None:
    assert "empty message" in dropped(ev.message())
    assert dropped(ev.message(ev.text_body(""))) == "no text (conversation)"
    assert "conversation" in dropped(ev.message(ev.text_body("  \n ")))
    image = wa.Message()
    image.imageMessage.mimetype = "image/jpeg"  # a picture without a caption
    assert "imageMessage" in dropped(ev.message(image))
    sticker = wa.Message()
    sticker.stickerMessage.mimetype = "image/webp"
    assert "stickerMessage" in dropped(ev.message(sticker))


async def test_a_message_delivered_twice_by_lid_and_by_phone_jid_is_stored_once(bus: Bus) -> None:
    # whatsmeow may hand the same message over again (after a reconnect), once addressed
    # by the sender's LID and once by the phone JID
    by_lid = ev.message(ev.text_body("hi"), chat=ALICE_LID, sender_alt=ALICE, message_id="DUP1")
    by_phone = ev.message(ev.text_body("hi"), chat=ALICE, message_id="DUP1")
    ingress = Ingress(bus, CHANNEL_WHATSAPP, "a1")
    for event in (by_lid, by_phone, by_lid):
        mapped_event = neonize_map.session_event(ACCOUNT_JIDS, ev.roundtrip(event))
        assert isinstance(mapped_event, Incoming)
        await ingress(mapped_event)
    stored = await read_stream(bus, "INBOUND")
    assert [subject for subject, _ in stored] == [subjects.inbound(CHANNEL_WHATSAPP, "a1", ALICE)]
    received = stored[0][1]
    assert isinstance(received, MessageReceived)
    assert (received.chat, received.sender, received.sender_alt) == (ALICE, ALICE, ALICE_LID)


# -- receipts --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kind", "status"),
    [(nz.Receipt.DELIVERED, "delivered"), (nz.Receipt.READ, "read"), (nz.Receipt.PLAYED, "played")],
)
def test_delivered_read_and_played_receipts_from_others_map_to_receipts(
    kind: int, status: str
) -> None:
    got = neonize_map.receipt(ev.roundtrip(ev.receipt(("S1", "S2"), kind)))
    assert got == Receipt(chat=ALICE, transport_message_ids=("S1", "S2"), status=status)


def test_a_receipt_with_its_type_unset_is_ignored_not_taken_for_delivered() -> None:
    for kind in (nz.Receipt.READ, nz.Receipt.DELIVERED):
        assert neonize_map.receipt(ev.unset(ev.receipt(kind=kind), "Type")) is None


@pytest.mark.parametrize(
    "kind",
    [
        nz.Receipt.READ_SELF,
        nz.Receipt.PLAYED_SELF,
        nz.Receipt.SENDER,
        nz.Receipt.RETRY,
        nz.Receipt.SERVER_ERROR,  # neonize 0.5.2 also sends PLAYED_SELF as this
        nz.Receipt.INACTIVE,
        nz.Receipt.PEER_MSG,
        nz.Receipt.HISTORY_SYNC,
    ],
    ids=lambda k: nz.Receipt.ReceiptType.Name(k),
)
def test_other_receipt_types_are_ignored(kind: int) -> None:
    assert neonize_map.receipt(ev.roundtrip(ev.receipt(kind=kind))) is None


def test_receipts_from_our_own_devices_are_ignored() -> None:
    mine = ev.receipt(kind=nz.Receipt.READ, from_me=True, sender=ACCOUNT_JIDS[0])
    assert neonize_map.receipt(ev.roundtrip(mine)) is None


def test_a_receipt_from_a_lid_is_filed_under_the_phone_chat() -> None:
    got = neonize_map.receipt(ev.roundtrip(ev.receipt(chat=ALICE_LID, sender_alt=ALICE)))
    assert got is not None
    assert got.chat == ALICE


def test_a_receipt_without_ids_is_ignored() -> None:
    assert neonize_map.receipt(ev.roundtrip(ev.receipt(ids=()))) is None


# -- session signals -------------------------------------------------------------------


def test_a_temporary_ban_records_its_code_and_expires_after_its_duration() -> None:
    now = datetime(2026, 11, 30, 10, 0, tzinfo=UTC)
    got = neonize_map.ban(
        ev.roundtrip(ev.temporary_ban(nz.TemporaryBan.BLOCKED_BY_USERS, 7200)), now
    )
    assert got == TemporaryBan(
        reason="blocked by users, for 7200 s", until=now + timedelta(seconds=7200)
    )
    assert end_of(got) == SessionEnd("banned", "banned: blocked by users, for 7200 s", got.until)


def test_a_temporary_ban_with_an_unmapped_code_says_so_and_without_expiry_has_no_end() -> None:
    unmapped = ev.unset(ev.temporary_ban(nz.TemporaryBan.BROADCAST_LIST, 0), "Code")
    got = neonize_map.ban(unmapped)
    assert got == TemporaryBan(reason="reason not given", until=None)


def test_logged_out_says_why_and_what_to_do() -> None:
    got = neonize_map.logged_out(
        ev.roundtrip(ev.logged_out(nz.ConnectFailureReason.MAIN_DEVICE_GONE, on_connect=True))
    )
    assert got == LoggedOut(
        reason="logged out while connecting (main device gone): pair the account again"
    )
    unknown = neonize_map.logged_out(ev.unset(ev.logged_out(), "Reason"))
    assert unknown.reason == "logged out (reason not given): pair the account again"


def test_each_neonize_event_maps_to_its_session_event() -> None:
    def one(event: object) -> object:
        return neonize_map.session_event(ACCOUNT_JIDS, event)

    assert one(ev.connected()) == Connected()
    assert isinstance(one(ev.disconnected()), Disconnected)
    assert one(ev.stream_replaced()) == StreamReplaced()
    assert one(ev.client_outdated()) == ClientOutdated()
    assert isinstance(one(ev.logged_out()), LoggedOut)
    assert isinstance(one(ev.temporary_ban()), TemporaryBan)
    assert one(ev.connect_failure()) == Disconnected(
        reason="connect failure (service_unavailable) service unavailable"
    )
    assert one(ev.keepalive_timeout(3)) == Disconnected(reason="keepalive timeout (3 missed)")
    assert isinstance(one(ev.message(ev.text_body("hi"))), Incoming)
    assert isinstance(one(ev.receipt()), Receipt)
    assert isinstance(one(ev.receipt(kind=nz.Receipt.READ_SELF)), Dropped)
    assert one(ev.presence()) == Dropped("Presence event (not mapped)")


def test_an_outdated_client_parks_the_account_with_what_to_do() -> None:
    end = end_of(ClientOutdated())
    assert end is not None
    assert end.state == "outdated"
    assert "upgrade" in end.reason


# -- outgoing --------------------------------------------------------------------------

FENCE = Fence(holder="w1", token=3)


def test_a_reply_is_a_plain_conversation_message() -> None:
    out = Outgoing(chat=ALICE, text="hi @15551234567 see 1203@g.us", job_id="j1", fence=FENCE)
    msg = neonize_map.outgoing_message(out)
    assert msg == wa.Message(conversation="hi @15551234567 see 1203@g.us")
    # no mention parsing: the text goes out as written, with no contextInfo
    assert [f.name for f, _ in msg.ListFields()] == ["conversation"]


def test_a_quoted_reply_is_an_extended_text_quoting_the_message() -> None:
    quote = Quote(message_id="3EB0QUOTED", sender=ALICE, text="what time is it?")
    out = Outgoing(chat=GROUP, text="noon", job_id="j2", fence=FENCE, reply_to=quote)
    msg = neonize_map.outgoing_message(out)
    assert not msg.HasField("conversation")
    assert msg.extendedTextMessage.text == "noon"
    context = msg.extendedTextMessage.contextInfo
    assert context.stanzaID == "3EB0QUOTED"
    assert context.participant == ALICE
    assert context.quotedMessage == wa.Message(conversation="what time is it?")
    assert list(context.mentionedJID) == []
    # the bytes neonize hands to Go parse back the same
    back = wa.Message()
    back.ParseFromString(msg.SerializeToString())
    assert back == msg


def test_a_quote_without_a_sender_leaves_the_participant_out() -> None:
    out = Outgoing(chat=ALICE, text="ok", job_id="j3", fence=FENCE, reply_to=Quote("Q9"))
    context = neonize_map.outgoing_message(out).extendedTextMessage.contextInfo
    assert context.stanzaID == "Q9"
    assert not context.HasField("participant")


# -- send errors -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        ("failed to send message: websocket not connected", "offline"),
        ("failed to get device list: info query timed out", "transient"),
        ("failed to get device list: failed to send usync query: EOF", "transient"),
        ("client is nil", "offline"),
        ("failed to send message: timed out waiting for message send response", "unknown"),
        (
            "failed to send message: no LID found for 15551110000@s.whatsapp.net from server",
            "permanent",
        ),
        ("can't send message to unknown server example.com", "permanent"),
        ("server returned error 479", "permanent"),
        ("failed to send message: server returned error 463", "account"),
        ("something whatsmeow never said before", "transient"),
        ("", "transient"),
    ],
)
def test_send_errors_are_classified_from_the_go_error_string(error: str, kind: str) -> None:
    assert neonize_map.classify_send_error(error) == kind


# -- the bot tag and the import --------------------------------------------------------


def test_the_bot_tag_is_explicit_on_or_off() -> None:
    assert neonize_map.bot_tag("on") == {"NEONIZE_BOT_TAG": "on"}
    assert neonize_map.bot_tag(" OFF ") == {"NEONIZE_BOT_TAG": "off"}
    assert neonize_map.bot_tag("false") == {"NEONIZE_BOT_TAG": "off"}
    with pytest.raises(ValueError, match="NEONIZE_BOT_TAG='maybe' is not valid: use 'on' or 'off'"):
        neonize_map.bot_tag("maybe")


def test_the_suite_imports_neonize_without_leaving_its_uname_pipe_behind(tmp_path: Path) -> None:
    # neonize's import runs `os.popen("uname -a").read()` and never closes it. A `uname`
    # that is still running after closing its output (slow here on purpose; by chance on
    # a loaded box) keeps the pipe open and the child unreaped, and their ResourceWarning
    # fails some later test. The conftest's import must leave neither.
    fake = tmp_path / "uname"
    fake.write_text('#!/bin/sh\necho "Linux fake"\nexec >&-\nsleep 1\n')
    fake.chmod(0o755)
    script = (
        "import gc, os, sys, warnings\n"
        "warnings.simplefilter('error')\n"
        "raised = []\n"
        "sys.unraisablehook = lambda u: raised.append(repr(u.exc_value))\n"
        "def pipes():\n"
        "    links = []\n"
        "    for fd in os.listdir('/proc/self/fd'):\n"
        "        try:\n"
        "            links.append(os.readlink(f'/proc/self/fd/{fd}'))\n"
        "        except OSError:\n"
        "            pass\n"
        "    return {link for link in links if link.startswith('pipe:')}\n"
        "before = pipes()\n"
        "import tests.conftest\n"
        "gc.collect()\n"
        "assert 'neonize' in sys.modules\n"
        "assert raised == [], raised\n"
        "assert pipes() <= before, f'pipes left open: {pipes() - before}'\n"
    )
    env = {**os.environ, "PATH": f"{tmp_path}:{os.environ['PATH']}"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, cwd=REPO, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()


def test_the_suites_root_logger_carries_no_handler_of_neonizes() -> None:
    # the conftest imported neonize, whose import calls logging.basicConfig
    assert "neonize" in sys.modules
    formats = [getattr(h.formatter, "_fmt", "") or "" for h in logging.getLogger().handlers]
    assert not [f for f in formats if "[%(name)s %(levelname)s]" in f], formats


@pytest.mark.parametrize("order", ["neonize first", "logging first"])
def test_importing_neonize_leaves_our_structured_logs_in_charge(order: str) -> None:
    # neonize's import calls logging.basicConfig (a colour handler on the root) and starts
    # a log thread; in either order, the root logs through our one JSON handler.
    steps = {
        "neonize first": "import neonize\nsetup_logging('INFO', 'json')\n",
        "logging first": "setup_logging('INFO', 'json')\nimport neonize\n",
    }[order]
    script = (
        "import logging, sys\n"
        "from services.runtime.logs import JsonFormatter, setup_logging\n"
        + steps
        + "root = logging.getLogger()\n"
        "assert len(root.handlers) == 1, root.handlers\n"
        "assert isinstance(root.handlers[0].formatter, JsonFormatter), root.handlers\n"
        "logging.getLogger('whatsmeow.Client').info('from go', extra={'account': 'a1'})\n"
    )
    env = {**os.environ, "PYTHONWARNINGS": "ignore::ResourceWarning"}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, cwd=REPO, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout == b""
    lines = done.stderr.decode().splitlines()
    assert len(lines) == 1, lines
    assert '"logger": "whatsmeow.Client"' in lines[0]
    assert '"msg": "from go"' in lines[0]
    assert '"account": "a1"' in lines[0]
