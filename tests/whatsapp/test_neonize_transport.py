"""The neonize transport's session lifecycle under a real `AccountOwner`: each signal
whatsmeow raises mid-session and what becomes of the lease, send errors classified,
connect failures retried in place with backoff, a `stop()` that hangs, a device missing
from the store (in a real `svc run whatsapp` process), and a real connect that fails fast.

The real `NewAClient` with its Go bridge replaced by `FakeGo` (tests/whatsapp/fake_go.py),
a real session store and a real nats-server.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import socket
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.message import Message as Proto

from contracts import subjects
from contracts.codec import encode
from contracts.events import (
    DeliveryFailed,
    DeliveryUncertain,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    MessageSent,
    SessionBanned,
    SessionLoggedOut,
)
from contracts.payloads import PresenceAction, PresenceCommand
from contracts.streams import LEASES
from services.app import check_role
from services.channel.devices import DeviceRegistry
from services.channel.dispatch import EventDispatch
from services.channel.owner import AccountOwner
from services.channel.port import (
    Disconnected,
    Fence,
    NotConnectedError,
    Outgoing,
    StaleFenceError,
    TransportError,
    UncertainSendError,
)
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.lease import Lease, LeaseValue, read_lease
from services.runtime.nats_server import EmbeddedNats
from services.runtime.settings import (
    Delivery,
    NeonizeSettings,
    RateLimit,
    SessionStore,
    load_settings,
)
from services.whatsapp.neonize import (
    BRIDGE_ENV,
    NeonizeTransport,
    is_network_error,
    load_bridge,
    new_client,
)
from services.whatsapp.neonize_store import devices_in_store
from tests.channel.transport_contract import Recorder
from tests.conftest import Processes, read_stream, wait_until
from tests.e2e.conftest import job
from tests.whatsapp import neonize_events as nev
from tests.whatsapp.fake_go import BLOCK, FakeGo, PresenceCall
from tests.whatsapp.test_neonize_store import add_device

ACCOUNT = "sales"
DEVICE = "15550000001:7@s.whatsapp.net"
KEY = f"whatsapp.{ACCOUNT}"
CHAT = "15551110000@s.whatsapp.net"
# What whatsmeow's dial returns here, with no DNS (measured with the real library).
DNS_ERROR = (
    "failed to dial whatsapp web websocket: failed to WebSocket dial: failed to send handshake"
    ' request: Get "https://web.whatsapp.com/ws/chat": dial tcp: lookup web.whatsapp.com on'
    " 10.255.255.53:53: no such host"
)
FAST_RETRIES = Delivery(backoff=(0.2,) * 30)


@pytest.fixture
async def store(bus: Bus, tmp_path: Path) -> SessionStore:
    """A store holding the account's device, recorded in the devices bucket."""
    store = SessionStore(path=tmp_path / "whatsapp.sqlite")
    await devices_in_store(store)
    add_device(store, DEVICE)
    await DeviceRegistry(bus, "whatsapp").record(ACCOUNT, DEVICE, by="test")
    return store


@pytest.fixture
def fake() -> Iterator[FakeGo]:
    fake = FakeGo()
    try:
        yield fake
    finally:
        fake.close()


def transport_on(bus: Bus, store: SessionStore, fake: FakeGo, **settings: Any) -> NeonizeTransport:
    def install(client: Any, account: str) -> None:
        client._NewAClient__client = fake

    return NeonizeTransport(
        bus, store, NeonizeSettings(**settings), client_factory=new_client, bridge=install
    )


@asynccontextmanager
async def owning(
    bus: Bus, transport: NeonizeTransport, holder: str = "host-a", ttl: int = 30
) -> AsyncIterator[tuple[AccountOwner, asyncio.Event, asyncio.Task[None]]]:
    """A real AccountOwner of the account, owning it when the block starts."""
    owner = AccountOwner(
        bus, transport, ACCOUNT, holder, lease_ttl=ttl, receive=True, delivery=FAST_RETRIES
    )
    stop = asyncio.Event()
    task = asyncio.create_task(owner.run(stop))
    try:
        # Owning, or owned already: a session that ends at once (a connect error) parks
        # the account before a poll of `owning` could see it set.
        await wait_until(
            lambda: owner.owning.is_set() or events_of(bus, "ACCOUNTS", LeaseAcquired),
            what="the owner to own the account",
        )
        yield owner, stop, task
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


