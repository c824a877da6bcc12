"""The physical limits of plain nats-py on this machine, measured the way the other
benchmarks measure (fresh embedded nats-server, file storage, R1, 200-byte messages,
interleaved repetitions, min/median/max): what no Switchboard figure can beat.

    python bench/limits.py --messages 5000 --reps 3
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from _harness import Figure, info, parser, report, run
from nats.aio.msg import Msg
from nats.js.api import (
    AckPolicy,
    ConsumerConfig,
    DeliverPolicy,
    KeyValueConfig,
    PubAck,
    StorageType,
    StreamConfig,
)

from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats

UNITS = {
    "js.publish awaited one by one": "msg/s",
    "publish_async pipelined (1000 in flight)": "msg/s",
    "core publish (no JetStream, flushed)": "msg/s",
    "fetch(100) + ack, batched": "msg/s",
    "ordered consumer read": "msg/s",
    "KV put awaited one by one": "ops/s",
    "KV get, direct (allow_direct)": "ops/s",
    "KV get, non-direct (STREAM.MSG.GET)": "ops/s",
}


def _rate(n: int, started: float) -> float:
    return n / (time.perf_counter() - started)


async def measure(bus: Bus, n: int, payload: bytes) -> dict[str, float]:
    """Every limit once, on a fresh stream and buckets."""
    js, nc = bus.js, bus.nc
    out: dict[str, float] = {}
    await js.add_stream(StreamConfig(name="LIM", subjects=["lim.>"], storage=StorageType.FILE))
    started = time.perf_counter()
    for i in range(n):
        await js.publish(f"lim.a.{i % 20}", payload)
    out["js.publish awaited one by one"] = _rate(n, started)

    started = time.perf_counter()
    pending: list[asyncio.Future[PubAck]] = []
    for i in range(n):
        pending.append(await js.publish_async(f"lim.b.{i % 20}", payload))
        if len(pending) >= 1000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)
    out["publish_async pipelined (1000 in flight)"] = _rate(n, started)

    got = asyncio.Event()
    count = 0

    async def on_core(_: Msg) -> None:
        nonlocal count
        count += 1
        if count >= n:
            got.set()

    sub = await nc.subscribe("plain.x", cb=on_core, pending_msgs_limit=-1, pending_bytes_limit=-1)
    started = time.perf_counter()
    for _ in range(n):
        await nc.publish("plain.x", payload)
    await nc.flush()
    await asyncio.wait_for(got.wait(), 120)
    out["core publish (no JetStream, flushed)"] = _rate(n, started)
    await sub.unsubscribe()

    # fetch + ack over the n messages of lim.a.
    config = ConsumerConfig(
        durable_name="lim", ack_policy=AckPolicy.EXPLICIT, filter_subject="lim.a.>"
    )
    await js.add_consumer("LIM", config)
    pull = await js.pull_subscribe_bind(durable="lim", stream="LIM")
    started = time.perf_counter()
    seen = 0
    while seen < n:
        msgs = await pull.fetch(min(100, n - seen), timeout=5)
        for msg in msgs:
            await msg.ack()
        seen += len(msgs)
    await nc.flush()
    out["fetch(100) + ack, batched"] = _rate(n, started)

    done = asyncio.Event()
    read = 0
    last = (await js.stream_info("LIM")).state.last_seq

    async def on_msg(msg: Msg) -> None:
        nonlocal read
        read += 1
        if msg.metadata.sequence.stream >= last:
            done.set()

    started = time.perf_counter()
    ordered = await js.subscribe(
        "lim.>",
        stream="LIM",
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    await asyncio.wait_for(done.wait(), 120)
    out["ordered consumer read"] = _rate(read, started)
    await ordered.unsubscribe()

    keys = min(n, 1000)
    kv = await js.create_key_value(KeyValueConfig(bucket="lim", history=1, direct=True))
    started = time.perf_counter()
    for i in range(n):
        await kv.put(f"k{i % keys}", payload)
    out["KV put awaited one by one"] = _rate(n, started)
    bucket = (await js.stream_info("KV_lim")).config
    assert bucket.allow_direct, "the bucket allows direct gets"
    for name, direct in (("direct (allow_direct)", True), ("non-direct (STREAM.MSG.GET)", False)):
        started = time.perf_counter()
        for i in range(n):
            await js.get_last_msg("KV_lim", f"$KV.lim.k{i % keys}", direct=direct)
        out[f"KV get, {name}"] = _rate(n, started)
    return out


async def once(n: int, size: int) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix="bench-limits-") as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="bench-limits") as bus,
        ):
            return await measure(bus, n, b"x" * size)


async def main() -> None:
    p = parser("Physical limits of plain nats-py on this machine")
    p.add_argument("--messages", type=int, default=5000)
    p.add_argument("--size", type=int, default=200, help="payload bytes")
    args = p.parse_args()
    figures = {name: Figure(name, unit) for name, unit in UNITS.items()}
    for rep in range(args.reps):  # each rep measures every limit in turn: interleaved
        values = await once(args.messages, args.size)
        info(f"rep {rep + 1}/{args.reps}: " + ", ".join(f"{k} {v:,.0f}" for k, v in values.items()))
        for name, value in values.items():
            figures[name].samples.setdefault("ours", []).append(value)
    setup = f"{args.messages} ops of {args.size} B each, R1 file storage, one client"
    report("limits", setup, list(figures.values()), args)


if __name__ == "__main__":
    run(main)
