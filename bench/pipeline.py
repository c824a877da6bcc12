"""End-to-end pipeline benchmark: sim user -> reply, Switchboard vs raw nats-py.

Both runs use a fresh embedded nats-server, the same streams and the same five hops:
SIM -> INBOUND -> (OUTBOUND + AGENT) -> (SIM_OUT + DELIVERY). Each stage is a durable
pull consumer with max_ack_pending=1 and synchronous acks, the ordering guarantee both
give. The baseline is the least nats-py code for those hops: no decoding, tracing,
lease, fencing or dead-letter handling. Prints msg/s and send->reply latency for both,
and the ratio.

    python bench/pipeline.py --messages 300 --chats 10
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from services.app import system
from services.ops.simclient import SimUser
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.runtime.settings import load_settings


async def ours(messages: int, chats: int) -> tuple[float, list[float]]:
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
            return messages / elapsed, [e.latency_ms for e in user.exchanges.values()]


async def _stage(
    js: JetStreamContext,
    stream: str,
    durable: str,
    subject: str,
    forward: list[str],
    stop: asyncio.Event,
    work: float = 0.0,
) -> None:
    """Consume one at a time, (spend `work` seconds on it,) publish to each next subject,
    then ack synchronously."""
    config = ConsumerConfig(
        durable_name=durable,
        filter_subject=subject,
        ack_policy=AckPolicy.EXPLICIT,
        max_ack_pending=1,
    )
    await js.add_consumer(stream, config)
    sub = await js.pull_subscribe_bind(durable=durable, stream=stream)
    while not stop.is_set():
        try:
            msgs = await sub.fetch(1, timeout=0.5)
        except TimeoutError:
            continue
        for msg in msgs:
            if work:
                await asyncio.sleep(work)  # the turn's model time
            chat = msg.data.split(b"|", 1)[0].decode()
            for target in forward:
                await js.publish(target.format(chat=chat), msg.data)
            await msg.ack_sync()


async def raw(messages: int, chats: int) -> tuple[float, list[float]]:
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
            account = "whatsapp.default"
            stages = [
                _stage(js, "SIM", "b-sim", "sim.whatsapp.default.in",
                       [f"inbound.{account}.{{chat}}"], stop),
                _stage(js, "INBOUND", "b-core", "inbound.>",
                       [f"outbound.{account}.{{chat}}", f"agent.{account}.{{chat}}"], stop),
                _stage(js, "OUTBOUND", "b-egress", f"outbound.{account}.*",
                       ["sim.whatsapp.default.out", f"delivery.{account}.{{chat}}"], stop),
            ]  # fmt: skip
            tasks = [asyncio.create_task(s) for s in stages]
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
            return messages / elapsed, [(replied[k] - sent[k]) * 1000 for k in sent]


def _latency(values: list[float]) -> str:
    values = sorted(values)
    p99 = values[min(len(values) - 1, int(len(values) * 0.99))]
    return f"(send->reply p50 {statistics.median(values):.1f} ms, p99 {p99:.1f} ms)"


async def main() -> None:
    parser = argparse.ArgumentParser(description="End-to-end pipeline: ours vs raw nats-py")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--chats", type=int, default=10)
    args = parser.parse_args()
    raw_rate, raw_lat = await raw(args.messages, args.chats)
    our_rate, our_lat = await ours(args.messages, args.chats)
    print(f"pipeline: {args.messages} messages over {args.chats} chats, 1 account, 5 hops")
    print(f"  raw nats-py, same hops : {raw_rate:8.1f} msg/s  {_latency(raw_lat)}")
    print(f"  switchboard            : {our_rate:8.1f} msg/s  {_latency(our_lat)}")
    print(f"  ratio switchboard/raw  : {our_rate / raw_rate:8.2f}")


if __name__ == "__main__":
    asyncio.run(main())
