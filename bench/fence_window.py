"""The lease's remaining window under a slow send (ADR 0007), measured two ways.

1. In process: how long a sim send takes from its last fence check (the deadline, right
   before the publish) until the network has stored it -- the span a pause (SIGSTOP, GC,
   VM migration) would have to hit for a stale send to land after a takeover. Sequential
   and with 8 sends in flight.
2. With processes: two `svc run whatsapp` workers (TTL 2, 400 ms sim latency, 8 chats),
   the owner SIGSTOPped while its sends sit in the transport until the standby has sent,
   then SIGCONT. Counts the paused owner's sends after the takeover (interleaved: must be
   0), its in-flight sends refused as stale (others are cancelled when it notices the
   loss first: not sent either), and jobs sent twice (published, not yet recorded when
   paused: each recorded DeliveryUncertain -- the delivery window, not ownership).

The raw baselines for 1., interleaved with ours: the same publish to the sim's subject
in plain nats-py, timed from the call to the ack -- weak: `js.publish` awaited (8 in flight
as 8 awaited publishes gathered); strong: `publish_async` and its ack future.

    python bench/fence_window.py --sends 2000 --runs 3 --reps 3
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _harness import info, interleave, parser, report, run

from contracts import subjects
from contracts.codec import decode
from contracts.events import SendMessage, new_id
from contracts.payloads import SimFailure, SimOutbound
from services.channel.dispatch import EventDispatch
from services.channel.port import Fence, Outgoing
from services.runtime.bus import Bus, connect
from services.runtime.lease import Lease, read_lease
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.runtime.settings import SimFaults
from services.whatsapp.sim import SimTransport

SVC = str(Path(sys.executable).parent / "svc")


def _figures(spans: list[float], parallel: int) -> dict[str, float]:
    ordered = sorted(spans)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {
        f"{parallel} in flight median": statistics.median(ordered) * 1000,
        f"{parallel} in flight p99": p99 * 1000,
    }


async def check_to_stored(sends: int) -> dict[str, float]:
    """Time from the sim's last check to the network's ack, per send."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="bench-fence") as bus,
        ):
            await ensure_streams(bus.js)
            lease = Lease(bus, "whatsapp", "default", "bench", 30)
            assert await lease.try_acquire()
            spans: list[float] = []
            publish = bus.publish_bytes

            async def timed(*args: Any, **kwargs: Any) -> Any:
                # Called right after the deadline check, with nothing awaited in between.
                started = time.perf_counter()
                try:
                    return await publish(*args, **kwargs)
                finally:
                    spans.append(time.perf_counter() - started)

            bus.publish_bytes = timed  # type: ignore[method-assign]

            async def ignore(_event: object) -> None:
                return None

            transport = SimTransport(bus, SimFaults())
            async with (
                EventDispatch(ignore) as events,
                transport.session("default", events, receive=False) as session,
            ):
                for parallel in (1, 8):
                    spans.clear()

                    async def one(n: int, run: int = parallel) -> None:
                        fence = Fence("bench", lease.token, deadline=lease.deadline)
                        await session.send(Outgoing(f"c{n % 8}", "x", f"j{run}-{n}", fence))

                    for start in range(0, sends, parallel):
                        await asyncio.gather(*(one(n) for n in range(start, start + parallel)))
                    figures |= _figures(spans, parallel)
            await lease.release()
    return figures


async def raw_to_stored(sends: int, strong: bool) -> dict[str, float]:
    """The same publishes in plain nats-py, call -> ack per publish."""
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="bench-fence-raw") as bus,
        ):
            await ensure_streams(bus.js)
            js, subject, body = bus.js, subjects.sim_out("default"), b"x" * 200
            for parallel in (1, 8):
                spans: list[float] = []

                async def one(n: int, run: int = parallel, spans: list[float] = spans) -> None:
                    started = time.perf_counter()
                    headers = {"Nats-Msg-Id": f"j{run}-{n}"}
                    if strong:
                        await await_ack(await js.publish_async(subject, body, headers=headers))
                    else:
                        await js.publish(subject, body, headers=headers)
                    spans.append(time.perf_counter() - started)

                for start in range(0, sends, parallel):
                    await asyncio.gather(*(one(n) for n in range(start, start + parallel)))
                figures |= _figures(spans, parallel)
    return figures


