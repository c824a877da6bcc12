"""The fake WhatsApp network the failover tests run on: real `NewAClient`s, their Go
bridge swapped for `FakeBridge`, a real nats-server playing WhatsApp's servers."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.runtime.bus import Bus
from services.runtime.settings import SessionStore
from services.whatsapp.neonize_store import (
    client_uuid,
    device_jid,
    devices_in_store,
    neonize_module,
    store_name,
)
from tests.conftest import wait_until
from tests.whatsapp.fake_network import (
    DIAL_FAILED,
    NOT_CONNECTED,
    FakeWhatsApp,
    Record,
    install,
    one_socket_at_a_time,
)
from tests.whatsapp.neonize_events import ALICE
from tests.whatsapp.test_neonize_store import add_device

SALES = "15550000001:7@s.whatsapp.net"
GONE = "15550009999:4@s.whatsapp.net"
client_module = neonize_module("neonize.aioze.client")
nz = neonize_module("neonize.proto.Neonize_pb2")
wa = neonize_module("neonize.proto.waE2E.WAWebProtobufsE2E_pb2")
SendMessageError = neonize_module("neonize.exc").SendMessageError
NeonizeError = neonize_module("neonize.exc").NeonizeError


class Phone:
    """One real NewAClient on the fake network, and the events it got, in order."""

    def __init__(self, store: SessionStore, device: str) -> None:
        self.client = client_module.NewAClient(
            store_name(store), jid=device_jid(device), uuid=client_uuid("sales")
        )
        install(self.client, "sales")
        self.events: list[Any] = []
        for kind in (nz.Connected, nz.StreamReplaced, nz.Message):
            self.client.event(kind)(self._on)

    async def _on(self, _: Any, event: Any) -> None:
        self.events.append(event)

    def got(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]

    async def connect(self) -> None:
        # neonize sets its events' loop once per process: point it at this test's loop
        neonize_module("neonize.aioze.events").event_global_loop = asyncio.get_running_loop()
        await self.client.connect()
        await wait_until(lambda: self.got(nz.Connected), what="Connected")

    async def send(self, text: str) -> str:
        response = await self.client.send_message(ALICE, wa.Message(conversation=text))
        return str(response.ID)

    async def stop(self) -> None:
        await asyncio.wait_for(self.client.stop(), 10)
        if self.client.connect_task is not None:
            await asyncio.wait_for(self.client.connect_task, 10)


@pytest.fixture
async def net(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[FakeWhatsApp]:
    monkeypatch.setenv("NATS_URL", bus.nc.connected_url.geturl())  # type: ignore[union-attr]
    async with FakeWhatsApp(bus) as network:
        yield network


@pytest.fixture
async def store(tmp_path: Path) -> SessionStore:
    store = SessionStore(path=tmp_path / "whatsapp.sqlite")
    await devices_in_store(store)  # the tables exist, as after any open
    add_device(store, SALES)
    return store


async def test_a_connected_phone_sends_and_receives(net: FakeWhatsApp, store: SessionStore) -> None:
    # Given a paired device connected to the network
    phone = Phone(store, SALES)
    await phone.connect()
    try:
        # When a user writes to it and it answers
        await net.user_says(SALES, ALICE, "hello", "3EB0USER0001", quoted_id="3EB0OLD")
        await wait_until(lambda: phone.got(nz.Message), what="the user's message")
        sent_id = await phone.send("hi Alice")
    finally:
        await phone.stop()
    # Then the client got a real Message event of the user's text and quote
    (message,) = phone.got(nz.Message)
    assert message.Info.ID == "3EB0USER0001"
    assert message.Info.MessageSource.Chat.User == ALICE.split("@")[0]
    assert message.Message.extendedTextMessage.text == "hello"
    assert message.Message.extendedTextMessage.contextInfo.stanzaID == "3EB0OLD"
    # And the network recorded its connect and the send, with the id it returned
    connected, sent = await net.records(SALES)
    assert (connected.kind, sent.kind) == ("connected", "sent")
    assert connected.socket == sent.socket
    assert sent.pid == os.getpid()
    assert (sent.chat, sent.text, sent.message_id) == (ALICE, "hi Alice", sent_id)


async def test_a_second_connect_replaces_the_first_socket(
    net: FakeWhatsApp, store: SessionStore
) -> None:
    first, second = Phone(store, SALES), Phone(store, SALES)
    await first.connect()
    try:
        await first.send("before")
        # When another client connects the same device
        await second.connect()
        # Then the first one is told StreamReplaced, and cut off
        await wait_until(lambda: first.got(nz.StreamReplaced), what="StreamReplaced")
        with pytest.raises(SendMessageError, match=NOT_CONNECTED):
            await first.send("too late")
        await second.send("after")
        assert not second.got(nz.StreamReplaced)
    finally:
        await first.stop()
        await second.stop()
    # And the log shows one socket at a time: the late send was never accepted
    records = await net.records(SALES)
    assert [(r.kind, r.text) for r in records] == [
        ("connected", ""),
        ("sent", "before"),
        ("connected", ""),
        ("sent", "after"),
    ]
    one_socket_at_a_time(records)


async def test_what_users_send_while_no_socket_is_connected_is_kept(
    net: FakeWhatsApp, store: SessionStore
) -> None:
    # Given messages sent while the device is offline (before any connect)
    await net.user_says(SALES, ALICE, "one", "3EB0USER0001")
    await net.user_says(SALES, ALICE, "two", "3EB0USER0002")
    phone = Phone(store, SALES)
    await phone.connect()
    try:
        await wait_until(lambda: len(phone.got(nz.Message)) == 2, what="both messages")
        # And one sent after that socket stopped
        await phone.stop()
        await net.user_says(SALES, ALICE, "three", "3EB0USER0003")
        later = Phone(store, SALES)
        await later.connect()
        await wait_until(lambda: later.got(nz.Message), what="the third message")
        await later.stop()
    finally:
        await phone.stop()
    # Then each was handed to the next socket, in order, once
    assert [m.Message.conversation for m in phone.got(nz.Message)] == ["one", "two"]
    assert [m.Message.conversation for m in later.got(nz.Message)] == ["three"]
    # And the stopped socket's own Connected came first, before its messages
    assert isinstance(phone.events[0], nz.Connected)


async def test_a_message_pushed_to_a_dead_socket_goes_to_the_next_one(
    net: FakeWhatsApp, store: SessionStore
) -> None:
    # Given a connected socket whose process then dies (no stop, no ack)
    dead = Phone(store, SALES)
    await dead.connect()
    await dead.client._NewAClient__client.die()
    # When a user writes (the network pushes it to the dead socket, as it still looks up)
    await net.user_says(SALES, ALICE, "anyone there?", "3EB0USER0001")
    dead_socket = dead.client._NewAClient__client.socket
    await wait_until(
        lambda: [pushed for _, pushed in net.pending.get(SALES, [])] == [{dead_socket}],
        what="the message pushed to the dead socket",
    )
    # Then the next socket of the device gets it, once
    later = Phone(store, SALES)
    await later.connect()
    try:
        await wait_until(lambda: later.got(nz.Message), what="the unacked message")
    finally:
        await later.stop()
        await dead.stop()
    assert [m.Message.conversation for m in later.got(nz.Message)] == ["anyone there?"]
    assert not dead.got(nz.Message)
    assert net.pending[SALES] == []  # acked by the socket that took it


async def test_a_connect_with_no_network_fails_like_a_refused_dial(
    bus: Bus, store: SessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NATS_URL", bus.nc.connected_url.geturl())  # type: ignore[union-attr]
    phone = Phone(store, SALES)  # no FakeWhatsApp answers: the servers are down
    neonize_module("neonize.aioze.events").event_global_loop = asyncio.get_running_loop()
    task = await phone.client.connect()
    with pytest.raises(NeonizeError, match=DIAL_FAILED):
        await asyncio.wait_for(task, 10)


async def test_scripted_send_errors_come_back_as_the_go_error(
    net: FakeWhatsApp, store: SessionStore
) -> None:
    phone = Phone(store, SALES)
    await phone.connect()
    try:
        net.fail_next_sends(SALES, "server returned error 463")
        with pytest.raises(SendMessageError, match="error 463"):
            await phone.send("refused")
        await phone.send("accepted")
    finally:
        await phone.stop()
    assert [r.text for r in await net.sends(SALES)] == ["accepted"]


async def test_a_slow_answer_leaves_the_sender_unsure_but_the_message_is_out(
    net: FakeWhatsApp, store: SessionStore
) -> None:
    phone = Phone(store, SALES)
    await phone.connect()
    try:
        net.slow_next_sends(SALES, 30)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(phone.send("sent, but who knows"), 1)
        await phone.send("next")  # answered at once
    finally:
        await phone.stop()
    assert [r.text for r in await net.sends(SALES)] == ["sent, but who knows", "next"]


def test_resuming_a_device_missing_from_the_store_aborts_like_whatsmeow(tmp_path: Path) -> None:
    # In a subprocess: the fake's answer, like whatsmeow's Go panic, is to abort it.
    script = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from services.runtime.settings import SessionStore
        from services.whatsapp.neonize_store import devices_in_store
        from tests.whatsapp.test_fake_network import Phone

        async def main():
            store = SessionStore(path=Path({str(tmp_path / "wa.sqlite")!r}))
            await devices_in_store(store)
            phone = Phone(store, {GONE!r})
            await (await phone.client.connect())

        asyncio.run(main())
        """
    )
    env = {**os.environ, "NATS_URL": "nats://127.0.0.1:1"}  # never reached
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=env,
        cwd=Path(__file__).parents[2],
        capture_output=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == -6, done.stderr.decode()[-2000:]  # SIGABRT (exit 134 in a shell)
    assert f"device {GONE} is not in the store" in done.stderr.decode()


def test_the_log_check_catches_a_send_from_a_replaced_socket() -> None:
    log = [
        Record(kind="connected", device=SALES, socket="a", pid=1),
        Record(kind="connected", device=SALES, socket="b", pid=2),
        Record(kind="sent", device=SALES, socket="a", pid=1, text="late"),
    ]
    with pytest.raises(AssertionError, match="socket a"):
        one_socket_at_a_time(log)
    one_socket_at_a_time(log[:2])
