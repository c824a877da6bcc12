"""Read a stream from a sequence with an ordered consumer (the fast path for replay)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import datetime

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from services.runtime.bus import Bus


@dataclass(frozen=True)
class Stored:
    """One stored message."""

    seq: int
    subject: str
    data: bytes
    headers: dict[str, str]
    time: datetime | None


async def read(
    bus: Bus, stream: str, *, subject: str = ">", start_seq: int = 1, stop_seq: int | None = None
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
    )
    sub = await bus.js.subscribe(
        subject, stream=stream, ordered_consumer=True, config=config, pending_msgs_limit=65_536
    )
    try:
        while True:
            try:
                msg = await sub.next_msg(timeout=2.0)
            except nats.errors.TimeoutError:
                return  # nothing more matches the filter
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq > last:
                return
            yield Stored(seq, msg.subject, msg.data, dict(msg.headers or {}), meta.timestamp)
            if seq == last or meta.num_pending == 0:
                return
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
