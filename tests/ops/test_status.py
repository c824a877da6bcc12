"""`svc status`'s data (`collect_status`) on a real server: the leases it lists, and a
server no role has provisioned yet (issue 12 item 5: the lease bucket's handle is only
used where it was obtained; mypy's possibly-undefined flagged the old shape)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

import msgspec

from contracts import subjects
from contracts.payloads import SessionStatus, SimInbound
from contracts.streams import SESSIONS
from services.channel.devices import DeviceRegistry
from services.channel.owner import AccountOwner
from services.ops.status import collect_status, mask_device, render_status, to_json
from services.runtime.bus import Bus, connect
from services.runtime.lease import Lease
from services.runtime.nats_server import EmbeddedNats
from services.runtime.settings import SimFaults
from services.whatsapp.sim import SimTransport
from tests.conftest import wait_until
from tests.e2e.conftest import job


async def test_status_on_a_server_no_role_has_provisioned_lists_no_leases(
    nats_server: EmbeddedNats,
) -> None:
    async with connect(nats_server.url, name="test", timeout=5) as bus:
        status = await collect_status(bus)
    assert status["leases"] == []
    assert all(s.get("missing") for s in status["streams"])
    assert "KV_leases" in [s["name"] for s in status["streams"]]
    assert status["dead_letters"] == 0
    assert "(missing: run 'svc streams ensure')" in render_status(status)


async def test_status_lists_each_held_and_parked_lease(bus: Bus) -> None:
    held = Lease(bus, "whatsapp", "acct-a", "holder-1", 30)
    parked = Lease(bus, "whatsapp", "acct-b", "holder-2", 30)
    assert await held.try_acquire()
    assert await parked.try_acquire()
    assert await parked.park("needs_pairing")
    status = await collect_status(bus)
    leases = {lease["key"]: lease for lease in status["leases"]}
    assert sorted(leases) == ["whatsapp.acct-a", "whatsapp.acct-b"]
    assert leases["whatsapp.acct-a"]["holder"] == "holder-1"
    assert leases["whatsapp.acct-a"]["token"] == held.token
    assert leases["whatsapp.acct-a"]["parked"] == ""
    assert leases["whatsapp.acct-b"]["parked"] == "needs_pairing"
    assert await held.release()


async def test_a_lease_value_written_by_hand_is_shown_as_unreadable_not_a_crash(bus: Bus) -> None:
    # Given a lease key whose value is not a lease (e.g. `nats kv put leases whatsapp.x junk`)
    held = Lease(bus, "whatsapp", "acct-a", "holder-1", 30)
    assert await held.try_acquire()
    kv = await bus.js.key_value("leases")
    await kv.put("whatsapp.junk", b"garbage")
    # When the status is collected, every other lease is still listed, and that one says
    # what is wrong and how to clear it
    status = await collect_status(bus)
    leases = {lease["key"]: lease for lease in status["leases"]}
    assert leases["whatsapp.acct-a"]["holder"] == "holder-1"
    assert leases["whatsapp.junk"]["parked"] == (
        "unreadable value: remove it with 'nats kv del leases whatsapp.junk'"
    )
    assert "whatsapp.junk  " in render_status(status)
    await kv.purge("whatsapp.junk")
    assert await held.release()


def test_a_device_jid_shows_the_first_and_last_four_digits_only() -> None:
    assert mask_device("15551230001:7@s.whatsapp.net") == "1555***0001:7@s.whatsapp.net"
    assert mask_device("4915112345678@s.whatsapp.net") == "4915***5678@s.whatsapp.net"
    assert mask_device("1234567@s.whatsapp.net") == "12***@s.whatsapp.net"
    assert mask_device("") == ""


async def test_status_shows_each_account_state_holder_device_and_last_traffic(bus: Bus) -> None:
    # Given a paired account owned by a worker on the sim, one job sent, one message in
    await DeviceRegistry(bus, "whatsapp").record("acct-a", "15551230001:7@s.whatsapp.net")
    owner = AccountOwner(
        bus, SimTransport(bus, SimFaults()), "acct-a", "holder-1", lease_ttl=10, receive=True
    )
    stop = asyncio.Event()
    running = asyncio.create_task(owner.run(stop))
    try:
        sent = job("acct-a", "c1@s.whatsapp.net", 1)
        await bus.publish(subjects.outbound("whatsapp", "acct-a", sent.chat), sent)
        inbound = SimInbound(
            chat="u1@s.whatsapp.net", sender="u1@s.whatsapp.net", text="hi", message_id="m1"
        )
        await bus.nc.publish(subjects.sim_in("acct-a"), msgspec.json.encode(inbound))

        async def live() -> dict[str, Any] | None:
            rows = {a["account"]: a for a in (await collect_status(bus))["accounts"]}
            row = rows.get("acct-a")
            ready = (
                row and row["state"] == "connected" and row["last_inbound"] and row["last_outbound"]
            )
            return row if ready else None

        await wait_until(live, what="acct-a connected with traffic on the status")
        row = await live()
        assert row is not None
        # Then the status shows who owns it, under which token, its masked device
        assert row["holder"] == "holder-1"
        assert row["token"] == owner.lease.token > 0
        assert row["device"] == "1555***0001:7@s.whatsapp.net"
        assert row["connected_at"]
        assert row["since"]
        assert row["reason"] == ""
        assert row["until"] == ""
        assert "1555***0001:7@s.whatsapp.net" in render_status(await collect_status(bus))
        assert "15551230001" not in to_json(await collect_status(bus))
    finally:
        stop.set()
        await running
    # When the owner stops, it says standby (released)
    rows = {a["account"]: a for a in (await collect_status(bus))["accounts"]}
    assert (rows["acct-a"]["state"], rows["acct-a"]["reason"]) == ("standby", "shutdown")
    assert rows["acct-a"]["holder"] == ""


async def test_status_shows_a_ban_with_its_end_and_a_dead_owner_as_standby(bus: Bus) -> None:
    # Given an account parked by a ban with an end
    banned = Lease(bus, "whatsapp", "acct-b", "holder-2", 30)
    assert await banned.try_acquire()
    token = banned.token
    end = datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert await banned.park("banned: code 101", state="banned", until=end)
    # and an account whose board says connected but whose owner died (no lease)
    kv = await bus.js.key_value(SESSIONS.name)
    await kv.put(
        "whatsapp.acct-c",
        msgspec.json.encode(
            SessionStatus(state="connected", holder="dead-holder", token=9, since=datetime.now(UTC))
        ),
    )
    status = await collect_status(bus)
    rows = {a["account"]: a for a in status["accounts"]}
    assert rows["acct-b"]["state"] == "banned"
    assert rows["acct-b"]["reason"] == "banned: code 101"
    assert rows["acct-b"]["until"] == "2030-01-02T03:04:05.000+00:00"
    assert (rows["acct-b"]["holder"], rows["acct-b"]["token"]) == ("holder-2", token)
    assert (rows["acct-c"]["state"], rows["acct-c"]["reason"]) == (
        "standby",
        "nobody holds the lease",
    )
    assert rows["acct-c"]["last_inbound"] == ""
    assert rows["acct-c"]["last_outbound"] == ""
    shown = render_status(status)
    assert "banned until 2030-01-02T03:04:05.000+00:00: banned: code 101" in shown
    decoded = msgspec.json.decode(to_json(status))
    assert {a["account"]: a["state"] for a in decoded["accounts"]} == {
        "acct-b": "banned",
        "acct-c": "standby",
    }
