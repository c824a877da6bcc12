"""Failover benchmark: how long an account goes without a sender when its owner dies.

Each run starts a fresh nats-server and two `svc run whatsapp` processes for one account,
keeps jobs flowing (one every 10 ms), then kills the owner and times the gap to the first
send by the new owner, as the simulated network saw it:
  kill -9  (the key must expire: goal <= TTL + 1 s)
  SIGTERM  (graceful release, a standby wakes at once: goal <= 1 s)

    python bench/failover.py --runs 5 --ttl 5
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import msgspec

from contracts import subjects
from contracts.codec import decode
from contracts.events import SendMessage, new_id
from contracts.payloads import SimOutbound
from services.runtime.bus import Bus, connect
from services.runtime.lease import LeaseValue
from services.runtime.nats_server import EmbeddedNats

SVC = str(Path(sys.executable).parent / "svc")


async def owner(bus: Bus) -> str | None:
    try:
        kv = await bus.js.key_value("leases")
        entry = await kv.get("whatsapp.default")
    except Exception:  # not provisioned yet, or nobody holds it
        return None
    value = msgspec.json.decode(entry.value or b"{}", type=LeaseValue)
    return value.holder if value.token else None


def _start_worker(env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [SVC, "run", "whatsapp"],
        env=env,
        start_new_session=True,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )


async def one_run(how: signal.Signals, ttl: int) -> float:
    """Seconds from the signal to the first send by another holder."""
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:
            env = {
                **os.environ,
                "NATS_URL": server.url,
                "WHATSAPP_LEASE_TTL": str(ttl),
                "SVC_LOG_LEVEL": "WARNING",
                "SVC_DATA_DIR": tmp,
            }
            procs = [_start_worker(env) for _ in range(2)]
            try:
                async with connect(server.url, name="bench-failover") as bus:
                    return await _measure(bus, procs, how)
            finally:
                for p in procs:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(p.pid, signal.SIGKILL)
                    p.wait()


async def _measure(bus: Bus, procs: list[subprocess.Popen[bytes]], how: signal.Signals) -> float:
    while (first := await owner(bus)) is None:  # noqa: ASYNC110 -- polling the KV, no event
        await asyncio.sleep(0.05)
    takeover = asyncio.get_running_loop().create_future()

    async def on_send(msg: object) -> None:
        out = decode(msg.data, SimOutbound)  # type: ignore[attr-defined]
        if out.holder != first and not takeover.done():
            takeover.set_result(time.monotonic())

    sub = await bus.nc.subscribe(subjects.sim_out("default"), cb=on_send)
    stop = asyncio.Event()
    traffic = asyncio.create_task(_traffic(bus, stop))
    # Steady traffic first, for a random while: the fault lands anywhere between renewals.
    await asyncio.sleep(random.uniform(1.0, 2.0))
    pid = int(re.search(r"-(\d+)-whatsapp-", first).group(1))  # type: ignore[union-attr]
    signalled = time.monotonic()
    os.kill(pid, how)
    try:
        return float(await asyncio.wait_for(takeover, 60)) - signalled
    finally:
        stop.set()
        await traffic
        await sub.unsubscribe()


async def _traffic(bus: Bus, stop: asyncio.Event) -> None:
    n = 0
    while not stop.is_set():
        job_id = new_id()
        chat = f"c{n % 5}@s.whatsapp.net"
        job = SendMessage(id=job_id, job_id=job_id, account="default", chat=chat, text=f"#{n}")
        await bus.publish(subjects.outbound("whatsapp", "default", chat), job)
        n += 1
        await asyncio.sleep(0.01)


async def main() -> None:
    parser = argparse.ArgumentParser(description="Failover gap: kill -9 and SIGTERM")
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--ttl", type=int, default=5, help="WHATSAPP_LEASE_TTL in seconds")
    args = parser.parse_args()
    print(f"failover: {args.runs} runs each, WHATSAPP_LEASE_TTL={args.ttl}s, 2 workers, 1 account")
    for how, goal in ((signal.SIGKILL, args.ttl + 1.0), (signal.SIGTERM, 1.0)):
        gaps = [await one_run(how, args.ttl) for _ in range(args.runs)]
        verdict = "within" if max(gaps) <= goal else "OVER"
        median = statistics.median(gaps)
        print(
            f"  {how.name:<8} -> first send by the new owner: median {median:.2f} s,"
            f" max {max(gaps):.2f} s  (goal <= {goal:.1f} s, {verdict};"
            f" median/TTL {median / args.ttl:.2f})"
        )


if __name__ == "__main__":
    asyncio.run(main())
