"""The NATS connection: it survives bytes it cannot decode, and a connection that is gone
for good (or a read loop that died) is reported, never left as a silent zombie."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from services.ops.simclient import SimUser
from services.runtime.bus import Bus, WatchedClient, connect
from services.runtime.errors import NatsConnectionLostError
from services.runtime.nats_server import EmbeddedNats
from services.runtime.reader import Skipped, read
from tests.conftest import raw_publish, role, wait_until

BAD_SUBJECT = b"inbound.whatsapp.default.\xff\xfe"


@contextlib.asynccontextmanager
async def listening(bus: Bus, subject: str) -> AsyncIterator[list[str]]:
    seen: list[str] = []

    async def on_msg(msg: object) -> None:
        seen.append(msg.subject)  # type: ignore[attr-defined]

    sub = await bus.nc.subscribe(subject, cb=on_msg)
    await bus.nc.flush()
    try:
        yield seen
    finally:
        if not bus.nc.is_closed:
            await sub.unsubscribe()


async def test_a_non_utf8_subject_reaches_the_subscriber_and_the_connection_keeps_reading(
    nats_server: EmbeddedNats,
) -> None:
    # Given a subscriber on inbound.>, when a raw client publishes a subject that is not
    # UTF-8 and then a valid one, then both arrive (the bad one with its bytes kept).
    async with connect(nats_server.url, name="t") as bus, listening(bus, "inbound.>") as seen:
        await raw_publish(nats_server.url, BAD_SUBJECT)
        await raw_publish(nats_server.url, b"inbound.whatsapp.default.ok")
        await wait_until(lambda: len(seen) == 2, 10, "both messages")
        assert seen[0].encode("utf-8", "surrogateescape") == BAD_SUBJECT
        assert seen[1] == "inbound.whatsapp.default.ok"
        assert bus.nc.is_connected
        assert not bus.lost.is_set()


async def test_a_subject_with_a_form_feed_or_vertical_tab_is_read_without_reconnecting(
    nats_server: EmbeddedNats,
) -> None:
    # The server separates a message line's arguments by spaces and tabs only, so it stores
    # a subject holding \f or \v; stock nats-py split on them, read "malformed MSG" and
    # reconnected, and the redelivered message did the same again, forever.
    odd = b"inbound.whatsapp.default.\x0c\xff\x0b"
    async with connect(nats_server.url, name="t") as bus, listening(bus, "inbound.>") as seen:
        await raw_publish(nats_server.url, odd)
        await raw_publish(nats_server.url, b"inbound.whatsapp.default.ok")
        await wait_until(lambda: len(seen) == 2, 10, "both messages")
        assert seen[0].encode("utf-8", "surrogateescape") == odd
        assert bus.nc.stats["reconnects"] == 0
        assert not bus.lost.is_set()


async def test_a_read_loop_that_dies_anyway_is_reported_as_a_lost_connection(
    nats_server: EmbeddedNats,
) -> None:
    # The stock nats-py decoding (strict UTF-8) kills the read loop on such a subject while
    # the client still says it is connected. The watchdog turns that into a lost connection.
    async with (
        connect(nats_server.url, name="t", client_class=WatchedClient) as bus,
        listening(bus, "inbound.>"),
    ):
        await raw_publish(nats_server.url, BAD_SUBJECT)
        try:
            await asyncio.wait_for(bus.lost.wait(), 10)
        except TimeoutError:
            nc, task = bus.nc, bus.nc._reading_task
            pytest.fail(
                f"no loss reported: {nc.stats['in_msgs']} message(s) read, read loop done"
                f" {task is not None and task.done()}, connected {nc.is_connected}, closed"
                f" {nc.is_closed}, dead {nc.dead_read_loop!r}"
            )
        assert "read loop died" in bus.lost_reason
        with pytest.raises(NatsConnectionLostError, match="closed for good"):
            await bus.until_lost()
        await wait_until(lambda: bus.nc.is_closed, 10, "the client closed")


async def test_the_core_still_answers_after_a_non_utf8_inbound_subject(bus: Bus) -> None:
    # Given a core (in this process), when a raw client stores a non-UTF-8 subject on
    # INBOUND, then a valid message sent after it is still answered, and readers of the
    # stream (the audit at teardown, projections) skip the bad one instead of hanging.
    url = bus.nc.connected_url
    assert url is not None
    await raw_publish(f"nats://{url.netloc}", BAD_SUBJECT)
    async with role(bus, "all"), SimUser(bus, "default") as user:
        await user.send("alice@s.whatsapp.net", "still there?")
        assert await user.wait_replies(30), "no reply after a non-UTF-8 inbound subject"
    assert not bus.lost.is_set()
    skipped = Skipped()
    subjects = [s.subject async for s in read(bus, "INBOUND", skipped=skipped)]
    assert skipped.count == 1
    assert all(s.startswith("inbound.whatsapp.default.") for s in subjects)


async def test_a_server_err_that_closes_the_client_for_good_is_reported_with_its_cause(
    nats_server: EmbeddedNats,
) -> None:
    # The case: a subject longer than the server's control line. The server
    # answers -ERR and nats-py closes the client for good, reconnects or not.
    async with connect(nats_server.url, name="t") as bus:
        await bus.nc.publish("too.long." + "x" * 5000, b"")
        await asyncio.wait_for(bus.lost.wait(), 10)
        assert "maximum control line exceeded" in bus.lost_reason
        with pytest.raises(NatsConnectionLostError, match="maximum control line exceeded"):
            await bus.until_lost()


async def test_a_role_on_a_connection_closed_for_good_ends_with_the_cause(
    nats_server: EmbeddedNats, tmp_path: Path
) -> None:
    from services.app import run_role
    from services.runtime.provisioning import ensure_streams
    from services.runtime.settings import load_settings

    async with connect(nats_server.url, name="t") as bus:
        await ensure_streams(bus.js)
        settings = load_settings({"SVC_DATA_DIR": str(tmp_path)})
        stop = asyncio.Event()
        task = asyncio.create_task(run_role(bus, settings, "core", stop))
        await bus.nc.publish("too.long." + "x" * 5000, b"")
        with pytest.raises(NatsConnectionLostError, match="closed for good"):
            await asyncio.wait_for(task, 30)


async def test_a_login_refused_on_reconnect_closes_the_connection_for_good(
    tmp_path: Path,
) -> None:
    # Given a client connected to a server without auth
    conf = tmp_path / "server.conf"
    conf.write_text("# no auth\n")
    first = EmbeddedNats(tmp_path / "nats", port=0, extra_args=("-c", str(conf)))
    await first.start()
    port = int(first.url.rsplit(":", 1)[1])
    try:
        async with connect(first.url, name="t") as bus:
            # When the server comes back on the same port requiring a login it does not have
            await first.stop()
            conf.write_text("authorization { token: other }\n")
            second = EmbeddedNats(tmp_path / "nats", port=port, extra_args=("-c", str(conf)))
            async with second:
                # Then it stops retrying and reports the refusal as a lost connection
                await asyncio.wait_for(bus.lost.wait(), 20)
            assert "authorization refused on reconnect" in bus.lost_reason
    finally:
        await first.stop()


@contextlib.contextmanager
def on_the_wire(bus: Bus) -> Iterator[list[bytes]]:
    """The bytes the client writes to its socket, in order, while the block runs."""
    transport = bus.nc._transport
    assert transport is not None
    wire: list[bytes] = []
    write, writelines = transport.write, transport.writelines

    def record(data: bytes) -> None:
        wire.append(bytes(data))
        write(data)

    def record_lines(chunks: list[bytes]) -> None:
        wire.extend(bytes(chunk) for chunk in chunks)
        writelines(chunks)

    transport.write = record  # type: ignore[method-assign]
    transport.writelines = record_lines  # type: ignore[method-assign]
    try:
        yield wire
    finally:
        transport.write, transport.writelines = write, writelines  # type: ignore[method-assign]


def sent_before_ping(wire: list[bytes], command: bytes) -> bool:
    sent = b"".join(wire)
    assert b"PING\r\n" in sent, f"flush sent no PING: {sent!r}"
    return sent.index(command) < sent.index(b"PING\r\n")


async def test_a_flush_reaches_the_server_behind_the_subscription_just_made(
    nats_server: EmbeddedNats,
) -> None:
    # `subscribe(); flush()` must mean "the server has the subscription". Stock nats-py
    # wrote flush's PING to the socket ahead of the SUB still waiting for its flusher, so
    # the PONG could come back first and a message published right then was missed (the
    # CI failure of stop 24: the bad subject never reached the dying-read-loop test).
    async with connect(nats_server.url, name="t") as bus:
        with on_the_wire(bus) as wire:
            async with listening(bus, "ordered.check"):
                assert sent_before_ping(wire, b"SUB ordered.check"), wire


async def test_a_flush_reaches_the_server_behind_the_publish_or_ack_just_made(
    nats_server: EmbeddedNats,
) -> None:
    # The consumer loop's stop flushes so that its acks and naks (publishes to the reply
    # subject) reach the server before it returns: the PING must go behind them too.
    async with connect(nats_server.url, name="t") as bus:
        with on_the_wire(bus) as wire:
            await bus.nc.publish("$JS.ACK.s.c.1.1.1.0.0", b"-NAK")
            await bus.nc.flush()
            assert sent_before_ping(wire, b"PUB $JS.ACK.s.c.1.1.1.0.0"), wire
