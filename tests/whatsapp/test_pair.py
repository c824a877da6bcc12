"""`svc whatsapp pair`: the real neonize client, its Go bridge replaced by a script of
what whatsmeow does (QR codes, a pairing code, the phone's confirmation), over a real
session store and a real nats-server."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest

from contracts.events import AccountResumed
from contracts.streams import LEASES
from services.channel.devices import DeviceRegistry
from services.ops.pair import PairingError, new_pairing_client, pair
from services.runtime.bus import Bus, connect
from services.runtime.lease import Lease, read_lease
from services.runtime.nats_server import EmbeddedNats
from services.runtime.settings import SessionStore
from services.whatsapp.neonize_store import devices_in_store, neonize_module
from tests.conftest import Processes, arun_svc, read_stream, wait_until
from tests.whatsapp.fake_go import FakeGo
from tests.whatsapp.test_neonize_store import add_device

SALES = "15550000001:7@s.whatsapp.net"
RENEWED = "15550000001:8@s.whatsapp.net"
proto = neonize_module("neonize.proto.Neonize_pb2")


def real_client_on(fake: FakeGo, built: list[str]) -> Callable[[str, str], Any]:
    """The production factory's NewAClient, with only its Go bridge swapped."""

    def build(name: str, uuid: str) -> Any:
        built.append(uuid)
        client = new_pairing_client(name, uuid)
        client._NewAClient__client = fake
        return client

    return build


@pytest.fixture
async def store(tmp_path: Path) -> SessionStore:
    store = SessionStore(path=tmp_path / "whatsapp.sqlite")
    await devices_in_store(store)  # the tables exist, as after any open
    return store


async def _pair(bus: Bus, store: SessionStore, fake: FakeGo, **kw: Any) -> tuple[Any, list[str]]:
    shown: list[str] = []
    built: list[str] = []
    kw.setdefault("timeout", 30)
    result = await pair(
        bus,
        store,
        "sales",
        holder="test-host-pair",
        lease_ttl=4,
        show=shown.append,
        client_factory=real_client_on(fake, built),
        **kw,
    )
    return result, shown


async def _lease_is_free(bus: Bus) -> bool:
    return await read_lease(await bus.js.key_value(LEASES.name), "whatsapp.sales") is None


async def test_a_qr_pairing_prints_each_code_and_records_the_device(
    bus: Bus, store: SessionStore
) -> None:
    # Given a phone that scans the second code
    fake = FakeGo(store, codes=2, device=SALES)
    # When the account is paired
    paired, shown = await _pair(bus, store, fake)
    # Then each rotating code was printed as a terminal QR
    prompts = [line for line in shown if "scan this QR code" in line]
    assert [p.split("(")[1].split(";")[0] for p in prompts] == ["1", "2"]
    assert sum("█" in line or "▀" in line for line in shown) == 2
    # And the device is recorded for every host, the outcome one masked line
    assert paired.line() == "sales: paired as 1555…01:7@s.whatsapp.net"
    record = await DeviceRegistry(bus, "whatsapp").get("sales")
    assert record is not None
    assert (record.device_id, record.paired_by) == (SALES, "test-host-pair")
    # And the client was a new device keyed by the account (never the store), stopped,
    # and the lease was given back
    name, uuid, _, _, new_device = fake.neonize_args[:5]
    assert (name, uuid, new_device) == (str(store.path).encode(), b"switchboard-whatsapp-sales", 1)
    assert fake.stopped.is_set()
    assert await _lease_is_free(bus)


async def test_pairing_first_on_a_fresh_server_provisions_what_it_writes(
    nats_server: EmbeddedNats, store: SessionStore
) -> None:
    # Given a server no role has started on yet (no streams, no `leases`, no `devices`):
    # the runbook pairs before the first `svc run whatsapp`
    async with connect(nats_server.url, name="test-fresh", timeout=5) as fresh:
        fake = FakeGo(store, codes=1, device=SALES)
        # When an account is paired there
        paired, _ = await _pair(fresh, store, fake)
        # Then the pairing went through and any host finds the device
        assert paired.device_id == SALES
        record = await DeviceRegistry(fresh, "whatsapp").get("sales")
        assert record is not None
        assert record.device_id == SALES
        assert await _lease_is_free(fresh)


async def test_pairing_by_phone_prints_the_code_instead_of_a_qr(
    bus: Bus, store: SessionStore
) -> None:
    fake = FakeGo(store, codes=1, device=SALES)
    fake.phone_mode = True
    paired, shown = await _pair(bus, store, fake, phone="+1 555 000 0001")
    # The code was asked for after the first QR (before it neonize has no client)
    assert fake.phone == "15550000001"
    assert any("pairing code ABCD-1234" in line for line in shown)
    assert not any("█" in line or "▀" in line for line in shown)
    assert paired.device_id == SALES


async def test_no_confirmation_times_out_and_records_nothing(bus: Bus, store: SessionStore) -> None:
    fake = FakeGo(store, codes=6, device=None)  # the phone never scans
    with pytest.raises(PairingError) as caught:
        await _pair(bus, store, fake, timeout=1)
    assert str(caught.value).startswith("sales: timed out after 1 s")
    assert await DeviceRegistry(bus, "whatsapp").get("sales") is None
    assert fake.stopped.is_set()
    assert await _lease_is_free(bus)


