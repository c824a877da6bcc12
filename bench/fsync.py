"""What `sync_interval: always` costs: publishes under lazy fsync vs always.

JetStream's default flushes to disk every 2 minutes (lazy): an acked write may live only
in the OS page cache, so an OS crash (power loss, kernel panic -- not a process crash) can
lose it unless a majority of its replicas survive. `always` fsyncs every write before the
ack. Each side publishes the same messages to a fresh single nats-server per setting (file
storage, R1), interleaved: ours = `Bus.publish_bytes` awaited one by one (the services'
write path: dedupe id, tracing); weak raw = `js.publish` awaited one by one (the worst case
for `always`); strong raw = `publish_async` with up to 1000 in flight, then awaited.

    python bench/fsync.py --messages 2000 --size 200 --reps 3
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path

from _harness import Figure, Run, info, interleave, parser, report, run
from nats.js.api import PubAck, StorageType, StreamConfig

from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats

SETTINGS = {"lazy": None, "always": "always"}


async def _ours(bus: Bus, subject: str, payload: bytes, n: int) -> None:
    await bus.publish_bytes(subject, payload, msg_id=f"{subject}-{n}")


async def one(side: str, sync_interval: str | None, messages: int, size: int) -> float:
    """msg/s of `messages` publishes of `size` bytes, this side, this sync_interval."""
    with tempfile.TemporaryDirectory(prefix="bench-fsync-") as tmp:
        extra: tuple[str, ...] = ()
        if sync_interval is not None:
            conf = Path(tmp) / "sync.conf"
            conf.write_text(f"jetstream {{ sync_interval: {sync_interval} }}\n")
            extra = ("-c", str(conf))
        async with (
            EmbeddedNats(Path(tmp) / "store", port=0, extra_args=extra) as server,
            connect(server.url, name="bench-fsync") as bus,
        ):
            js = bus.js
            await js.add_stream(
                StreamConfig(name="BENCH", subjects=["bench.>"], storage=StorageType.FILE)
            )
            payload = b"x" * size
            for _ in range(min(100, messages)):  # warm up: file creation, first blocks
                await js.publish("bench.warm", payload)
            started = time.perf_counter()
            pending: list[asyncio.Future[PubAck]] = []
            for i in range(messages):
                subject = f"bench.{i % 20}"
                if side == "ours":
                    await _ours(bus, subject, payload, i)
                elif side == "weak":
                    await js.publish(subject, payload)
                else:
                    pending.append(await js.publish_async(subject, payload))
                    if len(pending) >= 1000:
                        await asyncio.gather(*pending)
                        pending = []
            await asyncio.gather(*pending)
            return messages / (time.perf_counter() - started)


async def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--messages", type=int, default=2000)
    p.add_argument("--size", type=int, default=200, help="payload bytes")
    args = p.parse_args()

    def side(name: str) -> Run:
        async def measure() -> dict[str, float]:
            return {
                f"{setting} msg/s": await one(name, interval, args.messages, args.size)
                for setting, interval in SETTINGS.items()
            }

        return measure

    units = {f"{s} msg/s": ("msg/s", True) for s in SETTINGS}
    runs = {name: side(name) for name in ("ours", "weak", "strong")}
    found: list[Figure] = await interleave(args.reps, runs, units, log=info)
    lazy, always = found
    costs = ", ".join(
        f"{s} {lazy.median(s) / always.median(s):.1f}x"  # type: ignore[operator]
        for s in ("ours", "weak", "strong")
    )
    notes = f"always is slower than lazy by (medians): {costs}"
    setup = f"{args.messages} publishes of {args.size} B, R1 file storage, lazy vs always fsync"
    report("fsync", setup, found, args, notes)


if __name__ == "__main__":
    run(main)
