"""Core benchmark: turns/s of one core process (echo provider) vs raw nats-py, and the
core's share of the whole pipeline's latency.

Throughput: a backlog of MessageReceived events over many chats is stored on INBOUND, then
the consumer starts; we time until every turn is recorded on AGENT. Switchboard's core
does per-chat ordering across replicas (chat record read, predecessor check, revision-
checked write), history, the agent loop and two publishes per turn. The raw baselines
consume, publish the two messages and ack: weak = fetch(64), each publish and ack
awaited; strong = a push consumer, per-chat serial with chats in parallel, the two
publishes and one revision-checked write of the chat's record in the `chats` bucket
pipelined (`publish_async`), then the acks (bench/_raw.py). Interleaved reps.

Latency: the whole system (role `all`) answers paced sim messages; for each, the core's
part is AGENT's store time minus INBOUND's (server timestamps), next to the sim send ->
reply time.

    python bench/core.py --turns 2000 --chats 100 --reps 3
"""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

import nats.errors
from _harness import info, interleave, parser, report, run
from _raw import strong_stage
from _system import sim_system
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from contracts import subjects
from contracts.codec import decode_any
from contracts.events import MessageReceived, TurnCompleted
from services.core.llm import EchoLLM
from services.core.worker import CoreWorker
from services.plugins.registry import discover
from services.plugins.tools import ProjectedTools
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.runtime.reader import read
from services.runtime.settings import CoreSettings


async def backlog(bus: Bus, turns: int, chats: int) -> None:
    pending: list[Awaitable[object]] = []
    for n in range(turns):
        chat = f"u{n % chats}@s.whatsapp.net"
        msg = MessageReceived(
            account="default", chat=chat, sender=chat, message_id=f"m{n}", text=f"hello {n}"
        )
        pending.append(bus.publish(subjects.inbound("whatsapp", "default", chat), msg))
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


async def ours(bus: Bus, stop: asyncio.Event) -> None:
    # A benchmark backlog is a flood by design: no per-chat rate (ADR 0015).
    settings = CoreSettings(chat_rate=None)
    tools = ProjectedTools(bus, discover(), None, timeout=settings.tool_timeout)
    await CoreWorker(bus, EchoLLM(), settings, tools=tools).loop.run(stop)


async def raw(bus: Bus, stop: asyncio.Event) -> None:
    config = ConsumerConfig(
        durable_name="raw",
        filter_subject="inbound.>",
        ack_policy=AckPolicy.EXPLICIT,
        max_ack_pending=1000,
    )
    await bus.js.add_consumer("INBOUND", config)
    sub = await bus.js.pull_subscribe_bind(durable="raw", stream="INBOUND")
    while not stop.is_set():
        try:
            msgs = await sub.fetch(64, timeout=0.25)
        except (TimeoutError, nats.errors.TimeoutError):
            continue
        for msg in msgs:
            token = msg.subject.rsplit(".", 1)[1]
            await bus.js.publish(f"outbound.whatsapp.default.{token}", msg.data)
            await bus.js.publish(f"agent.whatsapp.default.{token}", msg.data)
            await msg.ack_sync()


def _turn(msg: Msg) -> list[tuple[str, bytes, dict[str, str] | None]]:
    token = msg.subject.rsplit(".", 1)[1]
    seq = msg.metadata.sequence.stream
    return [
        (f"outbound.whatsapp.default.{token}", msg.data, {"Nats-Msg-Id": f"o{seq}"}),
        (f"agent.whatsapp.default.{token}", msg.data, {"Nats-Msg-Id": f"a{seq}"}),
    ]


async def strong(bus: Bus, stop: asyncio.Event) -> None:
    await strong_stage(
        bus.js,
        "INBOUND",
        "strong",
        "inbound.>",
        _turn,
        stop,
        chat_of=lambda m: m.subject.rsplit(".", 1)[1],
        in_flight=4096,  # the core's max_ack_pending
        state_bucket="chats",  # like the core's revision-checked chat record
    )


async def throughput(runner: object, turns: int, chats: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="bench") as bus,
        ):
            await ensure_streams(bus.js)
            await backlog(bus, turns, chats)
            done = asyncio.Event()
            count = 0

            async def on_turn(_: Msg) -> None:
                nonlocal count
                count += 1
                if count >= turns:
                    done.set()

            await bus.nc.subscribe("agent.>", cb=on_turn)
            stop = asyncio.Event()
            started = time.perf_counter()
            task = asyncio.create_task(runner(bus, stop))  # type: ignore[operator]
            await asyncio.wait_for(done.wait(), 600)
            elapsed = time.perf_counter() - started
            stop.set()
            await task
            return {"turns/s": turns / elapsed}


async def pipeline_share(messages: int, chats: int) -> tuple[list[float], list[float]]:
    """(core ms, end-to-end ms) per message in the whole system."""
    async with sim_system() as (bus, user):
        for n in range(messages):
            await user.send(f"u{n % chats}@s.whatsapp.net", f"hi {n}")
            await asyncio.sleep(0.005)
        assert await user.wait_replies(120)
        stored_in = {}
        async for s in read(bus, "INBOUND"):
            stored_in[decode_any(s.data).id] = s.time
        core = []
        async for s in read(bus, "AGENT"):
            turn = decode_any(s.data)
            if isinstance(turn, TurnCompleted) and s.time and stored_in.get(turn.inbound_id):
                core.append((s.time - stored_in[turn.inbound_id]).total_seconds() * 1000)
        total = [e.latency_ms for e in user.exchanges.values()]
    return core, total


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def main() -> None:
    p = parser("Core turns/s vs raw nats-py (weak and strong)")
    p.add_argument("--turns", type=int, default=2000)
    p.add_argument("--chats", type=int, default=100)
    p.add_argument("--share", type=int, default=300, help="sim messages for the share line")
    args = p.parse_args()
    t, c = args.turns, args.chats
    runs = {
        "ours": lambda: throughput(ours, t, c),
        "weak": lambda: throughput(raw, t, c),
        "strong": lambda: throughput(strong, t, c),
    }
    found = await interleave(args.reps, runs, {"turns/s": ("turns/s", True)}, log=info)
    notes = ""
    if args.share:
        core, total = await pipeline_share(args.share, 30)
        share = statistics.median(core) / statistics.median(total)
        notes = (
            f"core share of the pipeline ({args.share} paced sim messages, role all): end to end"
            f" p50 {statistics.median(total):.1f} ms p99 {pct(total, 0.99):.1f} ms; core part"
            f" p50 {statistics.median(core):.1f} ms p99 {pct(core, 0.99):.1f} ms"
            f" ({share:.0%} of p50)"
        )
    report("core", f"{t} turns over {c} chats, echo provider, one process", found, args, notes)


if __name__ == "__main__":
    run(main)
