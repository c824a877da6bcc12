"""Fuzz: arbitrary bytes, subjects and headers on every consumed subject never stop the
system (issue 11, "tests that must exist"). One in-process `all` role on a real
nats-server takes batch after batch of garbage; after each batch a valid user message
must still be answered and no consumer may hold or leave a message behind."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from contracts import subjects
from contracts.codec import encode
from contracts.events import MessageReceived, SendMessage
from contracts.payloads import SimInbound
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import raw_publish, role, wait_until

ACCOUNT = "default"
# Consumers of the `all` role (durable names) and their streams: nothing may stay there.
CONSUMERS = (
    ("INBOUND", "core"),
    ("SIM", f"sim-in-{ACCOUNT}"),
    ("OUTBOUND", "egress-whatsapp-default"),
)

# One subject token: valid UTF-8 without the separators and wildcards nats-py would split
# on (a raw publisher's tokens, not UTF-8 at all, are `raw_token` below).
token = st.one_of(
    st.text(
        st.characters(
            blacklist_categories=("Cs", "Cc", "Zs", "Zl", "Zp"), blacklist_characters=".*>"
        ),
        min_size=1,
        max_size=24,
    ),
    st.integers(300, 3900).map(lambda n: "9" * n),  # past every bound, within our own line
    st.sampled_from(["whatsapp", ACCOUNT, "123@s~2Ewhatsapp~2Enet", "~ZZ", "a~2E"]),
)
subject = st.one_of(
    st.builds("inbound.whatsapp.default.{}".format, token),
    st.builds("inbound.{}.{}.{}".format, token, token, token),
    st.builds("outbound.whatsapp.default.{}".format, token),
    st.just(subjects.sim_in(ACCOUNT)),
    st.builds("sim.whatsapp.{}.in".format, token),
    st.just(subjects.sim_control(ACCOUNT)),
).filter(lambda s: len(s.encode()) <= 4000)  # our own PUB line must fit the server's 4,096
long_jid = "1" * 4000 + "@s.whatsapp.net"
LONG_JID_MESSAGE = encode(
    SimInbound(chat=long_jid, sender="s@s.whatsapp.net", text="x", message_id="m")
)
NO_CHAT_JOB = encode(SendMessage(id="j", job_id="j", account="acct2", chat="", text="x"))
crafted = st.sampled_from(
    [
        LONG_JID_MESSAGE,
        encode(SimInbound(chat="c@s.whatsapp.net", sender="s\x00", text="x", message_id="m")),
        encode(SimInbound(chat="", sender="", text="", message_id="")),
        encode(
            MessageReceived(
                account="other", chat="a@s.whatsapp.net", sender="a", message_id="m", text="x"
            )
        ),
        NO_CHAT_JOB,
        encode(SendMessage(id="j.k", job_id="j.k", account=ACCOUNT, chat="x", text="x")),
        b'{"type":"MessageReceived"}',
        b"",
        b"\xff\xfe\x00",
    ]
)
payload = st.one_of(st.binary(max_size=2048), crafted)
header_name = st.one_of(
    st.from_regex(r"X-[A-Za-z0-9-]{1,16}", fullmatch=True),
    st.sampled_from(["Nats-Msg-Id", "traceparent", "tracestate"]),
)
header_value = st.text(
    st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\r\n"), max_size=64
)
headers = st.dictionaries(header_name, header_value, max_size=4)
batch = st.lists(st.tuples(subject, payload, headers), min_size=1, max_size=6)

# What a raw publisher (no client library) can store: subject tokens of arbitrary bytes,
# UTF-8 or not (issue 11 item 2), and header lines of arbitrary bytes.
raw_token = st.binary(min_size=1, max_size=16).filter(
    lambda b: not any(c in b for c in b" \t\r\n.*>")
)
raw_subject = st.one_of(
    st.builds(b"inbound.whatsapp.default.".__add__, raw_token),
    st.builds(b"outbound.whatsapp.default.".__add__, raw_token),
    st.builds(lambda t: b"sim.whatsapp." + t + b".in", raw_token),
    st.just(subjects.sim_in(ACCOUNT).encode()),
)
raw_header_line = st.builds(
    lambda name, value: name + b": " + value,
    st.sampled_from([b"Nats-Msg-Id", b"traceparent", b"X-Any"]),
    st.binary(max_size=32).filter(lambda b: b"\r" not in b and b"\n" not in b),
)
raw_headers = st.lists(raw_header_line, max_size=3).map(b"\r\n".join)
raw_batch = st.lists(st.tuples(raw_subject, payload, raw_headers), max_size=3)
BAD_UTF8 = b"inbound.whatsapp.default.\xff\xfe"


@pytest.fixture
async def system(bus: Bus) -> AsyncIterator[Bus]:
    async with role(bus, "all"):
        await wait_until(lambda: _consumers_exist(bus), timeout=30, what="the role's consumers")
        yield bus


async def _consumers_exist(bus: Bus) -> bool:
    try:
        for stream, durable in CONSUMERS:
            await bus.js.consumer_info(stream, durable)
    except Exception:
        return False
    return True


async def _drained(bus: Bus) -> bool:
    for stream, durable in CONSUMERS:
        info = await bus.js.consumer_info(stream, durable)
        if info.num_pending or info.num_ack_pending:
            return False
    return True


_chats = itertools.count()


@settings(
    max_examples=30,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(batch=batch, raw=raw_batch)
# The cases issue 11 found, always run: a 4,000-character chat id through the sim, and a
# job with no chat and another account on this account's queue.
@example(batch=[(subjects.sim_in(ACCOUNT), LONG_JID_MESSAGE, {})], raw=[])
@example(batch=[("outbound.whatsapp.default.x", NO_CHAT_JOB, {"X-A": "1"})], raw=[])
# ... and a subject that is not UTF-8, stored by a raw publish (it killed nats-py's reader).
@example(batch=[], raw=[(BAD_UTF8, b"hi", b""), (BAD_UTF8, b"{}", b"X-Any: \xff")])
# ... and one with a form feed, which stock nats-py split the message line on.
@example(batch=[], raw=[(b"inbound.whatsapp.default.\x0c\xff", b"\xf3", b"")])
async def test_garbage_on_every_consumed_subject_never_stops_the_system(
    system: Bus,
    nats_server: EmbeddedNats,
    batch: list[tuple[str, bytes, dict[str, str]]],
    raw: list[tuple[bytes, bytes, bytes]],
) -> None:
    bus = system
    # Given a batch of arbitrary messages on the subjects the role consumes, from a
    # client and from a raw publisher
    for subj, data, hdrs in batch:
        await bus.nc.publish(subj, data, headers=hdrs or None)
    await bus.nc.flush()
    for raw_subj, data, raw_hdrs in raw:
        await raw_publish(nats_server.url, raw_subj, data, headers=raw_hdrs)
    # When a valid user message follows it
    async with SimUser(bus, ACCOUNT) as user:
        await user.send(f"fuzz{next(_chats)}@s.whatsapp.net", "still there?")
        # Then it is answered, and every bad message was dead-lettered or refused:
        # no consumer holds or leaves anything behind
        sent = [s[:80] for s, _, _ in batch] + [s[:80] for s, _, _ in raw]
        assert await user.wait_replies(30), f"no answer after {sent}"
    await wait_until(lambda: _drained(bus), timeout=30, what="every consumer drained")
    assert bus.nc.is_connected