async def lease(bus: Bus) -> LeaseValue | None:
    found = await read_lease(await bus.js.key_value(LEASES.name), KEY)
    return found[0] if found else None


async def parked(bus: Bus) -> str:
    value = await lease(bus)
    return value.parked if value else ""


async def events_of(bus: Bus, stream: str, kind: type) -> list[Any]:  # type: ignore[type-arg]
    return [e for _, e in await read_stream(bus, stream) if isinstance(e, kind)]


# -- signals mid-session, under a real owner ---------------------------------------------


@pytest.mark.parametrize(
    ("signal", "reason", "recorded"),
    [
        (nev.stream_replaced(), "stream replaced", SessionLoggedOut),
        (nev.logged_out(), "logged out (logged out): pair the account again", SessionLoggedOut),
        (nev.temporary_ban(), "banned: send to too many people, for 3600 s", SessionBanned),
        (nev.client_outdated(), "client outdated: upgrade", SessionLoggedOut),
    ],
    ids=["stream_replaced", "logged_out", "temporary_ban", "client_outdated"],
)
async def test_an_ending_signal_mid_session_parks_the_lease_with_its_reason(
    bus: Bus, store: SessionStore, fake: FakeGo, signal: Proto, reason: str, recorded: type
) -> None:
    transport = transport_on(bus, store, fake)
    async with owning(bus, transport) as (owner, _, _):
        token = (await lease(bus)).token  # type: ignore[union-attr]
        # When whatsmeow raises the signal mid-session
        fake.emit(signal)
        # Then the owner parks the account with the signal's reason, under its own token
        await wait_until(lambda: parked(bus), what="the lease parked")
        value = await lease(bus)
        assert value is not None
        assert reason in value.parked
        assert value.token == token
        await wait_until(lambda: not owner.owning.is_set(), what="the owner to stop sending")
    # And the signal was recorded on ACCOUNTS; the client was stopped, never rebuilt
    (event,) = await events_of(bus, "ACCOUNTS", recorded)
    assert event.reason in reason or reason in event.reason
    assert len(fake.connect_times) == 1
    assert fake.stop_calls == 1
    assert await events_of(bus, "ACCOUNTS", LeaseLost) == []


