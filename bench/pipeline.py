"""End-to-end pipeline benchmark: sim user -> reply, Switchboard vs raw nats-py.

Both runs use a fresh embedded nats-server, the same streams and the same five hops:
SIM -> INBOUND -> (OUTBOUND + AGENT) -> (SIM_OUT + DELIVERY). Each stage is a durable
pull consumer with max_ack_pending=1 and synchronous acks, the ordering guarantee both
give. The baselines are the least nats-py code for those hops (no decoding, tracing, lease,
fencing or dead-letter handling), weak and strong (bench/_raw.py, ADR 0037); the three run
interleaved. Prints msg/s and send->reply latency (p50, p99) for each, and both ratios.

    python bench/pipeline.py --messages 300 --chats 10 --reps 3
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import nats
from _harness import info, interleave, parser, report, run
from _raw import by_template, strong_stage, weak_stage
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.app import system
from services.ops.simclient import SimUser
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.runtime.settings import load_settings


def figures(rate: float, latencies: list[float]) -> dict[str, float]:
    """msg/s and send->reply p50/p99 in ms."""
    return {"msg/s": rate, "p50 latency": pct(latencies, 0.5), "p99 latency": pct(latencies, 0.99)}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


UNITS = {"msg/s": ("msg/s", True), "p50 latency": ("ms", False), "p99 latency": ("ms", False)}


async def ours(messages: int, chats: int) -> dict[str, float]:
    """The real system (role `all`, sim transport, echo LLM) in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:
            env = {
                "NATS_URL": server.url,
                "SVC_LOG_LEVEL": "ERROR",
                "SVC_DATA_DIR": tmp,
                "SVC_CHAT_RATE": "off",  # the benchmark floods its chats by design
            }
            settings = load_settings(env)
            async with system(settings, "all") as (bus, _, _task), SimUser(bus, "default") as user:
                started = time.perf_counter()
                for i in range(messages):
                    await user.send(f"chat{i % chats}@s.whatsapp.net", f"message {i}")
                if not await user.wait_replies(600):
                    raise SystemExit("switchboard: replies missing")
                elapsed = time.perf_counter() - started
            return figures(messages / elapsed, [e.latency_ms for e in user.exchanges.values()])


def raw_stages(
    js: JetStreamContext, strong: bool, stop: asyncio.Event, work: float = 0.0
) -> list[Any]:
    """SIM -> INBOUND -> (OUTBOUND + AGENT) -> (SIM_OUT + DELIVERY), weak or strong;
    `work` seconds of model time in the core stage."""
    account = "whatsapp.default"
    hops = [
        ("SIM", "b-sim", "sim.whatsapp.default.in", [f"inbound.{account}.{{chat}}"], 0.0),
        ("INBOUND", "b-core", "inbound.>",
         [f"outbound.{account}.{{chat}}", f"agent.{account}.{{chat}}"], work),
        ("OUTBOUND", "b-egress", f"outbound.{account}.*",
         ["sim.whatsapp.default.out", f"delivery.{account}.{{chat}}"], 0.0),
    ]  # fmt: skip
    if strong:
        return [
            strong_stage(js, stream, durable, subject, by_template(targets), stop, work=w)
            for stream, durable, subject, targets, w in hops
        ]
    return [weak_stage(js, *hop[:4], stop, work=hop[4]) for hop in hops]


async def raw(messages: int, chats: int, strong: bool) -> dict[str, float]:
    """The same hops in plain nats-py."""
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:
            nc = await nats.connect(server.url)
            js = nc.jetstream()
            await ensure_streams(js)
            stop = asyncio.Event()
            sent: dict[bytes, float] = {}
            replied: dict[bytes, float] = {}
            all_replied = asyncio.Event()

            async def on_out(msg: Msg) -> None:
                replied[msg.data] = time.perf_counter()
                if len(replied) == messages:
                    all_replied.set()

            await nc.subscribe("sim.whatsapp.default.out", cb=on_out)
            tasks = [asyncio.create_task(s) for s in raw_stages(js, strong, stop)]
            started = time.perf_counter()
            for i in range(messages):
                body = f"chat{i % chats}|message {i}".encode()
                sent[body] = time.perf_counter()
                await js.publish("sim.whatsapp.default.in", body, headers={"Nats-Msg-Id": str(i)})
            await asyncio.wait_for(all_replied.wait(), 600)
            elapsed = time.perf_counter() - started
            stop.set()
            await asyncio.gather(*tasks)
            await nc.close()
            return figures(messages / elapsed, [(replied[k] - sent[k]) * 1000 for k in sent])


async def main() -> None:
    p = parser("End-to-end pipeline: ours vs raw nats-py (weak and strong)")
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--chats", type=int, default=10)
    args = p.parse_args()
    m, c = args.messages, args.chats
    runs = {
        "ours": lambda: ours(m, c),
        "weak": lambda: raw(m, c, strong=False),
        "strong": lambda: raw(m, c, strong=True),
    }
    found = await interleave(args.reps, runs, UNITS, log=info)
    report("pipeline", f"{m} messages over {c} chats, 1 account, 5 hops", found, args)


if __name__ == "__main__":
    run(main)
