"""Audit benchmark: `svc audit` over >= 1M events (conversations: inbound, turn, sent,
receipt, with lease changes and some failed attempts), next to raw nats-py reads of the
same streams in the same run, interleaved (weak = fetch(500) pulls, strong = ordered push
consumers, the old baseline), with peak memory; then, unless --no-replay, the projection
replay (bench/replay.py) in its own process.

    python bench/audit.py --events 1000000 --reps 3
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from _harness import info, interleave, parser, report, run
from _raw import fetch_read, ordered_read
from peak import peak_rss_mib

from contracts import subjects
from contracts.codec import encode
from contracts.events import (
    DeliveryFailed,
    DeliveryReceipt,
    LeaseAcquired,
    MessageReceived,
    MessageSent,
    TurnCompleted,
    derived_id,
)
from services.ops.audit import Scope, audit
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams

ACCOUNTS = 50
CHATS = 200  # per account
STREAMS = ("ACCOUNTS", "INBOUND", "AGENT", "DELIVERY")


async def generate(bus: Bus, events: int) -> int:
    """Publish about `events` events, like a busy deployment's log; return how many."""
    nc = bus.nc
    t0 = datetime.now(UTC) - timedelta(hours=2)
    published = 0

    async def leases(token: int, holder: str, when: datetime) -> int:
        for a in range(ACCOUNTS):
            acct = f"acct{a}"
            lease = LeaseAcquired(account=acct, holder=holder, token=token, at=when)
            await nc.publish(subjects.accounts("whatsapp", acct), encode(lease))
        return ACCOUNTS

    published += await leases(1, "worker-a", t0)
    n = 0
    job_seq = 0
    handover = events // 8 // 4  # a quarter of the way: every account changes hands
    token, holder = 1, "worker-a"
    while published < events:
        acct = f"acct{n % ACCOUNTS}"
        chat = f"u{(n // ACCOUNTS) % CHATS}@s.whatsapp.net"
        when = t0 + timedelta(minutes=3, microseconds=n * 20)
        if n == handover:
            token, holder = 2, "worker-b"
            published += await leases(token, holder, when - timedelta(microseconds=10))
        inbound = MessageReceived(
            id=derived_id("in", str(n)),
            at=when,
            account=acct,
            chat=chat,
            sender=chat,
            message_id=f"m{n}",
            text=f"message {n}",
        )
        job_id = derived_id("job", inbound.id, "0")
        job_seq += 1
        turn = TurnCompleted(
            id=derived_id("turn", inbound.id),
            at=when,
            account=acct,
            chat=chat,
            inbound_id=inbound.id,
            model="echo",
            reply_ids=[job_id],
            latency_ms=1.5,
        )
        out = [
            (subjects.inbound("whatsapp", acct, chat), encode(inbound)),
            (subjects.agent("whatsapp", acct, chat), encode(turn)),
        ]
        delivery = subjects.delivery("whatsapp", acct, chat)
        if n % 50 == 7:
            failed = DeliveryFailed(
                at=when, job_id=job_id, account=acct, chat=chat, attempt=1, error="503"
            )
            out.append((delivery, encode(failed)))
        sent = MessageSent(
            id=derived_id("sent", job_id),
            at=when,
            job_id=job_id,
            account=acct,
            chat=chat,
            holder=holder,
            lease_token=token,
            transport_message_id=f"wa{n}",
            job_seq=job_seq,
            sent_at=when,
            text=f"echo: message {n}",
        )
        receipt = DeliveryReceipt(
            at=when,
            job_id=job_id,
            account=acct,
            chat=chat,
            transport_message_id=f"wa{n}",
            status="delivered",
        )
        out += [(delivery, encode(sent)), (delivery, encode(receipt))]
        for subject, data in out:
            await nc.publish(subject, data)
        published += len(out)
        n += 1
        if n % 2000 == 0:
            await nc.flush()
    await nc.flush()
    # Plain publishes are stored asynchronously: wait until every one is in its stream.
    deadline = time.monotonic() + 120
    while await stored(bus) < published:
        if time.monotonic() > deadline:
            raise SystemExit(f"only {await stored(bus)} of {published} events were stored")
        await asyncio.sleep(0.2)
    return published


async def stored(bus: Bus) -> int:
    return sum([(await bus.js.stream_info(s)).state.messages for s in STREAMS])


async def main() -> None:
    p = parser("svc audit vs raw reads (weak and strong), then the projection replay")
    p.add_argument("--events", type=int, default=1_000_000)
    p.add_argument("--replay-events", type=int, default=None, help="default: --events")
    p.add_argument("--no-replay", action="store_true", help="only the audit")
    args = p.parse_args()
    streams = [(s, ">") for s in STREAMS]
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="bench-audit") as bus,
        ):
            await ensure_streams(bus.js)
            started = time.perf_counter()
            published = await generate(bus, args.events)
            info(f"audit: {published:,} events generated in {time.perf_counter() - started:.1f} s")
            seen: list[str] = []

            async def ours() -> dict[str, float]:
                report_, elapsed = await audit(bus, Scope(grace=0))
                seen.append(
                    f"{sum(report_.counts.values()):,} events in {elapsed:.1f} s,"
                    f" {len(report_.violations)} violations"
                )
                return {"events/s": sum(report_.counts.values()) / elapsed}

            async def weak() -> dict[str, float]:
                return {"events/s": await fetch_read(bus.js, streams)}

            async def strong() -> dict[str, float]:
                return {"events/s": await ordered_read(bus.js, streams)}

            runs = {"ours": ours, "weak": weak, "strong": strong}
            found = await interleave(args.reps, runs, {"events/s": ("events/s", True)}, log=info)
    notes = f"last audit: {seen[-1]} (goal <= 30 s for 1M); peak RSS {peak_rss_mib():.0f} MiB"
    report(
        "audit", f"svc audit (every rule + summary) over {published:,} events", found, args, notes
    )
    if not args.no_replay:
        # Its own process (and server), so its peak memory is its own.
        replay = Path(__file__).with_name("replay.py")
        argv = [sys.executable, str(replay), "--events", str(args.replay_events or args.events)]
        argv += ["--reps", str(args.reps)] + ["--markdown"] * args.markdown
        await asyncio.to_thread(subprocess.run, argv, check=True)


if __name__ == "__main__":
    run(main)
