"""The sim transport and account owner: kept-until-attached inbound, fenced sends, faults."""

from __future__ import annotations

import dataclasses
import time

import pytest

from contracts.codec import decode
from contracts.events import (
    DeadLettered,
    DeliveryDeadLettered,
    DeliveryFailed,
    LeaseAcquired,
    LeaseReleased,
    MessageSent,
)
from contracts.payloads import SimOutbound
from services.app import check_role
from services.channel.dispatch import EventDispatch
from services.channel.port import Fence, Outgoing, StaleFenceError
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.lease import Lease
from services.runtime.settings import SimFaults, load_settings
from services.whatsapp.sim import SimTransport
from tests.conftest import read_stream, role, stream_raw, wait_until


async def test_messages_sent_while_no_owner_is_attached_are_kept_and_answered_in_order(
    bus: Bus,
) -> None:
    async with SimUser(bus, "default") as user:
        # Given users write while nothing serves the account
        for i in range(5):
            await user.send("alice@s.whatsapp.net", f"early {i}")
        # When the system starts
        async with role(bus, "all"):
            assert await user.wait_replies(15)
    replies = [e.reply.text for e in user.exchanges.values() if e.reply]
    assert replies == [f"echo: early {i}" for i in range(5)]


async def test_every_send_carries_the_holder_and_its_fencing_token(bus: Bus) -> None:
    async with SimUser(bus, "default") as user, role(bus, "all"):
        await user.send("bob@s.whatsapp.net", "hi")
        assert await user.wait_replies(15)
    acquired = [e for _, e in await read_stream(bus, "ACCOUNTS") if isinstance(e, LeaseAcquired)]
    sent = [e for _, e in await read_stream(bus, "DELIVERY") if isinstance(e, MessageSent)]
    reply = next(iter(user.exchanges.values())).reply
    assert reply is not None
    assert len(acquired) == 1
    assert (reply.holder, reply.lease_token) == (acquired[0].holder, acquired[0].token)
    assert (sent[0].holder, sent[0].lease_token) == (acquired[0].holder, acquired[0].token)
    assert reply.lease_token > 0


async def test_a_graceful_stop_releases_the_lease(bus: Bus) -> None:
    async with SimUser(bus, "default") as user, role(bus, "whatsapp"):
        await wait_until(lambda: _has_lease(bus), what="lease held")
        del user
    events = [e for _, e in await read_stream(bus, "ACCOUNTS")]
    assert any(isinstance(e, LeaseReleased) and e.reason == "shutdown" for e in events)
    assert not await _has_lease(bus)


async def _has_lease(bus: Bus) -> bool:
    kv = await bus.js.key_value("leases")
    try:
        await kv.get("whatsapp.default")
    except Exception:
        return False
    return True


async def test_a_permanently_failing_chat_is_dead_lettered_and_other_chats_flow(bus: Bus) -> None:
    env = {"SIM_FAILING_CHATS": "ghost@s.whatsapp.net"}
    async with SimUser(bus, "default") as user, role(bus, "all", **env):
        await user.send("ghost@s.whatsapp.net", "anyone?")
        await user.send("alice@s.whatsapp.net", "hello")
        await wait_until(
            lambda: any(e.reply for e in user.exchanges.values() if e.chat.startswith("alice")),
            timeout=15,
            what="alice's reply",
        )
        await wait_until(lambda: _count(bus, "DEADLETTER", DeadLettered, 1), what="dead letter")
    delivery = [e for _, e in await read_stream(bus, "DELIVERY")]
    failed = [e for e in delivery if isinstance(e, DeliveryFailed)]
    dead = [e for e in delivery if isinstance(e, DeliveryDeadLettered)]
    assert len(failed) == 1
    assert failed[0].permanent
    assert len(dead) == 1
    assert dead[0].chat == "ghost@s.whatsapp.net"


async def _count(bus: Bus, stream: str, kind: type, n: int) -> bool:
    return len([e for _, e in await read_stream(bus, stream) if isinstance(e, kind)]) >= n


