"""Projection benchmark: rebuild the plugin projection from PLUGINS (>= 200k events, mostly
memory facts) into a fresh SQLite file, next to a raw nats-py ordered-consumer read of the
same stream in the same run.

    python bench/projection.py --events 200000
"""

from __future__ import annotations

import argparse
import asyncio
import resource
import tempfile
import time
from collections.abc import Awaitable
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy

from contracts import subjects
from contracts.events import FactRemembered, PluginInstalled, Scope, ToolPolicySet
from services.plugins.projection import PluginProjection
from services.plugins.registry import discover, manifests
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams


async def generate(bus: Bus, events: int) -> None:
    pending: list[Awaitable[object]] = []
    for n in range(events):
        if n % 1000 == 0:
            account = f"acct{n % 50}"
            event: object = PluginInstalled(
                name="memory", version="1.0.0", scope=Scope(channel="whatsapp", account=account)
            )
            subject = subjects.plugins("memory")
        elif n % 1000 == 1:
            event = ToolPolicySet(
                scope=Scope(channel="whatsapp"), allow=["memory.*"], deny=[f"x{n}.*"]
            )
            subject = subjects.PLUGIN_POLICY_SUBJECT
        else:
            account = f"acct{n % 50}"
            event = FactRemembered(
                account=account,
                chat=f"u{n % 997}@s.whatsapp.net",
                key=f"k{n % 13}",
                value=f"value {n}",
            )
            subject = subjects.memory("whatsapp", account)
        pending.append(bus.publish(subject, event))  # type: ignore[arg-type]
        if len(pending) >= 1000:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


async def raw_read(bus: Bus, last: int) -> float:
    """A counting callback on a pushed ordered consumer: the fastest nats-py read."""
    done = asyncio.Event()
    count = 0

    async def on_msg(msg: Msg) -> None:
        nonlocal count
        count += 1
        if msg.metadata.sequence.stream >= last:
            done.set()

    started = time.perf_counter()
    sub = await bus.js.subscribe(
        "plugins.>",
        stream="PLUGINS",
        cb=on_msg,
        ordered_consumer=True,
        deliver_policy=DeliverPolicy.ALL,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    await asyncio.wait_for(done.wait(), 300)
    elapsed = time.perf_counter() - started
    await sub.unsubscribe()
    return count / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description="Projection rebuild vs raw ordered read")
    parser.add_argument("--events", type=int, default=200_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="bench") as bus,
        ):
            await ensure_streams(bus.js)
            started = time.perf_counter()
            await generate(bus, args.events)
            made = time.perf_counter() - started
            last = (await bus.js.stream_info("PLUGINS")).state.last_seq
            raw_rate = await raw_read(bus, last)
            rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            async with PluginProjection(
                bus, Path(tmp) / "plugins.sqlite", manifests(discover())
            ) as p:
                started = time.perf_counter()
                applied = await p.catch_up()
                our_rate = applied / (time.perf_counter() - started)
                rows = await p.dump()
            rss_after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"projection: {applied} PLUGINS events ({args.events} generated in {made:.1f} s)")
    print(f"  raw nats-py ordered-consumer read : {raw_rate:9.0f} events/s")
    print(
        f"  plugin projection rebuild (SQLite): {our_rate:9.0f} events/s"
        f"  -> {len(rows['facts'])} facts, {len(rows['installed'])} installs"
    )
    print(f"  ratio rebuild/raw                 : {our_rate / raw_rate:9.2f}")
    print(f"  peak RSS {rss_after / 1024:.0f} MiB (before the rebuild {rss_before / 1024:.0f} MiB)")


if __name__ == "__main__":
    asyncio.run(main())
