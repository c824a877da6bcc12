"""Failover of a real-WhatsApp account between two `svc run whatsapp` processes on one
shared Postgres session store. The processes run the real neonize transport and the real
`NewAClient`; only its Go bridge is swapped (SVC_TEST_NEONIZE_BRIDGE) for the fake
WhatsApp network of tests/whatsapp/fake_network.py, which this test process serves on
the test's nats-server: one socket per device, StreamReplaced for the older one, users'
messages kept until a socket acks them, and a log of every connect and send.

Judged from that log and the event streams: the standby resumes the same device (its
connect replaces the dead owner's socket); the old owner sends nothing after that; every
reply is sent once, or more only for a job recorded `DeliveryUncertain`; every user
message gets its turn; the audit is clean (the `served` fixture runs it).
"""

from __future__ import annotations

import os
import secrets
import signal
from collections import Counter
from pathlib import Path

import pytest

from contracts.events import (
    DeliveryUncertain,
    LeaseAcquired,
    MessageReceived,
    MessageSent,
)
from services.channel.devices import DeviceRegistry
from services.runtime.bus import Bus
from services.runtime.provisioning import ensure_streams
from services.runtime.settings import SessionStore
from services.whatsapp.neonize_store import devices_in_store
from tests.conftest import Processes, read_stream, wait_until
from tests.e2e.conftest import consumers_ready, holder_of, pid_of, turn_records
from tests.whatsapp.fake_network import FakeWhatsApp, Record, one_socket_at_a_time
from tests.whatsapp.test_neonize_store import add_device, pg_store
from tests.whatsapp.test_neonize_store import postgres as postgres  # the fixture

pytestmark = pytest.mark.slow

ACCOUNT = "sales"
DEVICE = "15550000001:7@s.whatsapp.net"
REPO = Path(__file__).resolve().parents[2]
CHATS = 6


@pytest.fixture
async def shared_store(postgres: str) -> SessionStore:
    """A Postgres session store holding the account's paired device (a fresh database)."""
    # The server lives for the module: a database per test
    store = pg_store(postgres, f"failover_{secrets.token_hex(4)}")
    await devices_in_store(store)  # creates whatsmeow's tables, as any open does
    add_device(store, DEVICE)
    return store


def whatsapp_env(url: str, store: SessionStore) -> dict[str, str]:
    assert store.dsn is not None
    return {
        "NATS_URL": url,
        "WHATSAPP_ACCOUNT_ID": ACCOUNT,
        "WHATSAPP_TRANSPORT": "neonize",
        "WHATSAPP_STORE": store.dsn.value,
        "SVC_TEST_NEONIZE_BRIDGE": "tests.whatsapp.fake_network:install",
        "PYTHONPATH": str(REPO),  # `tests.` is this checkout's, never an installed package
        # A send bounded at 3 s (a timeout is DeliveryUncertain: on a loaded 2-core box 2 s
        # was seen to expire on sends the network had taken); TTL 8 proves 6.4 s, which
        # covers two of them (check_send_cover).
        "NEONIZE_SEND_TIMEOUT": "3",
        "WHATSAPP_LEASE_TTL": "8",
        # Two replies a second: the queue of replies is still draining when the owner dies.
        "WHATSAPP_RATE_LIMIT": "120:1",
    }


def chat(n: int) -> str:
    return f"1555222{n % CHATS:04d}@s.whatsapp.net"


async def users_write(net: FakeWhatsApp, run: str, count: int) -> list[str]:
    """`count` user messages round-robin over the chats; their texts (each unique)."""
    texts = []
    for n in range(count):
        text = f"{run} message {n}"
        await net.user_says(DEVICE, chat(n), text, f"3EB0{run.upper()}{n:06d}")
        texts.append(text)
    return texts


async def received(bus: Bus) -> list[MessageReceived]:
    return [e for _, e in await read_stream(bus, "INBOUND") if isinstance(e, MessageReceived)]


async def events_of(bus: Bus, stream: str, kind: type) -> list:  # type: ignore[type-arg]
    return [e for _, e in await read_stream(bus, stream) if isinstance(e, kind)]


def connects(records: list[Record]) -> list[int]:
    return [r.pid for r in records if r.kind == "connected"]