async def await_ack(future: asyncio.Future[Any]) -> None:
    await future


def _start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [SVC, "run", "whatsapp"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def pause_run(ttl: int, latency_ms: int) -> dict[str, int]:
    """One SIGSTOP-past-the-TTL run; what became of the paused owner's sends."""
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:
            env = {
                **os.environ,
                "NATS_URL": server.url,
                "WHATSAPP_LEASE_TTL": str(ttl),
                "SIM_SEND_LATENCY_MS": str(latency_ms),
                "SVC_LOG_LEVEL": "WARNING",
                "SVC_DATA_DIR": tmp,
            }
            procs = [_start_worker(env) for _ in range(2)]
            try:
                async with connect(server.url, name="bench-pause") as bus:
                    return await _pause(bus)
            finally:
                for p in procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGCONT)
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


async def _holder(bus: Bus) -> str | None:
    try:
        found = await read_lease(await bus.js.key_value("leases"), "whatsapp.default")
    except Exception:  # not provisioned yet
        return None
    return found[0].holder if found and found[0].token else None


async def _pause(bus: Bus) -> dict[str, int]:
    while (first := await _holder(bus)) is None:  # noqa: ASYNC110 -- polling the KV
        await asyncio.sleep(0.05)
    seen: list[SimOutbound] = []
    refused: list[SimFailure] = []
    changed = asyncio.Event()

    async def on_send(msg: Any) -> None:
        seen.append(decode(msg.data, SimOutbound))
        changed.set()

    async def on_failure(msg: Any) -> None:
        refused.append(decode(msg.data, SimFailure))

    subs = [
        await bus.nc.subscribe(subjects.sim_out("default"), cb=on_send),
        await bus.nc.subscribe(subjects.sim_failures("default"), cb=on_failure),
    ]
    for n in range(200):
        job_id = new_id()
        chat = f"c{n % 8}@s.whatsapp.net"
        job = SendMessage(id=job_id, job_id=job_id, account="default", chat=chat, text=f"#{n}")
        await bus.publish(subjects.outbound("whatsapp", "default", chat), job)
    while len(seen) < 16:
        changed.clear()
        await asyncio.wait_for(changed.wait(), 60)
    pid = int(re.search(r"-(\d+)-whatsapp-", first).group(1))  # type: ignore[union-attr]
    os.kill(pid, signal.SIGSTOP)
    try:
        while not any(s.holder != first for s in seen):
            changed.clear()
            await asyncio.wait_for(changed.wait(), 60)
    finally:
        os.kill(pid, signal.SIGCONT)
    while len({s.job_id for s in seen}) < 200:
        changed.clear()
        await asyncio.wait_for(changed.wait(), 60)
    for sub in subs:
        await sub.unsubscribe()
    takeover = next(i for i, s in enumerate(seen) if s.holder != first)
    return {
        "refused as stale": sum("send refused" in f.error for f in refused),
        "sent by the paused owner after the takeover": sum(
            s.holder == first for s in seen[takeover:]
        ),
        "sent twice": len(seen) - len({s.job_id for s in seen}),
    }


async def main() -> None:
    p = parser("The lease window under a slow send")
    p.add_argument("--sends", type=int, default=2000)
    p.add_argument("--runs", type=int, default=3, help="pause-past-the-TTL runs")
    args = p.parse_args()
    n = args.sends
    runs = {
        "ours": lambda: check_to_stored(n),
        "weak": lambda: raw_to_stored(n, strong=False),
        "strong": lambda: raw_to_stored(n, strong=True),
    }
    units = {f"{k} in flight {q}": ("ms", False) for k in (1, 8) for q in ("median", "p99")}
    found = await interleave(args.reps, runs, units, log=info)
    for f in found:
        f.name = f"check->stored {f.name}"
    lines = [f"pause past the TTL: {args.runs} runs, TTL 2 s, 400 ms sim latency, 8 chats"]
    for _ in range(args.runs):
        lines.append("  " + ", ".join(f"{k}: {v}" for k, v in (await pause_run(2, 400)).items()))
    report("fence_window", f"{n} sim sends, no injected latency", found, args, "\n".join(lines))


if __name__ == "__main__":
    run(main)
