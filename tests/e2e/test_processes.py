"""End to end with separate processes that talk only through JetStream."""

from __future__ import annotations

import json

import pytest

from contracts.events import DeadLettered, MessageSent
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from tests.conftest import Processes, read_stream, run_svc, wait_until
from tests.e2e.conftest import turn_records

pytestmark = pytest.mark.slow


async def test_a_sim_message_is_answered_across_separate_processes(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    core = processes.start("run", "core", NATS_URL=url)
    whatsapp = processes.start("run", "whatsapp", NATS_URL=url)
    await wait_until(lambda: _stream_exists(bus), what="streams provisioned by the roles")
    async with SimUser(bus, "default") as user:
        exchange = await user.send("alice@s.whatsapp.net", "hello over processes")
        assert await user.wait_replies(20), processes.log(core) + processes.log(whatsapp)
    assert exchange.reply is not None
    assert exchange.reply.text == "echo: hello over processes"
    await wait_until(lambda: _sent_count(bus, 1), what="MessageSent in DELIVERY")
    ((_, sent),) = [
        (s, e) for s, e in await read_stream(bus, "DELIVERY") if isinstance(e, MessageSent)
    ]
    assert isinstance(sent, MessageSent)
    assert sent.job_id == exchange.reply.job_id
    assert sent.holder == exchange.reply.holder
    # SIGTERM drains and exits 0, and the owner releases its lease on the way out.
    assert processes.stop(whatsapp) == 0, processes.log(whatsapp)
    assert processes.stop(core) == 0, processes.log(core)
    assert not await _lease_held(bus)


async def test_a_malformed_inbound_payload_is_dead_lettered_and_the_core_keeps_serving(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    processes.start("run", "core", NATS_URL=url)
    processes.start("run", "whatsapp", NATS_URL=url)
    await wait_until(lambda: _stream_exists(bus), what="streams provisioned")
    # Given garbage and an unknown event type on an inbound subject
    await bus.publish_bytes("inbound.whatsapp.default.x", b"\x00\xffnot json", msg_id="bad-1")
    await bus.publish_bytes(
        "inbound.whatsapp.default.x", b'{"type":"Nonsense","id":"1"}', msg_id="bad-2"
    )
    # When a valid message follows
    async with SimUser(bus, "default") as user:
        await user.send("bob@s.whatsapp.net", "still there?")
        # Then it is answered
        assert await user.wait_replies(20)
    await wait_until(lambda: _count_letters(bus, 2), what="both dead letters")
    letters = [e for _, e in await read_stream(bus, "DEADLETTER") if isinstance(e, DeadLettered)]
    assert {letter.payload for letter in letters} == {
        b"\x00\xffnot json",
        b'{"type":"Nonsense","id":"1"}',
    }
    turns = await turn_records(bus, 1)
    assert len(turns) == 1


async def test_svc_status_shows_streams_consumers_and_the_lease(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    processes.start("run", "whatsapp", NATS_URL=url)
    await wait_until(lambda: _lease_held(bus), what="lease held")
    result = run_svc("status", "--json", env=processes.env(NATS_URL=url))
    assert result.returncode == 0, result.stderr
    status = json.loads(result.stdout)
    names = {s["name"] for s in status["streams"]}
    assert {
        "INBOUND",
        "AGENT",
        "OUTBOUND",
        "DELIVERY",
        "DEADLETTER",
        "PLUGINS",
        "ACCOUNTS",
    } <= names
    (lease,) = status["leases"]
    assert lease["key"] == "whatsapp.default"
    assert lease["token"] > 0
    assert status["dead_letters"] == 0
    human = run_svc("status", env=processes.env(NATS_URL=url))
    assert human.returncode == 0
    assert "whatsapp.default" in human.stdout.decode()


async def test_svc_chat_talks_to_the_running_system(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    processes.start("run", "all", NATS_URL=url)
    await wait_until(lambda: _lease_held(bus), what="lease held")
    result = run_svc(
        "chat",
        "--account",
        "default",
        env=processes.env(NATS_URL=url),
        input_=b"hello\nhow are you\n",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.decode().splitlines() == ["bot> echo: hello", "bot> echo: how are you"]


async def _stream_exists(bus: Bus) -> bool:
    try:
        await bus.js.stream_info("DELIVERY")
        await bus.js.consumer_info("OUTBOUND", "egress-whatsapp-default")
    except Exception:
        return False
    return True


async def _lease_held(bus: Bus) -> bool:
    try:
        kv = await bus.js.key_value("leases")
        entry = await kv.get("whatsapp.default")
    except Exception:
        return False
    return bool(entry.value) and b'"token":0' not in entry.value


async def _sent_count(bus: Bus, n: int) -> bool:
    return (
        len([e for _, e in await read_stream(bus, "DELIVERY") if isinstance(e, MessageSent)]) >= n
    )


async def _count_letters(bus: Bus, n: int) -> bool:
    letters = [e for _, e in await read_stream(bus, "DEADLETTER") if isinstance(e, DeadLettered)]
    return len(letters) >= n
