"""Projection benchmark: rebuild the plugin projection from PLUGINS (>= 200k events of
every plugin type, mostly memory facts) into a fresh SQLite file, next to raw nats-py
reads of the same stream in the same run, interleaved: weak = a pull consumer with
fetch(500); strong = an ordered push consumer (the old baseline, already the strong one).

    python bench/projection.py --events 200000 --reps 3
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from _harness import info, interleave, parser, report, run
from _raw import fetch_read, ordered_read
from nats.js.api import PubAck
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


STREAM = [("PLUGINS", "plugins.>")]


async def main() -> None:
    p = parser("Projection rebuild vs raw reads (weak and strong)")
    p.add_argument("--events", type=int, default=200_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="bench") as bus,
        ):
            await ensure_streams(bus.js)
            started = time.perf_counter()
            await generate(bus, args.events)
            info(f"{args.events} events generated in {time.perf_counter() - started:.1f} s")
            rebuilt: list[dict[str, int]] = []

            async def ours() -> dict[str, float]:
                out = Path(tmp) / f"plugins-{len(rebuilt)}.sqlite"
                async with PluginProjection(bus, out, manifests(discover())) as p:
                    started = time.perf_counter()
                    applied = await p.catch_up()
                    rate = applied / (time.perf_counter() - started)
                    rows = await p.dump()
                rebuilt.append({"facts": len(rows["facts"]), "installs": len(rows["installed"])})
                return {"events/s": rate}

            async def weak() -> dict[str, float]:
                return {"events/s": await fetch_read(bus.js, STREAM)}

            async def strong() -> dict[str, float]:
                return {"events/s": await ordered_read(bus.js, STREAM)}

            runs = {"ours": ours, "weak": weak, "strong": strong}
            found = await interleave(args.reps, runs, {"events/s": ("events/s", True)}, log=info)
    notes = f"rebuilt: {rebuilt[-1]}; peak RSS {peak_rss_mib():.0f} MiB (goal >= 0.6x strong)"
    report(
        "projection", f"rebuild of {args.events:,} PLUGINS events into SQLite", found, args, notes
    )


if __name__ == "__main__":
    run(main)
