"""The minimal fenced lease: one holder, growing tokens, stale writes refused, expiry."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from pathlib import Path

import msgspec

from services.runtime.bus import Bus, connect
from services.runtime.lease import Lease, LeaseValue, new_holder_id, read_lease
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from tests.conftest import wait_until


def lease(bus: Bus, holder: str, ttl: int = 2) -> Lease:
    return Lease(bus, "whatsapp", "acct", holder, ttl)


def test_holder_ids_are_unique_per_process_and_readable() -> None:
    a, b = new_holder_id("core"), new_holder_id("core")
    assert a != b
    assert "-core-" in a


async def test_only_one_of_two_racers_acquires_and_the_token_is_the_revision(bus: Bus) -> None:
    a, b = lease(bus, "a"), lease(bus, "b")
    assert await a.try_acquire()
    assert not await b.try_acquire()
    assert a.valid()
    assert not b.valid()
    kv = await bus.js.key_value("leases")
    found = await read_lease(kv, "whatsapp.acct")
    assert found is not None
    value, _ = found
    assert (value.holder, value.token) == ("a", a.token)
    assert a.token > 0


async def test_renew_keeps_the_ttl_so_an_abandoned_lease_expires(bus: Bus) -> None:
    a, b = lease(bus, "a"), lease(bus, "b")
    assert await a.try_acquire()
    assert await a.renew()
    abandoned_at = time.monotonic()
    # The renewed value must still expire: b takes over once the TTL (2 s) passes.
    await wait_until(b.try_acquire, timeout=6, what="takeover after expiry")
    assert time.monotonic() - abandoned_at >= 1.5
    assert b.token > a.token
    # The old holder's proof ran out before b could acquire, and its renew is refused.
    assert not a.valid()
    assert not await a.renew()


async def test_the_local_deadline_ends_before_the_server_ttl(bus: Bus) -> None:
    a = lease(bus, "a", ttl=10)
    assert await a.try_acquire()
    assert 7.0 < a.remaining() <= 8.0  # margin max(0.5 s, 20% of TTL)


async def test_release_lets_another_holder_acquire_with_a_higher_token(bus: Bus) -> None:
    a, b = lease(bus, "a", ttl=30), lease(bus, "b", ttl=30)
    assert await a.try_acquire()
    first = a.token
    assert await a.release()
    assert not a.valid()
    assert await b.try_acquire()
    assert b.token > first


async def test_a_stale_holder_cannot_release_someone_elses_lease(bus: Bus) -> None:
    a, b = lease(bus, "a"), lease(bus, "b", ttl=30)
    assert await a.try_acquire()
    stale_revision = a.state.revision
    await wait_until(b.try_acquire, timeout=6, what="takeover")
    a.state.token, a.state.revision = 1, stale_revision  # a believes it still holds it
    assert not await a.release()
    kv = await bus.js.key_value("leases")
    found = await read_lease(kv, "whatsapp.acct")
    assert found is not None
    assert found[0].holder == "b"


async def test_prove_notices_a_revision_moved_under_the_holder(bus: Bus) -> None:
    a = Lease(bus, "whatsapp", "acct", "a", 30, fresh_for=0.0)
    assert await a.try_acquire()
    assert await a.prove()
    # When someone writes the key behind the holder's back
    kv = await bus.js.key_value("leases")
    await kv.put("whatsapp.acct", b'{"holder":"intruder","token":0,"acquired_at":""}')
    # Then the next proof fails even though the local deadline has not passed
    assert not await a.prove()
    assert not a.valid()


async def test_a_parked_lease_blocks_acquisition_and_never_expires(bus: Bus) -> None:
    a, b = lease(bus, "a", ttl=2), lease(bus, "b", ttl=2)
    assert await a.try_acquire()
    assert await a.park("stream replaced")
    assert not a.valid()
    kv = await bus.js.key_value("leases")
    found = await read_lease(kv, "whatsapp.acct")
    assert found is not None
    assert found[0].parked == "stream replaced"
    # Longer than the TTL later (each failed create is a round trip), still parked
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        assert not await b.try_acquire()


async def test_prove_renews_when_the_proof_left_would_not_cover_the_send(bus: Bus) -> None:
    a = Lease(bus, "whatsapp", "acct", "a", 10, fresh_for=60.0)
    assert await a.try_acquire()
    revision = a.state.revision
    # A fresh proof (8 s) covers a 1 s send without a renewal
    assert await a.prove(cover=1.0)
    assert a.state.revision == revision
    # A send longer than what is left forces a renewal first
    a.state.deadline = time.monotonic() + 0.5
    assert await a.prove(cover=1.0)
    assert a.state.revision > revision
    assert a.covers(1.0)
    # A send longer than any proof can cover is refused
    assert not await a.prove(cover=9.0)
    assert a.valid()  # refused to send, not lost


async def test_concurrent_proofs_renew_once(bus: Bus) -> None:
    a = Lease(bus, "whatsapp", "acct", "a", 10, fresh_for=60.0)
    assert await a.try_acquire()
    a.state.deadline = time.monotonic() + 0.5  # every prover sees a proof too short
    kv = await bus.js.key_value("leases")
    before = (await kv.get("whatsapp.acct")).revision or 0
    assert all(await asyncio.gather(*(a.prove(cover=1.0) for _ in range(10))))
    after = (await kv.get("whatsapp.acct")).revision or 0
    assert after - before == 1  # one renewal served all ten


async def test_a_release_without_a_connection_leaves_the_key_to_expire_at_once(
    tmp_path: Path,
) -> None:
    # Given a held lease whose server then dies (e.g. the embedded server of `svc run all`)
    async with (
        EmbeddedNats(tmp_path / "nats", port=0) as server,
        connect(server.url, name="t", timeout=5) as b,
    ):
        await ensure_streams(b.js)
        held = lease(b, "a")
        assert await held.try_acquire()
        await server.stop()
        await wait_until(lambda: not b.nc.is_connected, 10, "the client to notice")
        # When the holder releases, then it gives up at once instead of waiting out a
        # publish timeout (5 s) that only delays the process's exit: the key expires.
        assert await asyncio.wait_for(held.release(), 2) is False
        assert held.token == 0


async def test_a_park_records_the_end_state_and_its_end_and_old_values_still_decode(
    bus: Bus,
) -> None:
    # Given a lease parked by a ban with an end
    a = lease(bus, "a", ttl=10)
    assert await a.try_acquire()
    end = datetime(2030, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    assert await a.park("banned: code 101", state="banned", until=end)
    found = await read_lease(await bus.js.key_value("leases"), "whatsapp.acct")
    assert found is not None
    value = found[0]
    assert (value.state, value.until) == ("banned", "2030-01-02T03:04:05.678+00:00")
    assert value.parked_until() == end
    # ... stored to the millisecond, rounded up, so the park never ends before the ban does
    c = Lease(bus, "whatsapp", "acct2", "c", 10)
    assert await c.try_acquire()
    assert await c.park("banned", state="banned", until=end.replace(microsecond=678001))
    found = await read_lease(await bus.js.key_value("leases"), "whatsapp.acct2")
    assert found is not None
    assert found[0].until == "2030-01-02T03:04:05.679+00:00"
    # A value written before these fields (or a park without an end) has no end
    old = msgspec.json.decode(
        b'{"holder":"h","token":3,"acquired_at":"x","parked":"stream replaced"}', type=LeaseValue
    )
    assert (old.state, old.until, old.parked_until()) == ("", "", None)
    by_hand = msgspec.structs.replace(old, until="2030-01-02T03:04:05")
    assert by_hand.parked_until() == datetime(2030, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert msgspec.structs.replace(old, until="soon").parked_until() is None
    # A park is revision-checked: a lease no longer ours is never overwritten
    b = lease(bus, "b", ttl=10)
    assert not await b.park("replaced")
