"""Failover benchmark: how long an account goes without a sender when its owner dies.

Each run starts a fresh nats-server and two `svc run whatsapp` processes for one account,
keeps jobs flowing (one every 10 ms), then kills the owner and times the gap to the first
send by the new owner, as the simulated network saw it:
  kill -9  (the key must expire: goal <= TTL + 1 s)
  SIGTERM  (graceful release, a standby wakes at once: goal <= 1 s)

The raw baselines, interleaved with ours, are the same lease in plain nats-py in this
process (two connections: a holder that creates the key with the TTL, renews it by a
revision-checked publish every TTL/3 and sends every 10 ms; a standby that retries
`create`): a kill drops the holder's tasks and connection without a release, a SIGTERM
deletes the key. Weak: the standby retries every second. Strong: it retries every 100 ms
and watches the key, so a release wakes it at once.

    python bench/failover.py --runs 5 --ttl 5
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgspec
import nats
import nats.js.errors
from _harness import info, interleave, parser, report, run

from contracts import subjects
from contracts.codec import decode
from contracts.events import SendMessage, new_id
from contracts.payloads import SimOutbound
from services.runtime.bus import Bus, connect
from services.runtime.lease import LeaseValue
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams

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
    try:
        # Steady traffic first, for a random while: the fault lands anywhere between renewals.
        await asyncio.sleep(random.uniform(1.0, 2.0))
        pid = int(re.search(r"-(\d+)-whatsapp-", first).group(1))  # type: ignore[union-attr]
        signalled = time.monotonic()
        os.kill(pid, how)
        return float(await asyncio.wait_for(takeover, 60)) - signalled
    finally:
        stop.set()
        await traffic  # interrupted or not: no publish outlives the connection
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


async def raw_run(how: signal.Signals, ttl: int, strong: bool) -> float:
    """Seconds from the 'signal' to the raw standby's first send."""
    key, out = "raw.default", "raw.out"
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:
            holder_nc = await nats.connect(server.url)
            standby_nc = await nats.connect(server.url)
            try:
                await ensure_streams(holder_nc.jetstream())
                return await _raw_measure(holder_nc, standby_nc, key, out, how, ttl, strong)
            finally:
                for nc in (holder_nc, standby_nc):
                    if not nc.is_closed:
                        await nc.close()


async def _raw_measure(
    holder_nc: nats.NATS,
    standby_nc: nats.NATS,
    key: str,
    out: str,
    how: signal.Signals,
    ttl: int,
    strong: bool,
) -> float:
    hkv = await holder_nc.jetstream().key_value("leases")
    skv = await standby_nc.jetstream().key_value("leases")
    revision = await hkv.create(key, b"holder", msg_ttl=ttl)

    async def hold() -> None:
        nonlocal revision

        async def renew() -> None:
            nonlocal revision
            while True:
                await asyncio.sleep(ttl / 3)
                ack = await holder_nc.jetstream().publish(
                    f"$KV.leases.{key}",
                    b"holder",
                    msg_ttl=ttl,
                    headers={"Nats-Expected-Last-Subject-Sequence": str(revision)},
                )
                revision = ack.seq

        renewing = asyncio.create_task(renew())
        try:
            while True:
                await holder_nc.publish(out, b"holder")
                await asyncio.sleep(0.01)
        finally:
            renewing.cancel()

    released = asyncio.Event()

    async def watch() -> None:
        watcher = await skv.watch(key)
        async for entry in watcher:
            if entry is not None and entry.operation in ("DEL", "PURGE"):
                released.set()

    async def standby() -> None:
        while True:
            try:
                await skv.create(key, b"standby", msg_ttl=ttl)
                break
            except nats.js.errors.KeyWrongLastSequenceError:
                released.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(released.wait(), 0.1 if strong else 1.0)
        while True:
            await standby_nc.publish(out, b"standby")
            await asyncio.sleep(0.01)

    takeover = asyncio.get_running_loop().create_future()

    async def on_send(msg: object) -> None:
        if msg.data == b"standby" and not takeover.done():  # type: ignore[attr-defined]
            takeover.set_result(time.monotonic())

    await standby_nc.subscribe(out, cb=on_send)
    tasks = [asyncio.create_task(hold()), asyncio.create_task(standby())]
    if strong:
        tasks.append(asyncio.create_task(watch()))
    try:
        await asyncio.sleep(random.uniform(1.0, 2.0))  # the fault lands anywhere
        signalled = time.monotonic()
        tasks[0].cancel()
        if how == signal.SIGKILL:
            await holder_nc.close()  # gone, the key stays until its TTL
        else:
            await hkv.delete(key, last=revision)  # a graceful release
        return float(await asyncio.wait_for(takeover, 60)) - signalled
    finally:
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task


async def main() -> None:
    p = parser("Failover gap: kill -9 and SIGTERM, ours vs a raw nats-py lease")
    p.add_argument("--runs", type=int, default=None, help="old name of --reps")
    p.add_argument("--ttl", type=int, default=5, help="WHATSAPP_LEASE_TTL in seconds")
    args = p.parse_args()
    if args.runs:
        args.reps = args.runs
    ttl = args.ttl

    def side(strong: bool | None) -> Any:
        async def measure() -> dict[str, float]:
            values = {}
            for how in (signal.SIGKILL, signal.SIGTERM):
                gap = await (one_run(how, ttl) if strong is None else raw_run(how, ttl, strong))
                values[f"{how.name} gap"] = gap * 1000
            return values

        return measure

    runs = {"ours": side(None), "weak": side(False), "strong": side(True)}
    units = {"SIGKILL gap": ("ms", False), "SIGTERM gap": ("ms", False)}
    found = await interleave(args.reps, runs, units, log=info)
    kill, term = (max(f.samples["ours"]) / 1000 for f in found)
    notes = (
        f"goals: SIGKILL <= TTL + 1 = {ttl + 1:.1f} s (ours max {kill:.2f} s),"
        f" SIGTERM <= 1.0 s (ours max {term:.2f} s); raw runs in this process (no process"
        " exit or start-up in its gap)"
    )
    setup = f"WHATSAPP_LEASE_TTL={ttl}s, 2 workers, 1 account, a send every 10 ms"
    report("failover", setup, found, args, notes)


if __name__ == "__main__":
    run(main)
