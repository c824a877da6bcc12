"""Replay benchmark: `svc replay projection plugins` (the real code path, into a new file)
over a PLUGINS stream of mixed plugin events, next to raw nats-py reads of the same
stream in the same run, interleaved: weak = a pull consumer with fetch(500), strong = an
ordered push consumer (the old baseline). The goal is replay >= 0.5x strong.

    python bench/replay.py --events 1000000 --reps 3
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

from _harness import info, interleave, parser, report, run
from _raw import fetch_read, ordered_read
from peak import peak_rss_mib

from bench.projection import generate
from services.ops.replay import Reporter, Request, replay
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.runtime.settings import load_settings

STREAM = [("PLUGINS", "plugins.>")]


async def fill(bus: Bus, events: int) -> float:
    """Publish `events` mixed plugin events to PLUGINS; return the publish rate."""
    await ensure_streams(bus.js)
    started = time.perf_counter()
    await generate(bus, events)
    return events / (time.perf_counter() - started)


async def main() -> None:
    p = parser("svc replay projection vs raw reads (weak and strong)")
    p.add_argument("--events", type=int, default=1_000_000)
    args = p.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,  # stopped on exit
            connect(server.url, name="bench-replay") as bus,
        ):
            rate = await fill(bus, args.events)
            info(f"published {args.events:,} events at {rate:,.0f}/s")
            settings = load_settings({"SVC_DATA_DIR": tmp, "NATS_URL": server.url})
            done: list[int] = []

            async def ours() -> dict[str, float]:
                out = Path(tmp) / f"plugins-{len(done)}.sqlite"
                summary = await replay(bus, settings, Request("plugins", out=out), Reporter())
                done.append(summary.skipped)
                return {"events/s": summary.rate}

            async def weak() -> dict[str, float]:
                return {"events/s": await fetch_read(bus.js, STREAM)}

            async def strong() -> dict[str, float]:
                return {"events/s": await ordered_read(bus.js, STREAM)}

            runs = {"ours": ours, "weak": weak, "strong": strong}
            found = await interleave(args.reps, runs, {"events/s": ("events/s", True)}, log=info)
    notes = f"skipped {done[-1]}; peak RSS {peak_rss_mib():.0f} MiB (goal >= 0.5x strong)"
    setup = f"svc replay projection plugins over {args.events:,} PLUGINS events (new file)"
    report("replay", setup, found, args, notes)


if __name__ == "__main__":
    run(main)
