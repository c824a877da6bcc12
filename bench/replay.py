"""Replay benchmark: `svc replay projection plugins` (the real code path, into a new file)
over a PLUGINS stream of mixed plugin events, next to a raw nats-py ordered-consumer read
of the same stream in the same run; the goal is replay >= 0.5x raw.

    python bench/replay.py --events 1000000

From another bench script whose server already holds the events in PLUGINS:

    from bench.replay import fill, measure_replay
    await fill(url, 1_000_000)          # only if PLUGINS is not filled yet
    figures = await measure_replay(url, 1_000_000)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from peak import peak_rss_mib

from bench.projection import generate, raw_read
from services.ops.replay import Reporter, Request, replay
from services.runtime.bus import connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.runtime.settings import load_settings


async def fill(url: str, events: int) -> float:
    """Publish `events` mixed plugin events to PLUGINS; return the publish rate."""
    async with connect(url, name="bench-replay-fill") as bus:
        await ensure_streams(bus.js)
        started = time.perf_counter()
        await generate(bus, events)
        return events / (time.perf_counter() - started)


async def measure_replay(url: str, events: int) -> dict[str, Any]:
    """Replay the whole PLUGINS stream (which must hold >= `events` events) into a new
    file, and read it raw before and after (the faster raw read counts: the ratio is
    conservative). Returns the figures."""
    async with connect(url, name="bench-replay") as bus:
        last = (await bus.js.stream_info("PLUGINS")).state.last_seq
        if last < events:
            raise RuntimeError(f"PLUGINS holds {last} events, fewer than {events}: fill() first")
        raw_rates = [await raw_read(bus, last)]
        with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
            settings = load_settings({"SVC_DATA_DIR": tmp, "NATS_URL": url})
            rss_before = peak_rss_mib()
            summary = await replay(
                bus, settings, Request("plugins", out=Path(tmp) / "plugins.sqlite"), Reporter()
            )
            rss_after = peak_rss_mib()
        raw_rates.append(await raw_read(bus, last))
    raw = max(raw_rates)
    return {
        "events": summary.position,
        "applied": summary.applied,
        "skipped": summary.skipped,
        "replay_seconds": round(summary.elapsed, 2),
        "replay_rate": round(summary.rate),
        "raw_rate": round(raw),
        "raw_rates": [round(r) for r in raw_rates],
        "ratio": round(summary.rate / raw, 3),
        "peak_rss_mib": round(rss_after),
        "rss_before_replay_mib": round(rss_before),
    }


def report(figures: dict[str, Any]) -> str:
    """The human-readable lines."""
    return "\n".join(
        [
            f"replay: projection 'plugins' over {figures['events']:,} PLUGINS events",
            f"  raw nats-py ordered-consumer read : {figures['raw_rate']:9,} events/s"
            f"  (runs: {', '.join(f'{r:,}' for r in figures['raw_rates'])})",
            f"  svc replay projection (new file)  : {figures['replay_rate']:9,} events/s"
            f"  ({figures['replay_seconds']} s, {figures['skipped']} skipped)",
            f"  ratio replay/raw                  : {figures['ratio']:9.2f}  (goal >= 0.5)",
            f"  peak RSS {figures['peak_rss_mib']} MiB"
            f" (before the replay {figures['rss_before_replay_mib']} MiB)",
        ]
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description="svc replay projection vs raw ordered read")
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--json", action="store_true", help="Print the figures as JSON.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replay-nats-") as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:  # stopped on exit
            publish_rate = await fill(server.url, args.events)
            print(f"published {args.events:,} events at {publish_rate:,.0f}/s", file=sys.stderr)
            figures = await measure_replay(server.url, args.events)
    print(json.dumps(figures) if args.json else report(figures))


if __name__ == "__main__":
    asyncio.run(main())
