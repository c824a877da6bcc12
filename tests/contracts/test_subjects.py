"""Subject builders and the reversible chat-JID <-> subject-token encoding."""

from __future__ import annotations

import re
from collections.abc import Callable

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from contracts import subjects
from contracts.errors import ContractError, InvalidSubjectError
from contracts.subjects import decode_chat, encode_chat

hypothesis_settings = settings(database=None, deadline=None)

TOKEN_RE = re.compile(r"^[A-Za-z0-9@\-_:+=!~]+$")
DM = "123@s.whatsapp.net"
DM_TOKEN = "123@s~2Ewhatsapp~2Enet"

jid_like = st.text(
    alphabet=st.sampled_from(
        list(".@:-_0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
        + list("~*> \t+=!/é中🙂\u200b")
    ),
    min_size=1,
    max_size=40,
)
phone_jids = st.builds(
    "{}{}@{}".format,
    st.from_regex(r"[1-9][0-9]{5,14}", fullmatch=True),
    st.sampled_from(["", ":1", ":42"]),
    st.sampled_from(["s.whatsapp.net", "g.us", "lid", "broadcast"]),
)
# Valid chats: printable, within the length bound (ADR 0013); the rest is refused below.
chats = (st.text(min_size=1, max_size=80) | jid_like | phone_jids).filter(str.isprintable)
accounts = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)


def assert_is_one_safe_token(token: str) -> None:
    assert TOKEN_RE.fullmatch(token), token
    assert not any(c in token for c in ".*>")
    assert not any(c.isspace() for c in token)


# --- chat token encoding -----------------------------------------------------------------


@hypothesis_settings
@given(chats)
def test_decode_chat_inverts_encode_chat(chat: str) -> None:
    # When a chat JID is encoded as a token and decoded back
    token = encode_chat(chat)
    # Then the token is one safe NATS token and decodes to the same JID
    assert_is_one_safe_token(token)
    assert decode_chat(token) == chat


@hypothesis_settings
@given(chats, chats)
def test_different_chats_get_different_tokens(first: str, second: str) -> None:
    assume(first != second)
    assert encode_chat(first) != encode_chat(second)


@hypothesis_settings
@given(chats)
def test_encode_chat_is_deterministic(chat: str) -> None:
    assert encode_chat(chat) == encode_chat(chat)


@hypothesis_settings
@given(st.text())
def test_decode_chat_of_any_text_returns_a_chat_or_raises_invalid_subject(token: str) -> None:
    try:
        chat = decode_chat(token)
    except InvalidSubjectError:
        return
    # Only canonical tokens are accepted, so re-encoding gives the token back
    assert encode_chat(chat) == token


@pytest.mark.parametrize(
    ("chat", "token"),
    [
        (DM, DM_TOKEN),
        ("1203630@g.us", "1203630@g~2Eus"),
        ("123:4@s.whatsapp.net", "123:4@s~2Ewhatsapp~2Enet"),
        ("~", "~7E"),
        ("a b", "a~20b"),
        ("*", "~2A"),
        (">", "~3E"),
        ("é", "~C3~A9"),
        ("🙂", "~F0~9F~99~82"),
        ("+=!-_:@", "+=!-_:@"),
    ],
)
def test_encode_chat_examples(chat: str, token: str) -> None:
    assert encode_chat(chat) == token
    assert decode_chat(token) == chat


def test_encode_chat_rejects_empty_jid() -> None:
    with pytest.raises(InvalidSubjectError, match="empty"):
        encode_chat("")


@pytest.mark.parametrize(
    "token",
    [
        "",
        "123@s~2ewhatsapp~2enet",  # lower-case hex is not canonical
        "~2e",
        "~ZZ",
        "~",
        "~7",
        "abc~",
        "a.b",
        "a b",
        "*",
        ">",
        "~41",  # an escaped safe character ("A") is not canonical
        "~40",  # an escaped "@" is not canonical either
        "~C3",  # a lone UTF-8 lead byte
        "~FF",  # never valid UTF-8
        "~C0~80",  # overlong encoding of NUL
        "é",  # raw non-ASCII instead of ~XX
    ],
)
def test_decode_chat_rejects_garbage_and_non_canonical_tokens(token: str) -> None:
    with pytest.raises(InvalidSubjectError, match="chat token"):
        decode_chat(token)


