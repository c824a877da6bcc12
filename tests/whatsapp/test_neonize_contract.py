"""The neonize transport passes the transport contract (tests/channel/transport_contract.py):
the real `NewAClient`, its Go bridge replaced by `FakeGo`, over a real session store and a
real nats-server. Events enter through neonize's own Go->Python entry point."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from services.channel.devices import DeviceRegistry
from services.runtime.bus import Bus
from services.runtime.settings import NeonizeSettings, SessionStore
from services.whatsapp.neonize import NeonizeTransport, new_client, phone_jid
from services.whatsapp.neonize_store import devices_in_store, neonize_module
from tests.channel.transport_contract import (
    ACCOUNT,
    Network,
    Recorder,
    SentView,
    TransportContract,
)
from tests.whatsapp import neonize_events as nev
from tests.whatsapp.fake_go import FakeGo
from tests.whatsapp.test_neonize_store import add_device

DEVICE = "15550000001:7@s.whatsapp.net"
nz = neonize_module("neonize.proto.Neonize_pb2")
_STATUS = {"delivered": nz.Receipt.DELIVERED, "read": nz.Receipt.READ, "played": nz.Receipt.PLAYED}


class NeonizeNetworkDriver:
    """WhatsApp's side for the contract: users' messages, receipts and signals enter the
    real client through its event entry point; what it sent is what FakeGo recorded."""

    def __init__(self, bus: Bus, store: SessionStore, fake: FakeGo) -> None:
        self.bus = bus
        self.store = store
        self.fake = fake
        self.built: list[str] = []

    def transport(self) -> NeonizeTransport:
        def build(name: str, jid: Any, uuid: str) -> Any:
            self.built.append(uuid)
            return new_client(name, jid, uuid)

        def install(client: Any, account: str) -> None:
            client._NewAClient__client = self.fake

        return NeonizeTransport(
            self.bus, self.store, NeonizeSettings(), client_factory=build, bridge=install
        )

    def own_jid(self, account: str) -> str:
        return phone_jid(DEVICE)

    async def user_message(
        self,
        account: str,
        *,
        chat: str,
        sender: str,
        text: str,
        message_id: str,
        mentions: tuple[str, ...] = (),
        quoted_id: str = "",
        sender_alt: str = "",
    ) -> None:
        body = (
            nev.extended_body(text, mentions=mentions, quoted_id=quoted_id)
            if mentions or quoted_id
            else nev.text_body(text)
        )
        ev = nev.message(
            body, chat=chat, sender=sender, message_id=message_id, sender_alt=sender_alt
        )
        self.fake.emit(ev)

    async def receipt(self, account: str, chat: str, ids: list[str], status: str) -> None:
        self.fake.emit(nev.receipt(tuple(ids), _STATUS[status], chat=chat))

    async def end_signal(self, account: str, kind: str) -> None:
        signals = {
            "logged_out": nev.logged_out(),
            "replaced": nev.stream_replaced(),
            "banned": nev.temporary_ban(),
        }
        self.fake.emit(signals[kind])

    async def sent(self, account: str) -> list[SentView]:
        return [SentView(s.chat, s.text, s.reply_to) for s in self.fake.sent]


@pytest.fixture
async def paired_store(bus: Bus, tmp_path: Path) -> SessionStore:
    """A session store holding the contract account's device, recorded for every host."""
    store = SessionStore(path=tmp_path / "whatsapp.sqlite")
    await devices_in_store(store)
    add_device(store, DEVICE)
    await DeviceRegistry(bus, "whatsapp").record(ACCOUNT, DEVICE, by="test")
    return store


class TestNeonizeTransport(TransportContract):
    @pytest.fixture
    async def network(  # type: ignore[override]
        self, bus: Bus, paired_store: SessionStore
    ) -> AsyncIterator[Network]:
        fake = FakeGo()
        try:
            yield NeonizeNetworkDriver(bus, paired_store, fake)
        finally:
            fake.close()

    async def test_each_session_is_a_fresh_client_keyed_by_the_account(
        self, bus: Bus, network: Network
    ) -> None:
        driver = network
        assert isinstance(driver, NeonizeNetworkDriver)
        for _ in range(2):
            async with self.attached(bus, network, Recorder()):
                pass
        assert driver.built == ["switchboard-whatsapp-contract"] * 2
        # resumed by the device's JID from the store (never "the first device")
        _name, _uuid, jidbuf = driver.fake.neonize_args[:3]
        assert nz.JID.FromString(jidbuf).User == "15550000001:7"
        assert driver.fake.stop_calls == 2
