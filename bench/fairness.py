"""Fairness under a flood: one chat sends N messages at once, other chats keep talking.

Real processes on a fresh embedded nats-server: `svc run whatsapp` and two `svc run core`
replicas, the echo model slowed to a fixed turn time (SVC_ECHO_LATENCY_MS). Once the whole
flood is in INBOUND, ten other chats send one message each, one after another; prints
their send->reply latency (p50/max), and how long the flood took to be answered in full.

The baseline, in the same run, is the strongest raw nats-py for the same hops (SIM ->
INBOUND -> OUTBOUND + AGENT -> SIM_OUT + DELIVERY, durable pull consumers, synchronous
acks, the same turn time in the core stage) with no flood at all: the latency the other
chats would see if the flood did not exist. The ratio says what the flood costs them.

    python bench/fairness.py --flood 400 --turn-ms 100
"""

from __future__ import annotations

import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import nats
from _harness import info, interleave, parser, report, run
from nats.aio.msg import Msg
from pipeline import raw_stages

from services.ops.simclient import SimUser
from services.runtime.bus import connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams


def _svc(*args: str, env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    script = Path(sys.executable).parent / "svc"
    with log.open("wb") as out:
        return subprocess.Popen(
            [str(script), *args],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=out,
            start_new_session=True,
        )


async def raw_run(turn_ms: int, others: int, flood: int, strong: bool) -> dict[str, float]:
    """The other chats' send->reply seconds through the raw hops (weak: nothing else
    queued; strong: after the same flood), and how long the flood took."""
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await ensure_streams(js)
            stop = asyncio.Event()
            replied: dict[bytes, asyncio.Event] = {}
            flood_done = asyncio.Event()
            order: list[bytes] = []

            async def on_out(msg: Msg) -> None:
                replied[msg.data].set()
                if msg.data.startswith(b"flood|"):
                    order.append(msg.data)
                    if len(order) == flood:
                        flood_done.set()

            await nc.subscribe("sim.whatsapp.default.out", cb=on_out)
            tasks = [asyncio.create_task(s) for s in raw_stages(js, strong, stop, turn_ms / 1000)]
            started = time.perf_counter()
            flooded = [f"flood|flood {n}".encode() for n in range(flood if strong else 0)]
            for n, body in enumerate(flooded):
                replied[body] = asyncio.Event()
                await js.publish("sim.whatsapp.default.in", body, headers={"Nats-Msg-Id": f"f{n}"})
            while flooded and (await js.stream_info("INBOUND")).state.messages < flood:  # noqa: ASYNC110
                await asyncio.sleep(0.05)  # polling the server's count, like ours
            latencies = []
            for n in range(others):
                body = f"other{n}|hi".encode()
                replied[body] = asyncio.Event()
                sent = time.perf_counter()
                await js.publish("sim.whatsapp.default.in", body, headers={"Nats-Msg-Id": str(n)})
                await asyncio.wait_for(replied[body].wait(), 600)
                latencies.append(time.perf_counter() - sent)
            if flooded:
                await asyncio.wait_for(flood_done.wait(), 3600)
                assert order == flooded, "raw strong stages broke the flood's order"
            took = time.perf_counter() - started
            stop.set()
            await asyncio.gather(*tasks)
            await nc.close()
    out = {"others p50": statistics.median(latencies) * 1000, "others max": max(latencies) * 1000}
    return out | ({"flood answered": took * 1000} if flooded else {})


async def ours(
    flood: int, turn_ms: int, others: int, rate: str, cores: int = 2
) -> dict[str, float]:
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:
            env = {k: v for k, v in os.environ.items() if not k.startswith(("NATS_", "SVC_"))} | {
                "NATS_URL": server.url,
                "SVC_DATA_DIR": tmp,
                "SVC_LOG_LEVEL": os.environ.get("SVC_LOG_LEVEL", "WARNING"),
                "SVC_ECHO_LATENCY_MS": str(turn_ms),
                "SVC_CHAT_RATE": rate,
            }
            logs = Path(os.environ.get("BENCH_LOGS", tmp))
            logs.mkdir(parents=True, exist_ok=True)  # noqa: ASYNC240 (once, before starting)
            procs = [_svc("run", "whatsapp", env=env, log=logs / "wa.log")]
            procs += [_svc("run", "core", env=env, log=logs / f"core{i}.log") for i in range(cores)]
            try:
                async with connect(server.url, name="bench") as bus:
                    await _ready(bus)
                    async with SimUser(bus, "default") as user:
                        started = time.perf_counter()
                        flooded = [
                            await user.send("flood@s.whatsapp.net", f"flood {n}")
                            for n in range(flood)
                        ]
                        while (await bus.js.stream_info("INBOUND")).state.messages < flood:  # noqa: ASYNC110
                            await asyncio.sleep(0.05)  # polling the server's count
                        ingested = time.perf_counter() - started
                        info(f"flood of {flood} in INBOUND after {ingested:.1f}s")
                        latencies = []
                        for n in range(others):
                            e = await user.send(f"other{n}@s.whatsapp.net", "hi")
                            while e.reply is None:  # noqa: ASYNC110
                                await asyncio.sleep(0.01)  # SimUser fills it in
                            latencies.append(e.latency_ms / 1000)
                        answered = sum(x.reply is not None for x in flooded)
                        p50, top = statistics.median(latencies), max(latencies)
                        info(
                            f"other chats during the flood: p50 {p50:.2f}s max {top:.2f}s"
                            f" (flood answered so far: {answered})"
                        )
                        await user.wait_replies(3600)
                        took = time.perf_counter() - started
                        ordered = [x.text for x in sorted(flooded, key=lambda x: x.replied_at)]
                        in_order = ordered == [f"flood {n}" for n in range(flood)]
                        assert in_order, "the flood was answered out of order"
                        return {
                            "others p50": p50 * 1e3,
                            "others max": top * 1e3,
                            "flood answered": took * 1e3,
                        }
            finally:
                for p in procs:
                    os.killpg(p.pid, signal.SIGTERM)
                for p in procs:
                    p.wait(30)
    raise AssertionError("unreachable")


async def _ready(bus: object) -> None:
    for _ in range(600):
        try:
            await bus.js.consumer_info("SIM", "sim-in-default")  # type: ignore[attr-defined]
            await bus.js.consumer_info("INBOUND", "core")  # type: ignore[attr-defined]
            return
        except Exception:
            await asyncio.sleep(0.05)
    raise SystemExit("roles did not start")


async def main() -> None:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--flood", type=int, default=400)
    p.add_argument("--turn-ms", type=int, default=100)
    p.add_argument("--others", type=int, default=10)
    p.add_argument("--rate", default="off", help="SVC_CHAT_RATE for the run")
    p.add_argument("--cores", type=int, default=2, help="core replicas")
    a = p.parse_args()
    runs = {
        "ours": lambda: ours(a.flood, a.turn_ms, a.others, a.rate, a.cores),
        "weak": lambda: raw_run(a.turn_ms, a.others, a.flood, strong=False),
        "strong": lambda: raw_run(a.turn_ms, a.others, a.flood, strong=True),
    }
    units = {
        "others p50": ("ms", False),
        "others max": ("ms", False),
        "flood answered": ("ms", False),
    }
    found = await interleave(a.reps, runs, units, log=info)
    setup = (
        f"flood of {a.flood} in one chat, {a.others} other chats one by one, turn {a.turn_ms} ms,"
        f" {a.cores} core replicas (weak raw: no flood; serial floor"
        f" {a.flood * a.turn_ms / 1000:.1f} s)"
    )
    report("fairness", setup, found, a)


if __name__ == "__main__":
    run(main)
