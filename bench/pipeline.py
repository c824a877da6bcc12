"""End-to-end pipeline benchmark: sim user -> reply, Switchboard vs raw nats-py.

Both runs use a fresh embedded nats-server, the same streams and the same five hops:
SIM -> INBOUND -> (OUTBOUND + AGENT) -> (SIM_OUT + DELIVERY). Each stage is a durable
pull consumer with max_ack_pending=1 and synchronous acks, the ordering guarantee both
give. The baselines are the least nats-py code for those hops (no decoding, tracing, lease,
fencing or dead-letter handling), weak and strong (bench/_raw.py, ADR 0037); the three run
interleaved. Each run floods `--messages` (sent one after another as fast as accepted:
msg/s and the queueing latency), then sends `--paced` more at a gentle `--rate` (the
low-load send->reply latency, p50 and p99). Prints both ratios for each figure.

    python bench/pipeline.py --messages 300 --chats 10 --paced 200 --rate 50 --reps 3
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
from _system import sim_system
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams


def figures(rate: float, flood: list[float], paced: list[float]) -> dict[str, float]:
    """msg/s of the flood, and send->reply p50/p99 in ms of the flood and the paced run."""
    out = {
        "msg/s": rate,
        "flood p50 latency": pct(flood, 0.5),
        "flood p99 latency": pct(flood, 0.99),
    }
    if paced:
        out |= {"paced p50 latency": pct(paced, 0.5), "paced p99 latency": pct(paced, 0.99)}
    return out


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


UNITS = {
    "msg/s": ("msg/s", True),
    "flood p50 latency": ("ms", False),
    "flood p99 latency": ("ms", False),
    "paced p50 latency": ("ms", False),
    "paced p99 latency": ("ms", False),
}


async def ours(messages: int, chats: int, paced: int, rate: float) -> dict[str, float]:
    """The real system (role `all`, sim transport, echo LLM) in this process."""
    async with sim_system() as (_, user):
        started = time.perf_counter()
        flood = [
            await user.send(f"chat{i % chats}@s.whatsapp.net", f"message {i}")
            for i in range(messages)
        ]
        if not await user.wait_replies(600):
            raise SystemExit("switchboard: replies missing")
        elapsed = time.perf_counter() - started
        gentle = []
        for i in range(paced):  # low load: one message every 1/rate s
            gentle.append(await user.send(f"chat{i % chats}@s.whatsapp.net", f"paced {i}"))
            await asyncio.sleep(1 / rate)
        if not await user.wait_replies(600):
            raise SystemExit("switchboard: paced replies missing")
    return figures(
        messages / elapsed, [e.latency_ms for e in flood], [e.latency_ms for e in gentle]
    )


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


async def raw(messages: int, chats: int, paced: int, rate: float, strong: bool) -> dict[str, float]:
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
            expected = [messages]

            async def on_out(msg: Msg) -> None:
                replied[msg.data] = time.perf_counter()
                if len(replied) == expected[0]:
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
            flood = [(replied[k] - sent[k]) * 1000 for k in sent]
            all_replied.clear()
            expected[0] += paced
            gentle = []
            for i in range(paced):  # low load: one message every 1/rate s
                body = f"chat{i % chats}|paced {i}".encode()
                gentle.append(body)
                sent[body] = time.perf_counter()
                await js.publish("sim.whatsapp.default.in", body, headers={"Nats-Msg-Id": f"p{i}"})
                await asyncio.sleep(1 / rate)
            if paced:
                await asyncio.wait_for(all_replied.wait(), 600)
            stop.set()
            await asyncio.gather(*tasks)
            await nc.close()
            return figures(
                messages / elapsed, flood, [(replied[k] - sent[k]) * 1000 for k in gentle]
            )


async def main() -> None:
    p = parser("End-to-end pipeline: ours vs raw nats-py (weak and strong)")
    p.add_argument("--messages", type=int, default=300)
    p.add_argument("--chats", type=int, default=10)
    p.add_argument("--paced", type=int, default=200, help="messages of the low-load run")
    p.add_argument("--rate", type=float, default=50.0, help="msg/s of the low-load run")
    args = p.parse_args()
    m, c, n, r = args.messages, args.chats, args.paced, args.rate
    runs = {
        "ours": lambda: ours(m, c, n, r),
        "weak": lambda: raw(m, c, n, r, strong=False),
        "strong": lambda: raw(m, c, n, r, strong=True),
    }
    found = await interleave(args.reps, runs, UNITS, log=info)
    setup = (
        f"flood of {m} messages over {c} chats, then {n} paced at {r:g} msg/s; 1 account, 5 hops"
    )
    report("pipeline", setup, found, args)


if __name__ == "__main__":
    run(main)