def test_invalid_subject_error_is_a_contract_error() -> None:
    assert issubclass(InvalidSubjectError, ContractError)


# --- chat subjects -----------------------------------------------------------------------

BUILDERS = {
    "inbound": subjects.inbound,
    "agent": subjects.agent,
    "outbound": subjects.outbound,
    "delivery": subjects.delivery,
}


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_chat_subject_is_kind_channel_account_token(kind: str) -> None:
    subject = BUILDERS[kind]("whatsapp", "acct-1", DM)
    assert subject == f"{kind}.whatsapp.acct-1.{DM_TOKEN}"
    assert subject.split(".") == [kind, "whatsapp", "acct-1", DM_TOKEN]


@hypothesis_settings
@given(st.sampled_from(sorted(BUILDERS)), accounts, chats)
def test_parse_chat_subject_inverts_the_builders(kind: str, account: str, chat: str) -> None:
    # Given any valid account and chat
    subject = BUILDERS[kind]("whatsapp", account, chat)
    # Then the subject has exactly four tokens and parses back to its parts
    assert len(subject.split(".")) == 4
    assert subjects.parse_chat_subject(subject) == subjects.ChatSubject(
        kind, "whatsapp", account, chat
    )


@pytest.mark.parametrize(
    "subject",
    [
        "",
        "inbound",
        "inbound.whatsapp.acct-1",
        f"inbound.whatsapp.acct-1.{DM}",  # raw JID: too many tokens
        f"accounts.whatsapp.acct-1.{DM_TOKEN}",  # not a chat kind
        f"sim.whatsapp.acct-1.{DM_TOKEN}",
        f"Inbound.whatsapp.acct-1.{DM_TOKEN}",
    ],
)
def test_parse_chat_subject_rejects_wrong_shapes(subject: str) -> None:
    with pytest.raises(InvalidSubjectError, match=r"<inbound\|agent\|outbound\|delivery>"):
        subjects.parse_chat_subject(subject)


@pytest.mark.parametrize(
    ("subject", "message"),
    [
        (f"inbound.telegram.acct-1.{DM_TOKEN}", "channel 'telegram' is unknown"),
        (f"inbound.whatsapp.acct 1.{DM_TOKEN}", "account 'acct 1' is invalid"),
        (f"inbound.whatsapp.*.{DM_TOKEN}", r"account '\*' is invalid"),
        ("inbound.whatsapp.acct-1.*", "chat token"),
        ("inbound.whatsapp.acct-1.~41", "chat token"),
    ],
)
def test_parse_chat_subject_rejects_bad_parts(subject: str, message: str) -> None:
    with pytest.raises(InvalidSubjectError, match=message):
        subjects.parse_chat_subject(subject)


INVALID_ACCOUNTS = ["", "a" * 65, "acct.1", "acct 1", "*", ">", "acct*", "é", "acct-1\n"]


@pytest.mark.parametrize("account", INVALID_ACCOUNTS)
@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_chat_subject_builders_reject_invalid_accounts(kind: str, account: str) -> None:
    with pytest.raises(InvalidSubjectError, match="use 1-64 of A-Z a-z 0-9 _ -"):
        BUILDERS[kind]("whatsapp", account, DM)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_chat_subject_builders_reject_unknown_channels(kind: str) -> None:
    with pytest.raises(InvalidSubjectError, match="expected one of whatsapp"):
        BUILDERS[kind]("telegram", "acct-1", DM)


@pytest.mark.parametrize("kind", sorted(BUILDERS))
def test_chat_subject_builders_reject_empty_chats(kind: str) -> None:
    with pytest.raises(InvalidSubjectError, match="chat JID is empty"):
        BUILDERS[kind]("whatsapp", "acct-1", "")


