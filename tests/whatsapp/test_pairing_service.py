"""The whatsapp worker's pairing service (issue 18): the CLI's pairing procedure run for
the console, on a real nats-server and session store, with the real neonize client whose
Go bridge plays whatsmeow (tests/whatsapp/fake_go.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import msgspec
import pytest

from contracts.events import PairingFinished, PairingStarted
from contracts.pairing import PairingStart, start_subject
from contracts.streams import LEASES
from services.ops.pair import PairingRefusedError, pairing_state, start_pairing
from services.runtime.bus import Bus
from services.runtime.lease import read_lease
from services.runtime.settings import SessionStore
from services.whatsapp.neonize_store import devices_in_store
from services.whatsapp.pairing import pair
from services.whatsapp.pairing_service import START_WAIT, PairingService
from tests.conftest import read_stream, wait_until
from tests.whatsapp.fake_go import FakeGo
from tests.whatsapp.test_pair import SALES, real_client_on


@pytest.fixture
async def store(tmp_path: Path) -> SessionStore:
    store = SessionStore(path=tmp_path / "whatsapp.sqlite")
    await devices_in_store(store)
    return store


async def pairing_events(bus: Bus) -> list[PairingStarted | PairingFinished]:
    return [
        e
        for _, e in await read_stream(bus, "ACCOUNTS")
        if isinstance(e, PairingStarted | PairingFinished)
    ]


class Running:
    """A PairingService running on `bus` until `stop` is set."""

    def __init__(self, bus: Bus, store: SessionStore, fake: FakeGo) -> None:
        self.service = PairingService(
            bus, store, "host-a-1-pair-abc", lease_ttl=4, client_factory=real_client_on(fake, [])
        )
        self.stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None


@pytest.fixture
async def running(bus: Bus, store: SessionStore) -> AsyncIterator[tuple[Running, FakeGo]]:
    fake = FakeGo(store, codes=6, device=None)  # whatsmeow rotating codes, no phone yet
    service = Running(bus, store, fake)
    service.task = asyncio.create_task(service.service.run(service.stop))
    await wait_until(lambda: _serving(bus), 10, "the pairing service subscribed")
    try:
        yield service, fake
    finally:
        service.stop.set()
        await service.task
        fake.close()


async def _serving(bus: Bus) -> bool:
    try:
        await bus.nc.request(start_subject("whatsapp"), b"{", timeout=1)
    except Exception:
        return False
    return True


async def test_the_cli_procedure_records_the_start_and_the_outcome_with_the_actor(
    bus: Bus, store: SessionStore
) -> None:
    fake = FakeGo(store, codes=1, device=SALES)
    await pair(
        bus,
        store,
        "sales",
        holder="h",
        lease_ttl=4,
        timeout=30,
        actor="alice",
        show=lambda _: None,
        client_factory=real_client_on(fake, []),
    )
    started, finished = await pairing_events(bus)
    assert isinstance(started, PairingStarted)
    assert isinstance(finished, PairingFinished)
    assert (started.actor, started.via, started.by_code) == ("alice", "cli", False)
    assert (finished.attempt, finished.outcome, finished.device) == (
        started.attempt,
        "paired",
        "1555…01:7@s.whatsapp.net",
    )


async def test_a_bad_start_request_gets_one_line_and_the_service_keeps_serving(
    bus: Bus, running: tuple[Running, FakeGo]
) -> None:
    # Bad input: not JSON, then a bad phone number
    raw = await bus.nc.request(start_subject("whatsapp"), b"not json", timeout=5)
    answer = msgspec.json.decode(raw.data, type=PairingStart)
    assert answer.status == 422
    assert answer.error
    assert "\n" not in answer.error
    raw = await bus.nc.request(
        start_subject("whatsapp"), b'{"account":"sales","phone":"12"}', timeout=5
    )
    answer = msgspec.json.decode(raw.data, type=PairingStart)
    assert (answer.status, answer.attempt) == (422, "")
    assert "is not an E.164 number" in answer.error
    # And the service still starts a good one
    attempt = await start_pairing(bus, "sales", actor="olivia")
    await wait_until(lambda: _phase(bus, attempt, "qr"), 20, "the first QR code of a good request")


async def _phase(bus: Bus, attempt: str, phase: str) -> bool:
    return (await pairing_state(bus, "sales", attempt)).phase == phase


async def test_a_worker_stopping_mid_pairing_records_the_failure_and_frees_the_lease(
    bus: Bus, store: SessionStore
) -> None:
    fake = FakeGo(store, codes=6, device=None)
    service = Running(bus, store, fake)
    task = asyncio.create_task(service.service.run(service.stop))
    try:
        await wait_until(lambda: _serving(bus), 10, "the pairing service subscribed")
        attempt = await start_pairing(bus, "sales", actor="olivia", client="192.0.2.7")
        await wait_until(lambda: _phase(bus, attempt, "qr"), 20, "a QR code")
        # When the worker stops while the phone has not scanned yet
        service.stop.set()
        await asyncio.wait_for(task, 30)
    finally:
        service.stop.set()
        fake.close()
    # Then the attempt ends as a recorded failure, the lease is free, nothing is paired
    started, finished = await pairing_events(bus)
    assert isinstance(started, PairingStarted)
    assert (started.attempt, started.actor, started.client) == (attempt, "olivia", "192.0.2.7")
    assert isinstance(finished, PairingFinished)
    assert (finished.attempt, finished.outcome) == (attempt, "failed")
    assert "stopped" in finished.reason
    assert await read_lease(await bus.js.key_value(LEASES.name), "whatsapp.sales") is None
    assert fake.stopped.is_set()


async def test_an_already_paired_account_is_refused_by_the_worker(
    bus: Bus, store: SessionStore, running: tuple[Running, FakeGo]
) -> None:
    from services.channel.devices import DeviceRegistry
    from tests.whatsapp.test_neonize_store import add_device

    add_device(store, SALES)
    await DeviceRegistry(bus, "whatsapp").record("sales", SALES, by="host-a")
    # The refusal comes as soon as it is known, not after the worker's START_WAIT (20 s)
    # for a lease it will never take (measured: ~0.05 s here; the bound is generous)
    with pytest.raises(PairingRefusedError) as caught:
        await start_pairing(bus, "sales", actor="olivia", timeout=START_WAIT / 2)
    assert caught.value.status == 409
    assert str(caught.value) == (
        "sales: already paired as 1555…01:7@s.whatsapp.net: --force to re-pair"
        " (removes that device)"
    )