async def test_a_logout_forgets_the_device_so_nobody_resumes_it(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    async with owning(bus, transport_on(bus, store, fake)):
        fake.emit(nev.logged_out())
        await wait_until(lambda: parked(bus), what="the lease parked")
    assert await DeviceRegistry(bus, "whatsapp").get(ACCOUNT) is None


async def test_a_disconnect_keeps_the_lease_and_sends_wait_in_place_until_reconnected(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    transport = transport_on(bus, store, fake)
    async with owning(bus, transport):
        token = (await lease(bus)).token  # type: ignore[union-attr]
        # Given the socket dropped (whatsmeow reconnects by itself)
        fake.online = False
        fake.emit(nev.disconnected())
        the_job = job(ACCOUNT, CHAT, 1, "disconnect")
        await bus.publish(subjects.outbound("whatsapp", ACCOUNT, CHAT), the_job)
        # When a job is sent meanwhile, it finds the socket down ("websocket not
        # connected": nothing sent) and waits in place, spending no attempt
        await wait_until(lambda: fake.send_calls >= 4, 30, what="four tries while offline")
        assert await events_of(bus, "DELIVERY", DeliveryFailed) == []
        # And once whatsmeow is back, the same job goes out, under the same lease
        fake.online = True
        fake.emit(nev.connected())
        await wait_until(lambda: events_of(bus, "DELIVERY", MessageSent), what="the job sent")
        value = await lease(bus)
        assert value is not None
        assert (value.token, value.parked) == (token, "")
    assert [s.text for s in fake.sent] == [the_job.text]
    assert len(await events_of(bus, "ACCOUNTS", LeaseAcquired)) == 1
    assert len(fake.connect_times) == 1  # no new client: whatsmeow's own reconnect
    (sent,) = await events_of(bus, "DELIVERY", MessageSent)
    assert sent.attempt == 1  # the tries while offline were no attempts


async def test_stream_replaced_after_a_failover_leaves_the_new_owner_alone(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    transport = transport_on(bus, store, fake)
    async with owning(bus, transport) as (owner, _, _):
        # Given the lease passed to another host behind the owner's back (its key removed
        # and taken, as after an expiry while the owner was paused)
        kv = await bus.js.key_value(LEASES.name)
        await kv.delete(KEY)
        newcomer = Lease(bus, "whatsapp", ACCOUNT, "host-b", ttl=10)
        assert await newcomer.try_acquire()
        # When the newcomer's connect replaces the old socket
        fake.emit(nev.stream_replaced())
        await wait_until(lambda: not owner.owning.is_set(), what="the old owner to stop")
    # Then the new owner's lease is untouched: not parked, still its token
    value = await lease(bus)
    assert value is not None
    assert (value.holder, value.token, value.parked) == ("host-b", newcomer.token, "")
    assert await newcomer.renew()
    await newcomer.release()


async def test_stream_replaced_after_a_failover_is_recorded_as_lease_lost(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    async with owning(bus, transport_on(bus, store, fake)) as (owner, _, _):
        await (await bus.js.key_value(LEASES.name)).delete(KEY)
        newcomer = Lease(bus, "whatsapp", ACCOUNT, "host-b", ttl=10)
        assert await newcomer.try_acquire()
        fake.emit(nev.stream_replaced())
        await wait_until(lambda: not owner.owning.is_set(), what="the old owner to stop")
    await newcomer.release()
    (lost,) = await events_of(bus, "ACCOUNTS", LeaseLost)
    assert lost.holder == "host-a"


# -- connect failures ---------------------------------------------------------------------


async def test_a_failing_initial_connect_is_retried_with_backoff_holding_the_lease(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    # Given a network where every dial fails (no DNS)
    fake.connect_errors = [DNS_ERROR] * 100
    transport = transport_on(bus, store, fake)
    async with owning(bus, transport) as (owner, _, _):
        token = (await lease(bus)).token  # type: ignore[union-attr]
        # When the session keeps failing to connect
        await wait_until(lambda: len(fake.connect_times) >= 4, 30, "four connect attempts")
        # Then each retry waited at least half its doubling delay (1, 2, 4 s): no busy loop
        times = fake.connect_times[:4]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert [gap >= least for gap, least in zip(gaps, (0.5, 1.0, 2.0), strict=True)] == [
            True
        ] * 3, gaps
        # And the lease was held throughout: same token, no release/reacquire in between
        value = await lease(bus)
        assert value is not None
        assert (value.token, value.parked) == (token, "")
        assert owner.owning.is_set()
        assert len(await events_of(bus, "ACCOUNTS", LeaseAcquired)) == 1
        assert await events_of(bus, "ACCOUNTS", LeaseReleased) == []
        # And when the network comes back, the next attempt connects and sends
        fake.connect_errors.clear()
        attempts = len(fake.connect_times)
        await wait_until(lambda: len(fake.connect_times) > attempts, 30, "the next attempt")
        the_job = job(ACCOUNT, CHAT, 1, "reconnect")
        await bus.publish(subjects.outbound("whatsapp", ACCOUNT, CHAT), the_job)
        await wait_until(lambda: events_of(bus, "DELIVERY", MessageSent), 30, "the job sent")
    assert [s.text for s in fake.sent] == [the_job.text]


async def test_a_connect_error_that_is_not_the_network_parks_connect_failed(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    fake.connect_errors = ["failed to load device: sql: database is closed"]
    async with owning(bus, transport_on(bus, store, fake)):
        await wait_until(lambda: parked(bus), what="the lease parked")
        assert await parked(bus) == "connect failed: failed to load device: sql: database is closed"
    assert len(fake.connect_times) == 1


def test_connect_errors_are_told_apart() -> None:
    assert is_network_error(DNS_ERROR)
    assert is_network_error("dial tcp 157.240.0.53:443: connect: connection refused")
    assert is_network_error("failed to read frame header: EOF")
    assert not is_network_error("failed to load device: sql: database is closed")


async def test_a_stop_that_blocks_does_not_block_the_owners_exit(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    # Given a Go client whose Stop() never returns (a dial in flight: 55 s observed)
    fake.block_stop = True
    transport = transport_on(bus, store, fake, stop_timeout=0.5)
    async with owning(bus, transport) as (_, stop, task):
        # When the owner is told to stop
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(asyncio.shield(task), 10)
        took = time.monotonic() - started
    # Then it exited while Stop() was still blocked, and released the lease
    assert fake.stop_calls == 1
    assert not fake.unblock_stop.is_set()
    assert took < 10  # measured ~0.6 s: the 0.5 s stop timeout plus the release
    assert await lease(bus) is None
    assert len(await events_of(bus, "ACCOUNTS", LeaseReleased)) == 1


# -- sends ----------------------------------------------------------------------------------


@asynccontextmanager
async def session_on(transport: NeonizeTransport) -> AsyncIterator[Any]:
    async with (
        EventDispatch(Recorder(), name=ACCOUNT) as events,
        transport.session(ACCOUNT, events, receive=True) as session,
    ):
        yield session


def out(text: str = "hi", deadline: float | None = None) -> Outgoing:
    fence = Fence("host-a", 7, time.monotonic() + 30 if deadline is None else deadline)
    return Outgoing(CHAT, text, "job-1", fence)


@pytest.mark.parametrize(
    ("go_error", "kind", "permanent"),
    [
        ("websocket not connected", NotConnectedError, False),
        ("client is nil", NotConnectedError, False),
        ("info query timed out", TransportError, False),
        ("no LID found for 15551110000@s.whatsapp.net from server", TransportError, True),
        ("server returned error 479", TransportError, True),
        ("timed out waiting for message send response", UncertainSendError, False),
        ("something whatsmeow never said before", TransportError, False),
    ],
)
async def test_a_send_error_is_classified_from_the_go_error_string(
    bus: Bus, store: SessionStore, fake: FakeGo, go_error: str, kind: type, permanent: bool
) -> None:
    fake.send_script = [go_error]
    async with session_on(transport_on(bus, store, fake)) as session:
        with pytest.raises(TransportError) as caught:
            await session.send(out())
    assert type(caught.value) is kind
    assert caught.value.permanent is permanent
    assert go_error in str(caught.value)


async def test_a_send_with_no_answer_is_uncertain_after_the_send_timeout(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    # Given whatsmeow waiting for the server's ack (it waits 75 s)
    fake.send_script = [BLOCK]
    async with session_on(transport_on(bus, store, fake, send_timeout=0.5)) as session:
        started = time.monotonic()
        with pytest.raises(UncertainSendError, match="may have been sent"):
            await session.send(out())
        took = time.monotonic() - started
    assert 0.5 <= took < 10  # measured ~0.5 s


async def test_a_send_past_its_fence_deadline_never_reaches_go(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    async with session_on(transport_on(bus, store, fake)) as session:
        with pytest.raises(StaleFenceError):
            await session.send(out(deadline=time.monotonic() - 0.01))
    assert fake.send_calls == 0


async def test_a_send_is_plain_text_and_returns_whatsapps_id(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    async with session_on(transport_on(bus, store, fake)) as session:
        sent_id = await session.send(out("call @15550000002 about x@g.us"))
    assert sent_id == "3EB0FAKE000001"
    (sent,) = fake.sent
    # model text as `conversation`: no mention parsing, no group look-ups
    assert sent.message.conversation == "call @15550000002 about x@g.us"
    assert not sent.message.HasField("extendedTextMessage")


async def test_error_463_ends_the_session_banned_and_the_job_waits(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    fake.send_script = ["server returned error 463"]
    async with session_on(transport_on(bus, store, fake)) as session:
        with pytest.raises(TransportError) as caught:
            await session.send(out())
        end = await asyncio.wait_for(session.ended(), 5)
    assert not caught.value.permanent  # the job waits for the next owner
    assert end.state == "banned"
    assert "463" in end.reason
    assert end.until is None  # an operator resumes it


async def test_an_uncertain_send_under_the_owner_is_recorded_uncertain(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    fake.send_script = ["timed out waiting for message send response"]
    async with owning(bus, transport_on(bus, store, fake)):
        the_job = job(ACCOUNT, CHAT, 1, "uncertain")
        await bus.publish(subjects.outbound("whatsapp", ACCOUNT, CHAT), the_job)
        await wait_until(lambda: events_of(bus, "DELIVERY", MessageSent), 30, "the job sent")
    # Recorded uncertain at once (not a plain failure), then resent (DELIVERY_UNCERTAIN
    # resend): the fake network saw the timed-out attempt go nowhere and the resend arrive
    (uncertain,) = await events_of(bus, "DELIVERY", DeliveryUncertain)
    assert uncertain.job_id == the_job.job_id
    assert uncertain.resolution == "resend"
    assert await events_of(bus, "DELIVERY", DeliveryFailed) == []
    assert [s.text for s in fake.sent] == [the_job.text]


# -- the store, the seam, the settings ------------------------------------------------------


async def test_a_missing_device_ends_the_session_needing_pairing_without_a_client(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    await DeviceRegistry(bus, "whatsapp").record(ACCOUNT, "15550009999:4@s.whatsapp.net")
    built: list[str] = []

    def build(name: str, jid: Any, uuid: str) -> Any:
        built.append(uuid)
        return new_client(name, jid, uuid)

    transport = NeonizeTransport(bus, store, client_factory=build)
    async with session_on(transport) as session:
        end = await asyncio.wait_for(session.ended(), 5)
    assert end.state == "needs_pairing"
    assert "is not in the session store" in end.reason
    assert built == []


async def test_svc_run_whatsapp_parks_a_device_missing_from_the_store_and_keeps_running(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, tmp_path: Path
) -> None:
    # Given a device record whose JID is not in the (real, SQLite) store: resuming it
    # would abort the interpreter
    path = tmp_path / "empty.sqlite"
    await devices_in_store(SessionStore(path=path))
    await DeviceRegistry(bus, "whatsapp").record(ACCOUNT, "15550009999:4@s.whatsapp.net")
    # When a real whatsapp process owns the account
    proc = processes.start(
        "run",
        "whatsapp",
        NATS_URL=nats_server.url,
        WHATSAPP_TRANSPORT="neonize",
        WHATSAPP_ACCOUNTS=ACCOUNT,
        WHATSAPP_STORE=str(path),
    )
    # Then the account is parked as needing pairing, and the process lives on
    await wait_until(lambda: parked(bus), 60, "the account parked")
    assert "needs pairing" in await parked(bus)
    assert "is not in the session store" in await parked(bus)
    assert proc.poll() is None
    # And it exits cleanly on SIGTERM
    assert processes.stop(proc) == 0
    assert "neonize connecting" not in processes.log(proc)


async def test_a_real_client_to_an_unresolvable_host_fails_fast_and_is_retried(
    bus: Bus, store: SessionStore
) -> None:
    try:
        await asyncio.wait_for(
            asyncio.to_thread(socket.getaddrinfo, "web.whatsapp.com", 443), timeout=5
        )
    except (OSError, TimeoutError):
        pass
    else:
        pytest.skip("web.whatsapp.com resolves here: this test needs a box without WhatsApp DNS")
    # Given the real Go library, a real store and device, and no DNS
    transport = NeonizeTransport(bus, store, NeonizeSettings(stop_timeout=5))
    recorder = Recorder()
    started = time.monotonic()
    async with (
        EventDispatch(recorder, name=ACCOUNT) as events,
        transport.session(ACCOUNT, events, receive=True) as session,
    ):
        # Then the failed dial comes back at once as a Disconnected, and the session lives
        await wait_until(lambda: recorder.of(Disconnected), 10, "the failed connect")
        took = time.monotonic() - started
        assert not session._ended.is_set()
    (first, *_) = recorder.of(Disconnected)
    assert isinstance(first, Disconnected)
    assert "failed to dial" in first.reason
    assert took < 10  # measured: the dial fails in ~4 ms, the whole start in ~0.1 s


def test_the_bridge_seam_takes_only_test_modules(caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ConfigError, match=r"takes only 'tests\.<module>:<callable>'"):
        load_bridge("services.whatsapp.neonize:new_client")
    with pytest.raises(ConfigError, match="cannot be loaded"):
        load_bridge("tests.whatsapp.fake_go:no_such_installer")
    with caplog.at_level(logging.WARNING):
        installer = load_bridge("tests.whatsapp.fake_go:FakeGo")
    assert installer is FakeGo
    assert "TEST SEAM ACTIVE" in caplog.text


def test_neonize_settings_default_the_ttl_and_refuse_one_too_short(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    settings = load_settings({"WHATSAPP_TRANSPORT": "neonize"})
    assert settings.lease_ttl == 30
    assert settings.neonize == NeonizeSettings()
    check_role(settings, "whatsapp")
    short = load_settings({"WHATSAPP_TRANSPORT": "neonize", "WHATSAPP_LEASE_TTL": "10"})
    with pytest.raises(ConfigError, match="set WHATSAPP_LEASE_TTL to at least 25"):
        check_role(short, "whatsapp")
    with pytest.raises(ConfigError, match="NEONIZE_BOT_TAG"):
        load_settings({"NEONIZE_BOT_TAG": "maybe"})
    # A bad test seam is refused before connecting
    monkeypatch.setenv(BRIDGE_ENV, "os:getcwd")
    with pytest.raises(ConfigError, match=BRIDGE_ENV):
        check_role(settings, "whatsapp")
    assert load_settings({}).lease_ttl == 10  # the sim keeps its default
    # A person's pace by default (WhatsApp bans bulk senders); the sim has no budget
    assert settings.delivery.limit_for("default") == RateLimit(per_minute=12, burst=3)
    assert load_settings({}).delivery.limit_for("default") is None


# -- read receipts, typing and last_heard (issue 14 item 4, ADR 0025) ------------------


async def test_presence_commands_reach_whatsmeow_as_mark_read_and_chat_presence(
    bus: Bus, store: SessionStore, fake: FakeGo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    # Given an owned neonize account
    transport = transport_on(bus, store, fake)
    async with owning(bus, transport) as (owner, _, _):
        await wait_until(lambda: owner.owning.is_set(), what="owning")

        async def command(action: PresenceAction, ids: tuple[str, ...] = ()) -> None:
            cmd = PresenceCommand(chat=CHAT, action=action, message_ids=list(ids), sender=CHAT)
            await bus.nc.publish(subjects.presence("whatsapp", ACCOUNT, CHAT), encode(cmd))

        # When a malformed command arrives first, then read, typing, paused (as at a
        # failed turn)
        await bus.nc.publish(subjects.presence("whatsapp", ACCOUNT, CHAT), b"\x00not json")
        await command("read", ("3EB0USER1",))
        await command("typing")
        await command("paused")
        # Then the bad one is one log line, and whatsmeow is called in order: MarkRead,
        # then SendChatPresence twice
        await wait_until(lambda: len(fake.presence) == 3, what="three presence calls")
        (bad,) = [r for r in caplog.records if r.getMessage() == "bad presence command dropped"]
        assert "\n" not in str(bad.__dict__.get("error", ""))
        assert fake.presence == [
            PresenceCall("read", CHAT, ("3EB0USER1",), CHAT),
            PresenceCall("typing", CHAT),
            PresenceCall("paused", CHAT),
        ]
        # When whatsmeow refuses one, it is logged and the next one still goes through
        fake.presence_error = "websocket not connected"
        await command("typing")
        await wait_until(
            lambda: any("presence not shown" in r.getMessage() for r in caplog.records),
            what="the refusal logged",
        )
        fake.presence_error = ""
        await command("paused")
        await wait_until(lambda: len(fake.presence) == 4, what="the next presence call")
        assert fake.presence[-1] == PresenceCall("paused", CHAT)
        assert owner.owning.is_set()


async def test_last_heard_follows_what_the_network_says_not_our_own_timeouts(
    bus: Bus, store: SessionStore, fake: FakeGo
) -> None:
    transport = transport_on(bus, store, fake)
    recorder = Recorder()
    async with (
        EventDispatch(recorder, name=ACCOUNT) as events,
        transport.session(ACCOUNT, events, receive=True) as session,
    ):
        # Given a connected session: Connected was heard
        await wait_until(lambda: session.last_heard() is not None, what="Connected heard")
        connected_at = session.last_heard()
        # When whatsmeow reports a keepalive timeout (its own verdict: nothing heard)
        fake.emit(nev.keepalive_timeout())
        await wait_until(lambda: recorder.of(Disconnected), what="the timeout handled")
        assert session.last_heard() == connected_at
        # ... and then its keepalive is answered again (an event the channel layer
        # drops): the network spoke
        fake.emit(nev.keepalive_restored())
        await wait_until(lambda: session.last_heard() != connected_at, what="keepalive heard")
        heard = session.last_heard()
        assert heard is not None
        assert connected_at is not None
        assert heard > connected_at
        # And an acknowledged send counts as hearing the server
        await session.send(out())
        assert session.last_heard() > heard