@pytest.mark.parametrize("account", ["a", "A" * 64, "acct_1-Z9", "-", "_"])
def test_check_account_accepts_the_grammar(account: str) -> None:
    assert subjects.check_account(account) == account


@pytest.mark.parametrize("account", INVALID_ACCOUNTS)
def test_check_account_rejects_and_says_what_is_allowed(account: str) -> None:
    with pytest.raises(InvalidSubjectError, match="is invalid: use 1-64 of A-Z a-z 0-9 _ -"):
        subjects.check_account(account)


@pytest.mark.parametrize("channel", ["", "WhatsApp", "telegram", "whatsapp.x", "*"])
def test_check_channel_rejects_unknown_channels(channel: str) -> None:
    with pytest.raises(InvalidSubjectError, match="is unknown: expected one of whatsapp"):
        subjects.check_channel(channel)


# --- other subjects and keys -------------------------------------------------------------


def test_outbound_filter_matches_every_chat_of_one_account() -> None:
    assert subjects.outbound_filter("whatsapp", "acct-1") == "outbound.whatsapp.acct-1.*"


def test_accounts_subject_shape() -> None:
    assert subjects.accounts("whatsapp", "acct-1") == "accounts.whatsapp.acct-1"


def test_lease_key_is_channel_dot_account() -> None:
    assert subjects.lease_key("whatsapp", "acct-1") == "whatsapp.acct-1"


def test_sim_subjects_shape() -> None:
    assert subjects.sim_in("acct-1") == "sim.whatsapp.acct-1.in"
    assert subjects.sim_out("acct-1") == "sim.whatsapp.acct-1.out"


def test_deadletter_prefixes_the_original_subject() -> None:
    source = subjects.outbound("whatsapp", "acct-1", DM)
    assert subjects.deadletter(source) == f"deadletter.outbound.whatsapp.acct-1.{DM_TOKEN}"


def test_plugin_subjects_shape() -> None:
    assert subjects.plugins("weather") == "plugins.weather"
    assert subjects.PLUGIN_POLICY_SUBJECT == "plugins._policy"


@pytest.mark.parametrize(
    "build",
    [
        lambda a: subjects.outbound_filter("whatsapp", a),
        lambda a: subjects.accounts("whatsapp", a),
        lambda a: subjects.lease_key("whatsapp", a),
        subjects.sim_in,
        subjects.sim_out,
    ],
    ids=["outbound_filter", "accounts", "lease_key", "sim_in", "sim_out"],
)
@pytest.mark.parametrize("account", ["", "acct.1", "acct 1", "*", "a" * 65])
def test_account_scoped_builders_reject_invalid_accounts(
    build: Callable[[str], str], account: str
) -> None:
    with pytest.raises(InvalidSubjectError, match="use 1-64 of A-Z a-z 0-9 _ -"):
        build(account)


@pytest.mark.parametrize(
    "build",
    [
        lambda c: subjects.outbound_filter(c, "acct-1"),
        lambda c: subjects.accounts(c, "acct-1"),
        lambda c: subjects.lease_key(c, "acct-1"),
    ],
    ids=["outbound_filter", "accounts", "lease_key"],
)
def test_channel_scoped_builders_reject_unknown_channels(build: Callable[[str], str]) -> None:
    with pytest.raises(InvalidSubjectError, match="expected one of whatsapp"):
        build("telegram")


# --- input bounds (issue 11 items 1 and 6; ADR 0013) --------------------------------------

NATS_CONTROL_LINE = 4096  # nats-server closes a connection whose control line is longer


def test_a_4000_character_chat_jid_is_refused_in_one_line() -> None:
    # Given the chat id that made the derived subject exceed the server's control line
    jid = "1" * 4000 + "@s.whatsapp.net"
    # When any chat subject is built from it, it is refused with one short line
    for kind in ("inbound", "agent", "outbound", "delivery"):
        with pytest.raises(InvalidSubjectError, match="too long: at most 256") as err:
            getattr(subjects, kind)("whatsapp", "acct-1", jid)
        assert "\n" not in str(err.value)
        assert len(str(err.value)) < 200  # the JID is shown cut, not whole


