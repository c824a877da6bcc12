"""Read a stream from a sequence, in order, with bounded memory and no loss.

An ephemeral pull consumer (no acks, in memory, removed when idle). The reader sends its
own pull requests to an inbox whose callback only queues what arrives, and asks for the
next batch when half of the current one has arrived: at most about 1.5 batches are ever
in flight, so a slow reader (a projection writing SQLite) gets backpressure instead of
dropped messages -- which is what a pushed ordered consumer does to a slow subscriber --
without paying nats-py's per-call `fetch` machinery on every batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.runtime.bus import Bus, undecodable

log = logging.getLogger(__name__)

BATCH = 1000
_EXPIRES_NS = 2_000_000_000


@dataclass
class Skipped:
    """What a read left out: messages whose subject is not UTF-8 (only a raw publisher
    can store one; no event of ours has such a subject)."""

    count: int = 0
    seqs: list[int] = field(default_factory=list)  # the first few, to look them up

    def add(self, seq: int) -> None:
        self.count += 1
        if len(self.seqs) < 20:
            self.seqs.append(seq)


@dataclass(frozen=True)
class Stored:
    """One stored message."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: datetime | None


def _position(reply: str) -> tuple[int, int, int]:
    """(stream seq, timestamp ns, pending) from a JetStream reply subject: what nats-py's
    `msg.metadata` parses, without building its objects (a tenth of a read's time).
    `$JS.ACK.<stream>.<consumer>.<delivered>.<sseq>.<cseq>.<ts>.<pending>`, or with
    `<domain>.<account hash>` after `$JS.ACK` (12 tokens or more)."""
    tokens = reply.split(".")
    at = 5 if len(tokens) == 9 else 7
    return int(tokens[at]), int(tokens[at + 2]), int(tokens[at + 3])


async def read(
    bus: Bus,
    stream: str,
    *,
    subject: str = ">",
    start_seq: int = 1,
    stop_seq: int | None = None,
    batch: int = BATCH,
    skipped: Skipped | None = None,
    last_per_subject: bool = False,
) -> AsyncIterator[Stored]:
    """Every message of `stream` on `subject` from `start_seq` up to what was stored when
    the read began (or `stop_seq`); ephemeral, so it never disturbs a live system. A
    message whose subject is not UTF-8 is skipped, counted in `skipped` and logged.
    `last_per_subject`: only the last message of each subject, headers only (no data):
    what is on which subject and when, in one pass (`start_seq` is then ignored)."""
    skipped = Skipped() if skipped is None else skipped
    before = skipped.count
    try:
        async for stored in _read(
            bus, stream, subject, start_seq, stop_seq, batch, skipped, last_per_subject
        ):
            yield stored
    finally:
        if skipped.count > before:
            log.warning(
                "skipped messages whose subject is not UTF-8",
                extra={"stream": stream, "count": skipped.count - before, "seqs": skipped.seqs},
            )


async def _read(
    bus: Bus,
    stream: str,
    subject: str,
    start_seq: int,
    stop_seq: int | None,
    batch: int,
    skipped: Skipped,
    last_per_subject: bool = False,
) -> AsyncIterator[Stored]:
    try:
        info = await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return
    last = info.state.last_seq if stop_seq is None else min(info.state.last_seq, stop_seq)
    if info.state.messages == 0 or last < max(start_seq, info.state.first_seq):
        return
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.LAST_PER_SUBJECT
        if last_per_subject
        else DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=None if last_per_subject else max(1, start_seq),
        ack_policy=AckPolicy.NONE,
        filter_subject=None if subject == ">" else subject,
        inactive_threshold=30.0,
        mem_storage=True,
        headers_only=True if last_per_subject else None,
    )
    consumer = await bus.js.add_consumer(stream, config)
    if not consumer.num_pending:
        # Nothing matches the filter from there: a pull would only wait for its expiry.
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await bus.js.delete_consumer(stream, consumer.name)
        return
    inbox = bus.nc.new_inbox()
    arrived: deque[Msg] = deque()
    wake = asyncio.Event()

    async def on_msg(msg: Msg) -> None:
        arrived.append(msg)
        wake.set()

    sub = await bus.nc.subscribe(inbox, cb=on_msg)
    next_subject = f"$JS.API.CONSUMER.MSG.NEXT.{stream}.{consumer.name}"
    request = json.dumps({"batch": batch, "expires": _EXPIRES_NS}).encode()
    outstanding = 0  # messages asked for and not yet received (or cut short by a status)
    try:
        await bus.nc.publish(next_subject, request, reply=inbox)
        outstanding = batch
        while True:
            if not arrived:
                wake.clear()
                try:
                    await asyncio.wait_for(wake.wait(), 5.0)
                except TimeoutError:
                    # A lost request or a stalled server: ask again rather than hang.
                    await bus.nc.publish(next_subject, request, reply=inbox)
                    outstanding = batch
                    continue
            msg = arrived.popleft()
            status = (msg.headers or {}).get("Status")
            if status or not msg.reply:
                # 404 no messages / 408 request expired / 409: that request is over.
                if status == "404":
                    return  # nothing (more) matches
                outstanding = 0
            else:
                outstanding -= 1
                seq, stamp, pending = _position(msg.reply)
                if seq > last:
                    return
                if undecodable(msg.subject):
                    skipped.add(seq)
                else:
                    when = datetime.fromtimestamp(stamp / 1e9, UTC)
                    yield Stored(seq, msg.subject, msg.data, msg.headers or {}, when)
                if seq == last or pending == 0:
                    return
            if outstanding <= batch // 2:
                await bus.nc.publish(next_subject, request, reply=inbox)
                outstanding += batch
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await bus.js.delete_consumer(stream, consumer.name)


async def queued(bus: Bus, stream: str, *, subject: str = ">") -> AsyncGenerator[Stored, None]:
    """Every message still in a work-queue stream on `subject`, in order, by direct gets:
    a work queue admits no second consumer, and a get moves nothing."""
    seq = 1
    while True:
        try:
            raw = await bus.js.get_msg(stream, seq, subject=subject, next=True)
        except nats.js.errors.NotFoundError:
            return
        if raw.seq is None:
            return
        seq = raw.seq + 1
        if undecodable(raw.subject or ""):
            continue
        yield Stored(raw.seq, raw.subject or "", raw.data or b"", dict(raw.headers or {}), raw.time)
