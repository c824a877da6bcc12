"""Raw nats-py stages the benchmarks compare against (ADR 0037).

`weak_stage` is the old baseline: a pull consumer with max_ack_pending=1, one message at
a time, every publish and ack awaited. `strong_stage` is the best plain nats-py shape for
the same hop and the same guarantees: a durable push consumer (delivered as soon as it
is stored, no idle-fetch hold) with many messages in flight, per-chat order kept (each
chat's messages handled in arrival order, chats in parallel), forwards pipelined with
`publish_async` and awaited before the message is acked, dedupe ids on every forward.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import time
from collections.abc import Callable
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, PubAck

_KEY = re.compile(r"[^-\w=]")
# (subject, data, headers) published for one consumed message, in order.
Forward = Callable[[Msg], list[tuple[str, bytes, dict[str, str] | None]]]


def chat_token(msg: Msg) -> str:
    """The chat of a pipeline-style body `chat|text`."""
    return msg.data.split(b"|", 1)[0].decode()


def by_template(targets: list[str]) -> Forward:
    """Forward the body to each `target.format(chat=...)`, with a derived dedupe id."""

    def forward(msg: Msg) -> list[tuple[str, bytes, dict[str, str] | None]]:
        chat = chat_token(msg)
        seq = msg.metadata.sequence.stream
        return [(t.format(chat=chat), msg.data, {"Nats-Msg-Id": f"{t}:{seq}"}) for t in targets]

    return forward


async def weak_stage(
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
            chat = chat_token(msg)
            for target in forward:
                await js.publish(target.format(chat=chat), msg.data)
            await msg.ack_sync()


async def strong_stage(
    js: JetStreamContext,
    stream: str,
    durable: str,
    subject: str,
    forward: Forward,
    stop: asyncio.Event,
    *,
    chat_of: Callable[[Msg], str] = chat_token,
    work: float = 0.0,
    in_flight: int = 1024,
    before: Forward | None = None,
    core: Callable[[Msg], Any] | None = None,
    state_bucket: str | None = None,
) -> None:
    """Per-chat serial, chats in parallel, writes pipelined. Per run of a chat's waiting
    messages: `before(msg)` writes stored first (a ledger's "sending"), then `core(msg)`
    (a plain publish, like a transport send), then `forward(msg)` and, with
    `state_bucket`, one revision-checked KV write of the chat's state (the revision is
    kept in memory: this worker is the chat's only writer), all awaited before the acks."""
    queues: dict[str, asyncio.Queue[Msg]] = {}
    workers: list[asyncio.Task[None]] = []

    async def pipelined(writes: list[tuple[str, bytes, dict[str, str] | None]]) -> list[PubAck]:
        acks = [await js.publish_async(subj, data, headers=h) for subj, data, h in writes]
        return list(await asyncio.gather(*acks))

    async def chat_worker(chat: str, queue: asyncio.Queue[Msg]) -> None:
        key = f"$KV.{state_bucket}.raw.{_KEY.sub('_', chat)}"
        revision = 0
        while True:
            batch = [await queue.get()]
            while not queue.empty():  # what has piled up for this chat, in order
                batch.append(queue.get_nowait())
            if before is not None:
                await pipelined([w for msg in batch for w in before(msg)])
            writes = []
            for msg in batch:
                if work:
                    await asyncio.sleep(work)  # the turn's model time
                if core is not None:
                    await core(msg)
                writes += forward(msg)
            if state_bucket:
                expect = {"Nats-Expected-Last-Subject-Sequence": str(revision)}
                writes.append((key, batch[-1].data, expect))
            acks = await pipelined(writes)
            if state_bucket:
                revision = acks[-1].seq
            for msg in batch:
                await msg.ack()

    async def on_msg(msg: Msg) -> None:
        chat = chat_of(msg)
        queue = queues.get(chat)
        if queue is None:
            queue = queues[chat] = asyncio.Queue()
            workers.append(asyncio.create_task(chat_worker(chat, queue)))
        queue.put_nowait(msg)

    config = ConsumerConfig(
        ack_policy=AckPolicy.EXPLICIT,
        max_ack_pending=in_flight,
        deliver_policy=DeliverPolicy.ALL,
    )
    sub = await js.subscribe(
        subject,
        stream=stream,
        durable=durable,
        cb=on_msg,
        manual_ack=True,
        config=config,
        pending_msgs_limit=-1,
        pending_bytes_limit=-1,
    )
    try:
        await stop.wait()
    finally:
        await sub.unsubscribe()
        for task in workers:
            task.cancel()
        for task in workers:
            with contextlib.suppress(asyncio.CancelledError):
                await task


async def ordered_read(js: JetStreamContext, streams: list[tuple[str, str]]) -> float:
    """events/s of counting callbacks on pushed ordered consumers, stream after stream
    ((stream, filter) pairs): the fastest nats-py read (the strong read baseline)."""
    total = 0
    started = time.perf_counter()
    for stream, subject in streams:
        last = (await js.stream_info(stream)).state.last_seq
        if not last:
            continue
        done = asyncio.Event()
        count = 0

        async def on_msg(msg: Msg, last: int = last, done: asyncio.Event = done) -> None:
            nonlocal count
            count += 1
            if msg.metadata.sequence.stream >= last:
                done.set()

        sub = await js.subscribe(
            subject,
            stream=stream,
            cb=on_msg,
            ordered_consumer=True,
            deliver_policy=DeliverPolicy.ALL,
            pending_msgs_limit=-1,
            pending_bytes_limit=-1,
        )
        await asyncio.wait_for(done.wait(), 600)
        await sub.unsubscribe()
        total += count
    return total / (time.perf_counter() - started)


async def fetch_read(
    js: JetStreamContext, streams: list[tuple[str, str]], batch: int = 500
) -> float:
    """events/s of an ephemeral pull consumer read with fetch(batch), no acks (AckNone):
    the usual nats-py read, slower than an ordered consumer (the weak read baseline)."""
    total = 0
    started = time.perf_counter()
    for stream, subject in streams:
        last = (await js.stream_info(stream)).state.last_seq
        if not last:
            continue
        config = ConsumerConfig(ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.ALL)
        sub = await js.pull_subscribe(subject, stream=stream, config=config)
        seen = 0
        while seen < last:
            # never ask for more than is left: a short fetch would wait for its expiry
            msgs = await sub.fetch(min(batch, last - seen), timeout=5)
            total += len(msgs)
            seen = msgs[-1].metadata.sequence.stream
        await sub.unsubscribe()
    return total / (time.perf_counter() - started)
