"""Delivery benchmark: jobs/s and enqueue -> sent latency, Switchboard vs raw nats-py.

Throughput: a backlog of jobs (20 chats per account) is queued on OUTBOUND, then the
senders start; we time until every job is sent. Latency: jobs are queued at a steady
rate while the senders run; we time each from its publish to its send.

Switchboard's path per job: per-chat ordered consumer, ledger record before the send,
lease proof, the sim transport send, MessageSent + ledger + receipt index, ack.
The raw baselines do the same hops in plain nats-py, one consumer per account. Weak (the
old one): fetch(64), publish the event, send, ack each awaited -- no ordering, fencing or
ledger. Strong (bench/_raw.py): a push consumer, per-chat serial with chats in parallel,
the ledger's "sending" record stored before the send, then the send, the event and the
"sent" record pipelined (`publish_async`), then the ack. Interleaved reps.

    python bench/delivery.py --jobs 2000 --accounts 1 50 --reps 3

`--sim-send plain` gives ours strong raw's transport (a plain publish: no network lease
check, nothing stored on SIM_OUT), to tell the egress's cost from the sim network's
(ADR 0039).
"""

from __future__ import annotations

import asyncio
import os
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import nats.js.errors
from _harness import Figure, info, interleave, parser, report, run
from _raw import strong_stage
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig

from contracts import subjects
from contracts.codec import decode
from contracts.events import SendMessage, new_id
from contracts.payloads import SimOutbound
from services.app import run_role
from services.channel.port import Outgoing
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.runtime.settings import load_settings
from services.whatsapp.sim import SimSession

CHATS = 20


def accounts(n: int) -> list[str]:
    return ["default"] if n == 1 else [f"acct{i:02d}" for i in range(n)]


async def enqueue(bus: Bus, accts: list[str], jobs: int, stamps: dict[str, float] | None) -> None:
    """Queue `jobs` jobs round-robin over accounts and their chats, 500 in flight."""
    pending: list[Awaitable[object]] = []
    for n in range(jobs):
        account = accts[n % len(accts)]
        chat = f"c{(n // len(accts)) % CHATS}@s.whatsapp.net"
        job_id = new_id()
        job = SendMessage(id=job_id, job_id=job_id, account=account, chat=chat, text=f"#{n}")
        if stamps is not None:
            stamps[job_id] = time.perf_counter()
        pending.append(bus.publish(subjects.outbound("whatsapp", account, chat), job))
        if len(pending) >= 500:
            await asyncio.gather(*pending)
            pending = []
    await asyncio.gather(*pending)