@pytest.mark.parametrize("jid", ["a\x00b@s.whatsapp.net", "a\nb@g.us", "x\u200b@lid", "\ud800@x"])
def test_chat_jids_with_control_characters_or_invalid_encoding_are_refused(jid: str) -> None:
    with pytest.raises(InvalidSubjectError, match="control characters"):
        encode_chat(jid)


def test_the_longest_jid_keeps_every_derived_subject_far_below_the_control_line() -> None:
    # Given the worst JID within the bounds: non-ASCII characters escape to the most bytes
    worst = ("🙂" * 200)[: subjects.MAX_CHAT_TOKEN_BYTES // 12]
    account = "a" * 64
    for kind in ("inbound", "agent", "outbound", "delivery"):
        subject = getattr(subjects, kind)("whatsapp", account, worst)
        dead = subjects.deadletter(subject, "OUTBOUND")
        # Then the dead letter of any derived subject still carries it, under 1,200 bytes
        assert dead == f"deadletter.{subject}"
        assert len(dead.encode()) < 1200 < NATS_CONTROL_LINE


def test_a_jid_within_the_characters_but_encoding_too_long_is_refused() -> None:
    jid = "🙂" * 100  # 100 characters, 1,200 bytes once escaped
    with pytest.raises(InvalidSubjectError, match="encodes to 1200 bytes"):
        encode_chat(jid)


def test_real_whatsapp_jids_are_accepted() -> None:
    for jid in (
        "4915112345678@s.whatsapp.net",
        "120363025246125486@g.us",
        "123456789012345@lid",
        "120363144038483540@newsletter",
        "4915112345678:12@s.whatsapp.net",
        "status@broadcast",
    ):
        assert decode_chat(encode_chat(jid)) == jid


@pytest.mark.parametrize(
    "subject",
    [
        "inbound.whatsapp.acct." + "x" * 2000,  # too long to carry
        "inbound.whatsapp.acct.\udcff\udcfe",  # a non-UTF-8 token as nats-py hands it over
        "inbound.whatsapp.acct.caf\u00e9",  # outside the subject grammar
        "inbound..x",
        "",
    ],
)
def test_a_subject_that_cannot_be_carried_is_dead_lettered_under_invalid(subject: str) -> None:
    assert not subjects.carriable(subject)
    assert subjects.deadletter(subject, "INBOUND") == "deadletter._invalid.INBOUND"
    assert subjects.deadletter(subject, "no such stream!") == "deadletter._invalid._"


def test_check_agrees_accepts_a_payload_naming_its_subject() -> None:
    subject = subjects.inbound("whatsapp", "acct-1", DM)
    where = subjects.check_agrees(subject, "inbound", "whatsapp", "acct-1", DM)
    assert (where.account, where.chat) == ("acct-1", DM)


@pytest.mark.parametrize(
    ("kind", "channel", "account", "chat"),
    [
        ("inbound", "whatsapp", "acct-1", "666@s.whatsapp.net"),  # another chat
        ("inbound", "whatsapp", "acct-2", DM),  # another account
        ("inbound", "whatsapp", "acct-1", ""),  # no chat
        ("outbound", "whatsapp", "acct-1", DM),  # another kind of subject
    ],
)
def test_check_agrees_refuses_a_payload_naming_another_chat_account_or_kind(
    kind: str, channel: str, account: str, chat: str
) -> None:
    subject = subjects.inbound("whatsapp", "acct-1", DM)
    with pytest.raises(InvalidSubjectError):
        subjects.check_agrees(subject, kind, channel, account, chat)


@pytest.mark.parametrize(
    ("check", "value"),
    [
        (subjects.check_jid, "s" * 257),
        (subjects.check_jid, ""),
        (subjects.check_message_id, "m" * 257),
        (subjects.check_message_id, "id\r\n"),
        (subjects.check_job_id, "j" * 129),
        (subjects.check_job_id, "a.b"),
    ],
)
def test_ids_outside_their_bounds_are_refused(check: Callable[[str], str], value: str) -> None:
    with pytest.raises(InvalidSubjectError):
        check(value)