async def test_ingress_and_egress_can_run_as_separate_roles_on_the_sim(bus: Bus) -> None:
    async with (
        SimUser(bus, "default") as user,
        role(bus, "core"),
        role(bus, "whatsapp-egress"),
        role(bus, "whatsapp-ingress"),
    ):
        await user.send("carol@s.whatsapp.net", "split roles")
        assert await user.wait_replies(15)


def test_whatsapp_ingress_refuses_a_session_transport() -> None:
    settings = dataclasses.replace(load_settings({}), transport="neonize", sim=SimFaults())
    with pytest.raises(ConfigError, match="cannot run with WHATSAPP_TRANSPORT=neonize"):
        check_role(settings, "whatsapp-ingress")


async def test_one_trace_follows_a_message_from_the_user_to_the_recorded_send(bus: Bus) -> None:
    # Given one user message answered by the whole system
    async with SimUser(bus, "default") as user, role(bus, "all"):
        await user.send("dave@s.whatsapp.net", "trace me")
        assert await user.wait_replies(15)
        await wait_until(lambda: _count(bus, "DELIVERY", MessageSent, 1), what="MessageSent")
    # Then every stored message of the chain carries a traceparent of the same trace
    # (SIM and OUTBOUND are work queues: their messages are gone once handled)
    trace_ids = set()
    for stream in ("INBOUND", "AGENT", "SIM_OUT", "DELIVERY"):
        stored = await stream_raw(bus, stream)
        assert stored, f"{stream} is empty"
        for _, _, headers in stored:
            trace_ids.add(headers["traceparent"].split("-")[1])
    assert len(trace_ids) == 1


def test_a_lease_ttl_that_cannot_cover_the_sims_send_is_refused_at_start() -> None:
    settings = load_settings({"WHATSAPP_LEASE_TTL": "2", "SIM_SEND_LATENCY_MS": "1000"})
    with pytest.raises(ConfigError) as refused:
        check_role(settings, "whatsapp")
    message = str(refused.value)
    assert "\n" not in message
    assert "WHATSAPP_LEASE_TTL=2 proves the lease for at most 1.50 s" in message
    assert "send timeout of 1.25 s" in message
    assert "set WHATSAPP_LEASE_TTL to at least 4" in message
    # A TTL that covers it is accepted
    check_role(dataclasses.replace(settings, lease_ttl=4), "whatsapp")


async def _sim_out_count(bus: Bus) -> int:
    return len(await stream_raw(bus, "SIM_OUT"))


async def test_the_sim_network_refuses_a_stale_token_and_a_send_past_its_deadline(
    bus: Bus,
) -> None:
    """The network side of fencing: what a paused or superseded holder sends never lands."""
    transport = SimTransport(bus, SimFaults())
    first = Lease(bus, "whatsapp", "default", "first", 2)
    second = Lease(bus, "whatsapp", "default", "second", 30)

    async def ignore(_event: object) -> None:
        return None

    async with (
        EventDispatch(ignore) as events,
        transport.session("default", events, receive=False) as session,
    ):
        assert await first.try_acquire()
        fresh = Fence("first", first.token, deadline=first.deadline)
        assert (await session.send(Outgoing("a@s.whatsapp.net", "ok", "j1", fresh))).startswith(
            "sim-"
        )
        # A fence whose deadline has passed is refused before the publish
        late = Fence("first", first.token, deadline=time.monotonic() - 0.001)
        with pytest.raises(StaleFenceError, match="past its lease deadline"):
            await session.send(Outgoing("a@s.whatsapp.net", "late", "j2", late))
        # Once another holder took the lease over, the old token is refused
        await wait_until(second.try_acquire, timeout=6, what="takeover after expiry")
        stale = Fence("first", first.token)
        with pytest.raises(StaleFenceError, match=f"lease token {first.token} is not current"):
            await session.send(Outgoing("a@s.whatsapp.net", "stale", "j3", stale))
        current = Fence("second", second.token, deadline=second.deadline)
        await session.send(Outgoing("a@s.whatsapp.net", "new owner", "j4", current))
    sent = [decode(data, SimOutbound).job_id for _, data, _ in await stream_raw(bus, "SIM_OUT")]
    assert sent == ["j1", "j4"]
    await second.release()
