"""Read a stream from a sequence, in order, with bounded memory and no loss.

An ephemeral pull consumer (no acks, in memory, removed when idle) fetched in batches:
the reader asks for the next batch only when it has handled the last, so a slow reader
(a projection writing SQLite) gets backpressure instead of dropped messages, which is what
a pushed ordered consumer does to a slow subscriber.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.runtime.bus import Bus

BATCH = 1000


@dataclass(frozen=True)
class Stored:
    """One stored message."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: datetime | None


async def read(
    bus: Bus,
    stream: str,
    *,
    subject: str = ">",
    start_seq: int = 1,
    stop_seq: int | None = None,
    batch: int = BATCH,
) -> AsyncIterator[Stored]:
    """Every message of `stream` on `subject` from `start_seq` up to what was stored when
    the read began (or `stop_seq`); ephemeral, so it never disturbs a live system."""
    try:
        info = await bus.js.stream_info(stream)
    except nats.js.errors.NotFoundError:
        return
    last = min(info.state.last_seq, stop_seq) if stop_seq else info.state.last_seq
    if info.state.messages == 0 or last < max(start_seq, info.state.first_seq):
        return
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
        opt_start_seq=max(1, start_seq),
        ack_policy=AckPolicy.NONE,
        filter_subject=None if subject == ">" else subject,
        inactive_threshold=30.0,
        mem_storage=True,
        max_ack_pending=-1,
    )
    sub = await bus.js.pull_subscribe(subject, stream=stream, config=config)
    try:
        while True:
            try:
                msgs = await sub.fetch(batch, timeout=1.0)
            except (nats.errors.TimeoutError, TimeoutError):
                info_c = await sub.consumer_info()
                if info_c.num_pending == 0:
                    return  # nothing left that matches
                continue
            for msg in msgs:
                meta = msg.metadata
                seq = meta.sequence.stream
                if seq > last:
                    return
                yield Stored(seq, msg.subject, msg.data, dict(msg.headers or {}), meta.timestamp)
                if seq == last or meta.num_pending == 0:
                    return
    finally:
        with contextlib.suppress(nats.errors.Error, nats.js.errors.Error):
            await sub.unsubscribe()
