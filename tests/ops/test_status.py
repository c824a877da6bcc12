"""`svc status`'s data (`collect_status`) on a real server: the leases it lists, and a
server no role has provisioned yet (issue 12 item 5: the lease bucket's handle is only
used where it was obtained; mypy's possibly-undefined flagged the old shape)."""

from __future__ import annotations

from services.ops.status import collect_status, render_status
from services.runtime.bus import Bus, connect
from services.runtime.lease import Lease
from services.runtime.nats_server import EmbeddedNats


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