async def test_an_already_paired_account_is_refused_without_force(
    bus: Bus, store: SessionStore
) -> None:
    add_device(store, SALES)
    await DeviceRegistry(bus, "whatsapp").record("sales", SALES, by="host-a")
    fake = FakeGo(store, codes=1, device=RENEWED)
    built: list[str] = []
    with pytest.raises(PairingError) as caught:
        await pair(
            bus,
            store,
            "sales",
            holder="h",
            lease_ttl=4,
            timeout=5,
            client_factory=real_client_on(fake, built),
        )
    assert str(caught.value) == (
        "sales: already paired as 1555…01:7@s.whatsapp.net: --force to re-pair"
        " (removes that device)"
    )
    assert built == []  # no client was built
    assert await devices_in_store(store) == {SALES}


async def test_force_removes_the_old_device_and_pairs_a_new_one(
    bus: Bus, store: SessionStore
) -> None:
    add_device(store, SALES)
    await DeviceRegistry(bus, "whatsapp").record("sales", SALES, by="host-a")
    fake = FakeGo(store, codes=1, device=RENEWED)
    paired, shown = await _pair(bus, store, fake, force=True)
    assert "sales: removed the old device 1555…01:7@s.whatsapp.net" in shown
    assert paired.device_id == RENEWED
    assert await devices_in_store(store) == {RENEWED}
    record = await DeviceRegistry(bus, "whatsapp").get("sales")
    assert record is not None
    assert record.device_id == RENEWED


async def test_an_account_owned_by_another_holder_is_refused_and_left_alone(
    bus: Bus, store: SessionStore
) -> None:
    # Given a running owner
    owner = Lease(bus, "whatsapp", "sales", "host-b-42-whatsapp-abc", ttl=10)
    assert await owner.try_acquire()
    token = owner.token
    fake = FakeGo(store, codes=1, device=SALES)
    built: list[str] = []
    # When someone pairs its account
    with pytest.raises(PairingError) as caught:
        await pair(
            bus,
            store,
            "sales",
            holder="h",
            lease_ttl=4,
            timeout=5,
            client_factory=real_client_on(fake, built),
        )
    # Then it is refused in one line naming the owner and what to do
    message = str(caught.value)
    assert "owned by host-b-42-whatsapp-abc" in message
    assert "svc accounts handover sales" in message
    # And the owner was not disturbed: its lease is still its own
    assert built == []
    assert await owner.renew()
    assert owner.token == token
    await owner.release()


async def test_a_parked_account_is_taken_over_to_pair_it(bus: Bus, store: SessionStore) -> None:
    # Given an account its worker parked (the device was logged out)
    worker = Lease(bus, "whatsapp", "sales", "host-b-42-whatsapp-abc", ttl=10)
    assert await worker.try_acquire()
    assert await worker.park("needs_pairing: logged out")
    fake = FakeGo(store, codes=1, device=SALES)
    # When it is paired
    paired, _ = await _pair(bus, store, fake, actor="alice")
    # Then the parked marker is cleared (recorded as a resume) and the lease is free again
    assert paired.device_id == SALES
    assert await _lease_is_free(bus)
    resumed = [e for _, e in await read_stream(bus, "ACCOUNTS") if isinstance(e, AccountResumed)]
    assert [(e.account, e.actor, e.reason) for e in resumed] == [
        ("sales", "alice", "svc whatsapp pair")
    ]


async def test_pairing_a_parked_account_never_frees_the_key_before_it_holds_it(
    bus: Bus, store: SessionStore
) -> None:
    # Given a parked account, and every write to its lease key watched (a delete there
    # wakes the standby workers: one would take the account, find no device, park it)
    worker = Lease(bus, "whatsapp", "sales", "host-b-42-whatsapp-abc", ttl=10)
    assert await worker.try_acquire()
    assert await worker.park("needs_pairing: logged out")
    writes: list[tuple[str, str]] = []

    async def seen(msg: Any) -> None:
        op = (msg.headers or {}).get("KV-Operation", "PUT")
        holder = msgspec.json.decode(msg.data).get("holder", "") if msg.data else ""
        writes.append((op, holder))

    sub = await bus.nc.subscribe(f"$KV.{LEASES.name}.whatsapp.sales", cb=seen)
    try:
        # When it is paired
        await _pair(bus, store, FakeGo(store, codes=1, device=SALES), actor="alice")
        await wait_until(lambda: bool(writes) and writes[-1][0] == "DEL", what="the release")
    finally:
        await sub.unsubscribe()
    # Then the pairing's lease replaced the marker in place; only its release frees the key
    assert writes[0] == ("PUT", "test-host-pair")
    assert [op for op, _ in writes].count("DEL") == 1


async def test_svc_whatsapp_pair_refuses_in_one_line(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, store: SessionStore
) -> None:
    add_device(store, SALES)
    await DeviceRegistry(bus, "whatsapp").record("sales", SALES, by="host-a")
    env = processes.env(NATS_URL=nats_server.url, WHATSAPP_STORE=str(store.path))
    refused = await arun_svc("whatsapp", "pair", "sales", env=env)
    assert refused.returncode == 1
    assert refused.stderr.decode().splitlines() == [
        "svc: sales: already paired as 1555…01:7@s.whatsapp.net: --force to re-pair"
        " (removes that device)"
    ]
    bad_phone = await arun_svc("whatsapp", "pair", "sales", "--phone", "12", env=env)
    assert bad_phone.returncode == 2
    assert "is not an E.164 number" in bad_phone.stderr.decode()
    bad_store = await arun_svc(
        "whatsapp", "pair", "sales", env={**env, "WHATSAPP_STORE": "postgres://u:hunter2@/x"}
    )
    assert bad_store.returncode == 2
    assert "hunter2" not in bad_store.stderr.decode()
