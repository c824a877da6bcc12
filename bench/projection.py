"""Projection benchmark: rebuild the plugin projection from PLUGINS (>= 200k events of
every plugin type, mostly memory facts) into a fresh SQLite file, next to a raw nats-py
ordered-consumer read of the same stream in the same run.

    python bench/projection.py --events 200000
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from nats.aio.msg import Msg
from nats.js.api import DeliverPolicy, PubAck
from peak import peak_rss_mib

from contracts import subjects
from contracts.codec import encode
from contracts.events import (
    Event,
    FactForgotten,
    FactRemembered,
    PluginConfigured,
    PluginInstalled,
    PluginUninstalled,
    Scope,
    ToolPolicySet,
)
from services.plugins.projection import PluginProjection
from services.plugins.registry import discover, manifests
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams


def history(events: int) -> Iterator[tuple[str, Event]]:
    """A deterministic mixed PLUGINS history, ~90% memory facts: every type the projection
    handles, over 50 accounts and ~1,000 chats each."""
    plugins = ("memory", "http_get", "calculator")
    for n in range(events):
        kind = n % 100
        # Plugin events rotate over the accounts too (n % 50 alone would pin them to two).
        account = f"acct{(n // 100 if kind < 10 else n) % 50}"
        scope = Scope(channel="whatsapp", account=account)
        event: Event
        if kind == 0:
            name = plugins[n // 100 % 3]
            event = PluginInstalled(name=name, version="1.0.0", scope=scope)
            subject = subjects.plugins(name)
        elif kind == 1:
            event = PluginConfigured(name="http_get", scope=scope, config={"timeout_s": n % 30})
            subject = subjects.plugins("http_get")
        elif kind == 2:
            event = ToolPolicySet(scope=scope, allow=["memory.*"], deny=[f"x{n % 7}.*"])
            subject = subjects.PLUGIN_POLICY_SUBJECT
        elif kind == 3:
            event = PluginUninstalled(name="calculator", scope=scope)
            subject = subjects.plugins("calculator")
        else:
            chat, key = f"u{n % 997}@s.whatsapp.net", f"k{n % 13}"
            if kind < 10:
                event = FactForgotten(account=account, chat=chat, key=key)
            else:
                event = FactRemembered(account=account, chat=chat, key=key, value=f"value {n}")
            subject = subjects.memory("whatsapp", account)
        yield subject, event


async def generate(bus: Bus, events: int, window: int = 5000) -> None:
    """Publish `history(events)` to PLUGINS with thousands of publishes in flight."""
    acks: list[asyncio.Future[PubAck]] = []
    for subject, event in history(events):
        acks.append(
            await bus.js.publish_async(subject, encode(event), headers={"Nats-Msg-Id": event.id})
        )
        if len(acks) >= window:
            await asyncio.gather(*acks)
            acks = []
    await asyncio.gather(*acks)


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
            rss_before = peak_rss_mib()
            async with PluginProjection(
                bus, Path(tmp) / "plugins.sqlite", manifests(discover())
            ) as p:
                started = time.perf_counter()
                applied = await p.catch_up()
                our_rate = applied / (time.perf_counter() - started)
                rows = await p.dump()
            rss_after = peak_rss_mib()
    print(f"projection: {applied} PLUGINS events ({args.events} generated in {made:.1f} s)")
    print(f"  raw nats-py ordered-consumer read : {raw_rate:9.0f} events/s")
    print(
        f"  plugin projection rebuild (SQLite): {our_rate:9.0f} events/s"
        f"  -> {len(rows['facts'])} facts, {len(rows['installed'])} installs"
    )
    print(f"  ratio rebuild/raw                 : {our_rate / raw_rate:9.2f}")
    print(f"  peak RSS {rss_after:.0f} MiB (before the rebuild {rss_before:.0f} MiB)")


if __name__ == "__main__":
    asyncio.run(main())