class Sent:
    """Counts sends seen on `sim.whatsapp.*.out` and when each job arrived."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.at: dict[str, float] = {}
        self.done = asyncio.Event()

    async def on(self, msg: Msg) -> None:
        job_id = decode(msg.data, SimOutbound).job_id if msg.data[:1] == b"{" else msg.data.decode()
        self.at.setdefault(job_id, time.perf_counter())
        if len(self.at) >= self.total:
            self.done.set()


Runner = Callable[[Bus, list[str], asyncio.Event], Awaitable[None]]


async def plain_send(self: SimSession, out: Outgoing) -> str:
    """Strong raw's transport in place of the sim network's send (`--sim-send plain`)."""
    await self.bus.nc.publish(self.subject, out.job_id.encode())
    return f"sim-{out.job_id}"


async def ours(bus: Bus, accts: list[str], stop: asyncio.Event) -> None:
    env = {
        "WHATSAPP_ACCOUNTS": ",".join(accts),
        "SVC_LOG_LEVEL": os.environ.get("BENCH_LOG", "ERROR"),
    }
    await run_role(bus, load_settings(env), "whatsapp", stop)


async def raw(bus: Bus, accts: list[str], stop: asyncio.Event) -> None:
    async def one(account: str) -> None:
        config = ConsumerConfig(
            durable_name=f"raw-{account}",
            ack_policy=AckPolicy.EXPLICIT,
            filter_subject=f"outbound.whatsapp.{account}.*",
            max_ack_pending=1000,
        )
        await bus.js.add_consumer("OUTBOUND", config)
        sub = await bus.js.pull_subscribe_bind(durable=f"raw-{account}", stream="OUTBOUND")
        while not stop.is_set():
            try:
                msgs = await sub.fetch(64, timeout=0.25)
            except TimeoutError:
                continue
            for msg in msgs:
                job = decode(msg.data, SendMessage)
                # the event (and, like ours, what the network sees)
                await bus.js.publish(f"delivery.whatsapp.{account}.x", msg.data)
                await bus.nc.publish(subjects.sim_out(account), job.job_id.encode())
                await msg.ack_sync()

    await asyncio.gather(*(one(a) for a in accts))
    await asyncio.sleep(0.3)  # let the last pulls expire before the server goes


async def strong(bus: Bus, accts: list[str], stop: asyncio.Event) -> None:
    def ledger(state: str) -> Callable[[Msg], list[tuple[str, bytes, dict[str, str] | None]]]:
        def write(msg: Msg) -> list[tuple[str, bytes, dict[str, str] | None]]:
            job = decode(msg.data, SendMessage)
            key = subjects.send_key(job.account, job.job_id)
            record = f'{{"state":"{state}","job":"{job.job_id}"}}'.encode()
            return [(f"$KV.sends.{key}", record, None)]

        return write

    def after(msg: Msg) -> list[tuple[str, bytes, dict[str, str] | None]]:
        account = msg.subject.split(".")[2]
        event = (
            f"delivery.whatsapp.{account}.x",
            msg.data,
            {"Nats-Msg-Id": f"s{msg.metadata.sequence.stream}"},
        )
        return [event, *ledger("sent")(msg)]

    async def send(msg: Msg) -> None:
        job = decode(msg.data, SendMessage)
        await bus.nc.publish(subjects.sim_out(job.account), job.job_id.encode())

    await asyncio.gather(
        *(
            strong_stage(
                bus.js,
                "OUTBOUND",
                f"strong-{account}",
                f"outbound.whatsapp.{account}.*",
                after,
                stop,
                chat_of=lambda m: m.subject.rsplit(".", 1)[1],
                before=ledger("sending"),
                core=send,
            )
            for account in accts
        )
    )


PREFIX = {"raw": "raw", "strong": "strong", "ours": "egress-whatsapp"}


async def measure(runner: Runner, accts: list[str], jobs: int, rate: float) -> dict[str, float]:
    """(jobs/s on a backlog, enqueue->sent latencies in ms at `rate` jobs/s)."""
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="bench") as bus,
        ):
            await ensure_streams(bus.js)
            sent = Sent(jobs)
            await bus.nc.subscribe("sim.whatsapp.*.out", cb=sent.on)
            stop = asyncio.Event()
            task = asyncio.create_task(runner(bus, accts, stop))
            await ready(bus, accts, PREFIX[runner.__name__])
            started = time.perf_counter()
            await enqueue(bus, accts, jobs, None)
            await asyncio.wait_for(sent.done.wait(), 600)
            throughput = jobs / (time.perf_counter() - started)
            # Latency under a steady load, senders warm.
            paced = Sent(min(jobs, 1000))
            stamps: dict[str, float] = {}
            await bus.nc.subscribe("sim.whatsapp.*.out", cb=paced.on)
            for _ in range(paced.total):
                await enqueue(bus, accts, 1, stamps)
                await asyncio.sleep(1 / rate)
            await asyncio.wait_for(paced.done.wait(), 600)
            stop.set()
            await task
            latencies = sorted((paced.at[j] - t) * 1000 for j, t in stamps.items())
            return {
                "jobs/s": throughput,
                "p50 latency": pct(latencies, 0.5),
                "p99 latency": pct(latencies, 0.99),
            }


async def ready(bus: Bus, accts: list[str], prefix: str) -> None:
    """Wait until every account's consumer has a pull request waiting or a push
    subscriber bound (senders attached)."""
    for account in accts:
        while True:
            try:
                info = await bus.js.consumer_info("OUTBOUND", f"{prefix}-{account}")
                if info.num_waiting or info.push_bound:
                    break
            except nats.js.errors.NotFoundError:
                pass
            await asyncio.sleep(0.05)


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * q))]


async def main() -> None:
    p = parser("Delivery: ours vs raw nats-py (weak and strong)")
    p.add_argument("--jobs", type=int, default=2000)
    p.add_argument("--accounts", type=int, nargs="+", default=[1, 50])
    p.add_argument("--rate", type=float, default=200.0, help="jobs/s for the latency run")
    p.add_argument(
        "--sim-send",
        choices=("network", "plain"),
        default="network",
        help="ours sends through the sim network (default) or with a plain publish, as raw",
    )
    args = p.parse_args()
    if args.sim_send == "plain":
        SimSession.send = plain_send  # type: ignore[method-assign]
    units = {
        "jobs/s": ("jobs/s", True),
        "p50 latency": ("ms", False),
        "p99 latency": ("ms", False),
    }
    found: list[Figure] = []
    for n in args.accounts:
        accts = accounts(n)
        j, r = args.jobs, args.rate
        runs = {
            "ours": lambda a=accts, j=j, r=r: measure(ours, a, j, r),
            "weak": lambda a=accts, j=j, r=r: measure(raw, a, j, r),
            "strong": lambda a=accts, j=j, r=r: measure(strong, a, j, r),
        }
        figures = await interleave(args.reps, runs, units, log=info)
        for f in figures:
            f.name = f"{n} account(s) {f.name}"
        found += figures
    setup = f"{args.jobs} jobs, {CHATS} chats per account, latency at {args.rate:g} jobs/s"
    if args.sim_send == "plain":
        setup += ", ours with a plain-publish send (--sim-send plain)"
    report("delivery", setup, found, args)


if __name__ == "__main__":
    run(main)