async def test_kill_9_of_the_owner_the_standby_resumes_the_device_and_nothing_is_lost(
    processes: Processes,
    served: tuple[str, Bus],
    shared_store: SessionStore,
) -> None:
    url, bus = served
    await ensure_streams(bus.js)
    await DeviceRegistry(bus, "whatsapp").record(ACCOUNT, DEVICE, by="test-pairing")
    async with FakeWhatsApp(bus) as net:
        # Given two whatsapp processes on one shared store, and a core
        env = whatsapp_env(url, shared_store)
        for _ in range(2):
            processes.start("run", "whatsapp", **env)
        processes.start("run", "core", NATS_URL=url)
        await wait_until(lambda: holder_of(bus, ACCOUNT), timeout=60, what="an owner")
        first = await holder_of(bus, ACCOUNT)
        assert first is not None
        await wait_until(
            lambda: _connected(net, pid_of(first)), timeout=60, what="the owner's connect"
        )
        await wait_until(lambda: consumers_ready(bus, ("INBOUND", "core")), what="the core")

        # When users write and the replies flow (two a second)
        before = await users_write(net, "before", 24)
        await wait_until(
            lambda: _count(received(bus), len(before)), timeout=60, what="the messages in"
        )
        await wait_until(lambda: _sent_by(net, pid_of(first), 6), timeout=60, what="6 replies")
        # ...and the owner is killed with replies still queued
        os.kill(pid_of(first), signal.SIGKILL)
        # ...and users keep writing to the device while nobody serves it
        after = await users_write(net, "after", 12)

        # Then the standby takes the lease and resumes the same device
        await wait_until(
            lambda: _new_holder(bus, first), timeout=60, what="the standby taking over"
        )
        second = await holder_of(bus, ACCOUNT)
        assert second is not None
        # ...and every message is answered
        expected = {f"echo: {text}" for text in before + after}
        await wait_until(
            lambda: _all_sent(net, expected), timeout=120, what="a reply to every message"
        )
        records = await net.records(DEVICE)

    # The standby's connect replaced the dead owner's socket; the dead one sent nothing after
    assert connects(records) == [pid_of(first), pid_of(second)]
    one_socket_at_a_time(records)
    takeover = next(i for i, r in enumerate(records) if r.pid == pid_of(second))
    assert all(r.pid == pid_of(second) for r in records[takeover:])
    # Each reply went out once; more only for a job recorded DeliveryUncertain (the one in
    # flight at the kill, or a send that timed out waiting for the network's answer)
    sends = [r for r in records if r.kind == "sent"]
    assert {r.text for r in sends} == expected
    sent_events = await events_of(bus, "DELIVERY", MessageSent)
    job_of = {e.text: e.job_id for e in sent_events}
    uncertain = {e.job_id for e in await events_of(bus, "DELIVERY", DeliveryUncertain)}
    repeated = [text for text, n in Counter(r.text for r in sends).items() if n > 1]
    assert all(job_of[text] in uncertain for text in repeated), (repeated, uncertain)
    # Each MessageSent names the network's id of a send of its text, by its holder
    by_id = {r.message_id: r for r in sends}
    for e in sent_events:
        assert by_id[e.transport_message_id].text == e.text
        assert pid_of(e.holder) == by_id[e.transport_message_id].pid
    # Every user message got its turn, once (none lost in the takeover)
    turns = await turn_records(bus, len(before) + len(after), timeout=60)
    assert len({t.inbound_id for t in turns}) == len(before) + len(after)
    # The lease went from the first owner to the second, with a higher token
    acquired = await events_of(bus, "ACCOUNTS", LeaseAcquired)
    assert [e.holder for e in acquired] == [first, second]
    assert acquired[0].token < acquired[1].token


async def _connected(net: FakeWhatsApp, pid: int) -> bool:
    return pid in connects(await net.records(DEVICE))


async def _count(events: object, n: int) -> bool:
    return len(await events) >= n  # type: ignore[arg-type]


async def _sent_by(net: FakeWhatsApp, pid: int, n: int) -> bool:
    return sum(r.pid == pid for r in await net.sends(DEVICE)) >= n


async def _new_holder(bus: Bus, old: str) -> bool:
    holder = await holder_of(bus, ACCOUNT)
    return holder is not None and holder != old


async def _all_sent(net: FakeWhatsApp, texts: set[str]) -> bool:
    return {r.text for r in await net.sends(DEVICE)} >= texts


async def test_a_send_the_network_took_but_answered_too_late_is_recorded_uncertain(
    processes: Processes,
    served: tuple[str, Bus],
    shared_store: SessionStore,
) -> None:
    url, bus = served
    await ensure_streams(bus.js)
    await DeviceRegistry(bus, "whatsapp").record(ACCOUNT, DEVICE, by="test-pairing")
    async with FakeWhatsApp(bus) as net:
        processes.start("run", "whatsapp", **whatsapp_env(url, shared_store))
        processes.start("run", "core", NATS_URL=url)
        await wait_until(lambda: holder_of(bus, ACCOUNT), timeout=60, what="an owner")
        await wait_until(lambda: consumers_ready(bus, ("INBOUND", "core")), what="the core")
        # Given a network that takes the next send but answers long after the send timeout
        net.slow_next_sends(DEVICE, 20)
        # When a user writes
        (text,) = await users_write(net, "slow", 1)
        # Then the reply job is recorded DeliveryUncertain (never a plain failure retried
        # blind) and, by the default policy (resend), ends sent
        reply = f"echo: {text}"
        await wait_until(
            lambda: events_of(bus, "DELIVERY", MessageSent), timeout=60, what="MessageSent"
        )
        sends = await net.sends(DEVICE)
    (sent,) = await events_of(bus, "DELIVERY", MessageSent)
    (uncertain,) = await events_of(bus, "DELIVERY", DeliveryUncertain)
    assert uncertain.job_id == sent.job_id
    assert uncertain.resolution == "resend"
    assert [r.text for r in sends] == [reply, reply]  # out twice: the price of resending
