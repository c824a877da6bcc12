"""What `sync_interval: always` costs: sequential awaited publishes, lazy fsync vs always.

JetStream's default flushes to disk every 2 minutes (lazy): an acked write may live only
in the OS page cache, so an OS crash (power loss, kernel panic -- not a process crash) can
lose it unless a majority of its replicas survive. `always` fsyncs every write before the
ack. This runs the same workload against a fresh single nats-server with each setting
(file storage, R1, one publish in flight at a time: the worst case for `always`) and
prints msg/s and the ratio.

    python bench/fsync.py --messages 2000 --size 200
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path

import nats
from nats.js.api import StorageType, StreamConfig

from services.runtime.nats_server import EmbeddedNats


async def run(sync_interval: str | None, messages: int, size: int) -> float:
    """msg/s of `messages` awaited publishes of `size` bytes with this sync_interval."""
    with tempfile.TemporaryDirectory(prefix="bench-fsync-") as tmp:
        extra: tuple[str, ...] = ()
        if sync_interval is not None:
            conf = Path(tmp) / "sync.conf"
            conf.write_text(f"jetstream {{ sync_interval: {sync_interval} }}\n")
            extra = ("-c", str(conf))
        async with EmbeddedNats(Path(tmp) / "store", port=0, extra_args=extra) as server:
            nc = await nats.connect(server.url)
            try:
                js = nc.jetstream()
                await js.add_stream(
                    StreamConfig(name="BENCH", subjects=["bench.>"], storage=StorageType.FILE)
                )
                payload = b"x" * size
                for _ in range(min(100, messages)):  # warm up: file creation, first blocks
                    await js.publish("bench.warm", payload)
                started = time.perf_counter()
                for i in range(messages):
                    await js.publish(f"bench.{i % 20}", payload)
                elapsed = time.perf_counter() - started
            finally:
                await nc.close()
    return messages / elapsed


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--size", type=int, default=200, help="payload bytes")
    parser.add_argument("--rounds", type=int, default=3, help="alternating runs per setting")
    args = parser.parse_args()
    lazy: list[float] = []
    always: list[float] = []
    for _ in range(args.rounds):  # alternate, so a noisy neighbour hurts both alike
        lazy.append(await run(None, args.messages, args.size))
        always.append(await run("always", args.messages, args.size))
    best_lazy, best_always = max(lazy), max(always)
    print(f"{args.messages} sequential awaited publishes of {args.size} B, R1 file storage")
    print(f"  default (lazy, 2 min) : {best_lazy:8.0f} msg/s  runs {[round(r) for r in lazy]}")
    print(f"  sync_interval: always : {best_always:8.0f} msg/s  runs {[round(r) for r in always]}")
    print(f"  always is {best_lazy / best_always:.1f}x slower (best of {args.rounds} each)")


if __name__ == "__main__":
    asyncio.run(main())
