"""Follow one chat's transcript as it grows (the console's live view, issue 18 item 3).

From a position (per transcript stream, the last sequence already shown: what
`conversation_at` returns), one ordered consumer per stream on the chat's subject starts
at the next sequence, so nothing between the rendered transcript and the subscription is
missed or shown twice. Ordered consumers are ephemeral, in memory, unacknowledged; they
are deleted when the follower closes (and, should the process die, the server drops them
after `INACTIVE` seconds without interest).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy

from contracts.codec import decode_any
from contracts.errors import ContractError
from projections import transcript as tr
from services.ops.explain import (
    TRANSCRIPT_STREAMS,
    Position,
    chat_subjects,
    conversation_event,
)
from services.runtime.bus import Bus

log = logging.getLogger(__name__)

INACTIVE = 60.0  # s: the server's backstop for a consumer whose follower vanished
QUEUED = 1000  # entries held for a slow reader before the subscriptions wait


def position_text(position: Position) -> str:
    """`position` as a cursor: the sequences in TRANSCRIPT_STREAMS order, dot-separated."""
    return ".".join(str(position.get(name, 0)) for name in TRANSCRIPT_STREAMS)


def parse_position(text: str) -> Position:
    """The position a cursor from `position_text` names; ValueError (one line) if it is
    not one."""
    parts = text.strip().split(".")
    if len(parts) != len(TRANSCRIPT_STREAMS) or not all(
        p.isdigit() and len(p) <= 19 for p in parts
    ):
        raise ValueError(
            f"cursor {text[:40]!r} is not one this server gave: {len(TRANSCRIPT_STREAMS)}"
            " dot-separated stream sequences (reload the page, or leave it out to start now)"
        )
    return dict(zip(TRANSCRIPT_STREAMS, map(int, parts), strict=True))


class ChatFollower:
    """New transcript entries of one chat, from `after` on, as they are stored. Use
    `start()`, then `next()`; always `close()` (it deletes the consumers)."""

    def __init__(self, bus: Bus, channel: str, account: str, chat: str, after: Position) -> None:
        self.bus = bus
        self.channel, self.account, self.chat = channel, account, chat
        self.position: Position = {name: after.get(name, 0) for name in TRANSCRIPT_STREAMS}
        self._queue: asyncio.Queue[tuple[str, Msg]] = asyncio.Queue(QUEUED)
        self._subs: list[tuple[str, Any]] = []

    async def start(self) -> None:
        """One ordered consumer per transcript stream, each from after its position."""
        where = chat_subjects(self.channel, self.account, self.chat)
        try:
            for name in TRANSCRIPT_STREAMS:
                sub = await self.bus.js.subscribe(
                    where[name],
                    stream=name,
                    cb=self._on(name),
                    ordered_consumer=True,
                    config=ConsumerConfig(
                        deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                        opt_start_seq=self.position[name] + 1,
                        inactive_threshold=INACTIVE,
                    ),
                )
                self._subs.append((name, sub))
        except BaseException:
            await self.close()
            raise

    def _on(self, stream: str) -> Any:
        async def on_msg(msg: Msg) -> None:
            await self._queue.put((stream, msg))  # a full queue holds the subscription

        return on_msg

    async def next(self, timeout: float) -> tr.Entry | None:
        """The next new entry of the chat, or None when `timeout` s pass without one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return None
            try:
                stream, msg = await asyncio.wait_for(self._queue.get(), remaining)
            except TimeoutError:
                return None
            meta = msg.metadata
            seq = meta.sequence.stream
            if seq <= self.position[stream]:
                continue  # a reset ordered consumer may hand over one again
            self.position[stream] = seq
            try:
                event = decode_any(msg.data)
            except ContractError:
                continue
            if conversation_event(event, self.channel, self.account, self.chat):
                return tr.entry(event, stream, seq, meta.timestamp)

    async def close(self) -> None:
        """Unsubscribe and delete every consumer (the current one after a reset)."""
        subs, self._subs = self._subs, []
        for name, sub in subs:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            # nats-py keeps the ordered consumer's current name here (it changes on reset).
            consumer = getattr(sub, "_consumer", None)
            if consumer:
                try:
                    await self.bus.js.delete_consumer(name, consumer)
                except nats.js.errors.NotFoundError:
                    pass
                except (nats.errors.Error, nats.js.errors.Error) as exc:
                    log.warning(
                        "could not delete a live view's consumer; the server drops it when idle",
                        extra={"stream": name, "consumer": consumer, "error": str(exc)},
                    )
