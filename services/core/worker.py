"""The core's I/O shell: consume INBOUND, run the turn, publish jobs and the turn record."""

from __future__ import annotations

import logging
import time

from contracts import subjects
from contracts.codec import decode
from contracts.events import MessageReceived
from contracts.streams import CORE_CONSUMER, INBOUND
from services.core import turn
from services.core.llm import LLM, LLMError
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, ConsumerSpec, Delivery
from services.runtime.errors import TransientError

log = logging.getLogger(__name__)

SYSTEM_PROMPT = "You are a helpful assistant answering WhatsApp messages. Be brief."


def core_consumer_spec() -> ConsumerSpec:
    """All core replicas share this durable consumer.

    max_ack_pending=1 makes turns run one at a time in arrival order across replicas
    (the simple, strict choice; per-chat parallelism is the core-runtime issue's job).
    """
    return ConsumerSpec(
        stream=INBOUND.name,
        durable=CORE_CONSUMER,
        filter_subject="inbound.>",
        max_ack_pending=1,
        batch=1,
        max_deliver=5,
        ack_wait=60.0,
    )


class CoreWorker:
    """Turns MessageReceived into TurnCompleted/TurnFailed plus SendMessage jobs."""

    def __init__(self, bus: Bus, llm: LLM, *, system_prompt: str = SYSTEM_PROMPT) -> None:
        self.bus = bus
        self.llm = llm
        self.system_prompt = system_prompt
        self.loop = ConsumerLoop(bus, core_consumer_spec(), self.handle)

    async def handle(self, d: Delivery) -> None:
        """Run one turn; publishing is idempotent (derived ids), so redelivery is safe."""
        inbound = decode(d.data, MessageReceived)
        started = time.perf_counter()
        if reason := turn.skip_reason(inbound):
            log.info("skipped", extra={"inbound_id": inbound.id, "reason": reason})
            output = turn.skipped(inbound, reason, self.llm.model)
        else:
            try:
                completion = await self.llm.complete(turn.prompt(inbound, self.system_prompt), [])
            except LLMError as exc:
                last_try = d.num_delivered >= self.loop.spec.max_deliver
                if exc.transient and not last_try:
                    raise TransientError(f"llm: {exc}", delay=2.0 * d.num_delivered) from exc
                output = turn.failed(inbound, f"llm: {exc}", self.llm.model)
            else:
                elapsed = (time.perf_counter() - started) * 1000
                output = turn.completed(inbound, completion, self.llm.model, elapsed)
        for job in output.jobs:
            await self.bus.publish(subjects.outbound(job.channel, job.account, job.chat), job)
        record = output.record
        await self.bus.publish(subjects.agent(record.channel, record.account, record.chat), record)
