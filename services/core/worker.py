"""The core's I/O shell: consume INBOUND, run each chat's turns in arrival order across all
replicas, publish jobs and the turn record, remember the exchange.

Order across replicas: every replica pulls from the one durable consumer `core`; inside a
replica a chat's messages run one at a time (ordered by subject). Across replicas each
chat has a record in the `chats` bucket holding the stream sequence of its last settled
message. A message runs only when the first message of its chat after that sequence is
itself; otherwise an earlier one is still in flight elsewhere and it waits. Settling a
turn writes the record with a revision check. The same record carries the history, so a
turn on any replica sees the previous turn, and a redelivered message whose sequence is
already settled is acked without a second turn.
"""

from __future__ import annotations

import asyncio
import logging
import time

import msgspec
import nats.errors
import nats.js.errors

from contracts import subjects
from contracts.errors import ContractError
from contracts.events import MessageReceived, TurnCompleted, TurnFailed
from contracts.payloads import ChatState, HistoryEntry
from contracts.streams import CORE_CONSUMER, INBOUND
from services.core import flood, turn
from services.core.access import AccessGate
from services.core.agent import run_turn
from services.core.chats import ChatStore
from services.core.llm import LLM, Completion, LLMError
from services.core.presence import Presence
from services.core.tools import ToolSource
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, ConsumerSpec, Delivery
from services.runtime.errors import NATS_OUTAGE, AbandonError, PermanentError, TransientError
from services.runtime.metrics import instruments, labels
from services.runtime.retry import RetryPolicy
from services.runtime.seen import Seen
from services.runtime.settings import CoreSettings

log = logging.getLogger(__name__)

_NATS = (nats.errors.Error, nats.js.errors.Error, TimeoutError)

# Waits before the 2nd..6th attempt of a turn (a model server's Retry-After may ask more).
TURN_RETRY_DELAYS = (1.0, 2.0, 4.0, 8.0, 16.0)
# How often, at most, a replica that cannot account for every delivery of the shared
# consumer asks for its ack floor (one round trip; ADR 0035).
ANCHOR_EVERY = 2.0


def core_consumer_spec(settings: CoreSettings) -> ConsumerSpec:
    """All core replicas share this durable consumer (same config everywhere)."""
    return ConsumerSpec(
        stream=INBOUND.name,
        durable=CORE_CONSUMER,
        filter_subject="inbound.>",
        ordered_by_subject=True,
        # Fairness (ADR 0015): a chat holds at most 4 of a replica's 256 slots; more are
        # handed back with a delay. Order still holds: a turn runs only when its chat
        # record says every earlier message is settled (`_my_turn`). The server counts
        # handed-back messages as pending, so its window is much larger than what a
        # replica holds: a flood shorter than ~4000 messages cannot crowd out others.
        max_per_subject=4,
        max_held=256,
        max_ack_pending=4096,
        batch=64,
        # The turn's one policy: its last attempt ends in TurnFailed (the core's own
        # choice, see `_turn`), other errors' last attempt in a dead letter.
        retry=RetryPolicy(attempts=settings.turn_attempts, delays=TURN_RETRY_DELAYS),
        ack_wait=5.0,  # kept alive while a turn runs; a dead replica's turn returns in 5 s
        fetch_timeout=0.5,
        # The chat record says a message is settled before its ack: a lost ack only
        # means a redelivery that is acked without a second turn.
        sync_ack=False,
    )


def check_inbound(subject: str, inbound: MessageReceived) -> None:
    """Refuse an inbound message whose payload names another channel, account or chat
    than its subject (its history would go to that chat), or whose ids are out of bounds."""
    subjects.check_agrees(subject, "inbound", inbound.channel, inbound.account, inbound.chat)
    subjects.check_jid(inbound.sender, "sender JID")
    subjects.check_message_id(inbound.message_id)


def count_turn(record: TurnCompleted | TurnFailed) -> None:
    """The turn metrics of a recorded turn: outcome, model, latency, tokens."""
    if isinstance(record, TurnFailed):
        outcome = "failed"
    else:
        outcome = "skipped" if record.skipped is not None else "completed"
    metrics = instruments()
    by = labels(
        ("channel", record.channel),
        ("account", record.account),
        ("outcome", outcome),
        ("model", record.model),
    )
    metrics.turns.add(1, by)
    if isinstance(record, TurnCompleted) and outcome == "completed":
        metrics.turn_duration.record(record.latency_ms / 1000, by)
        if record.usage is not None:
            model = record.model
            metrics.tokens.add(
                record.usage.prompt_tokens, labels(("model", model), ("kind", "prompt"))
            )
            metrics.tokens.add(
                record.usage.completion_tokens, labels(("model", model), ("kind", "completion"))
            )


class CoreWorker:
    """Turns MessageReceived into TurnCompleted/TurnFailed plus SendMessage jobs."""

    def __init__(
        self,
        bus: Bus,
        llm: LLM,
        settings: CoreSettings | None = None,
        *,
        tools: ToolSource,
        turn_wait: float = 5.0,
    ) -> None:
        self.bus = bus
        self.llm = llm
        self.settings = settings or CoreSettings()
        self.tools = tools  # the core's port; the wiring (services.app) picks the adapter
        self.turn_wait = turn_wait
        self.chats = ChatStore(bus)
        # The deliveries of the shared consumer this replica was handed (ADR 0035): when
        # it can account for all of them, a chat's turn needs no read of the stream.
        self.seen = Seen()
        self._anchored_at = -ANCHOR_EVERY
        self.access = AccessGate(
            bus,
            waiting_text=self.settings.access_waiting_text,
            waiting_period=self.settings.access_waiting_period,
        )
        self.loop = ConsumerLoop(
            bus,
            core_consumer_spec(self.settings),
            MessageReceived,
            self.handle,
            on_dead_letter=self.dead_lettered,
        )
        self.retry = self.loop.spec.retry

    async def handle(self, inbound: MessageReceived, d: Delivery) -> None:
        """Run one turn when it is this message's turn; settle it; publish its outputs."""
        with self.seen.handling(d):  # settled when it returns: the record is past it
            await self._handle(inbound, d)

    async def _handle(self, inbound: MessageReceived, d: Delivery) -> None:
        try:
            where = subjects.parse_chat_subject(d.subject)
        except ContractError as exc:
            raise PermanentError(str(exc)) from None
        key = subjects.chat_key(where.channel, where.account, where.chat)
        mine = await self._my_turn(d, key, where.chat)
        if mine is None:
            log.info("already settled", extra={"seq": d.stream_seq, "subject": d.subject})
            return
        state, revision = mine
        # Checked in its turn (a dead letter gives the chat's turn to the next message):
        # ids out of bounds, or a payload naming another chat than the subject. (A payload
        # that does not decode never gets here: `dead_lettered` waits for its turn.)
        check_inbound(d.subject, inbound)
        if await self._refused_access(inbound, d):  # recorded; the chat's next one may run
            await self._settle(key, where.chat, d.stream_seq, [], state, revision)
            return
        rate_tat = await self._within_rate(inbound, state)
        if rate_tat is None:  # refused: recorded, and the chat's next message may run
            await self._settle(key, where.chat, d.stream_seq, [], state, revision)
            return
        output, entries = await self._turn(inbound, state, d)
        for job in output.jobs:
            await self.bus.publish(subjects.outbound(job.channel, job.account, job.chat), job)
        record = output.record
        await self.bus.publish(subjects.agent(record.channel, record.account, record.chat), record)
        count_turn(record)
        await self._settle(key, where.chat, d.stream_seq, entries, state, revision, rate_tat)

    async def _refused_access(self, inbound: MessageReceived, d: Delivery) -> bool:
        """The access policy (ADR 0023), before any model call. A message the turn skips
        anyway (own, status, a group message without a mention) is not judged."""
        if turn.skip_reason(inbound, self.settings.group_replies):
            return False
        try:
            return await self.access.refused(inbound, d.stream_seq)
        except NATS_OUTAGE:
            raise  # waited out by the loop without using up an attempt
        except _NATS as exc:
            raise TransientError(f"cannot read the access policy: {exc!r}", delay=1.0) from None

    async def _within_rate(self, inbound: MessageReceived, state: ChatState) -> float | None:
        """The chat's rate budget after this message runs; None if it was refused (and
        recorded). A message held by the budget is handed back until it may run."""
        limit = self.settings.chat_rate
        if limit is None or turn.skip_reason(inbound, self.settings.group_replies):
            return state.rate_tat  # no budget, or a message the model never sees anyway
        verdict = flood.gate(state.rate_tat, inbound.at.timestamp(), limit)
        if verdict.conforming:
            return verdict.tat_after
        if self.settings.chat_flood == "refuse":
            refused = turn.refused(
                inbound, "rate:chat", f"over {limit.per_minute:g}/min (burst {limit.burst})"
            )
            subject = subjects.agent(inbound.channel, inbound.account, inbound.chat)
            await self.bus.publish(subject, refused)
            log.info("refused", extra={"inbound_id": inbound.id, "rule": refused.rule})
            return None
        wait = verdict.allowed_at - time.time()
        if wait > 0:
            raise AbandonError(
                f"chat over its rate ({limit.per_minute:g}/min, burst {limit.burst}):"
                f" held {wait:.1f}s",
                delay=wait,
            )
        return verdict.tat_after

    async def _my_turn(self, d: Delivery, key: str, chat: str) -> tuple[ChatState, int] | None:
        """Wait until every earlier message of the chat is settled; None if this one is.

        Round trips (ADR 0035): the chat's record is taken from this replica's cache on a
        first delivery, and the stream is not read when this replica accounts for every
        delivery before this one (`Seen`). A cached record is checked by the stream read
        otherwise (another replica's settle leaves its message between the cached position
        and this one), and by the revision check of the settle in every case.
        """
        deadline = time.monotonic() + self.turn_wait
        delay = 0.01
        cached = self.chats.cached(key) if d.num_delivered == 1 and d.attempt == 1 else None
        try:
            while True:
                # Taken before the read: an anchor meanwhile (here or in another chat's
                # turn) may cover a settle the read did not see yet.
                epoch = self.seen.epoch
                mine = cached or await self.chats.get(key, chat)
                state = mine[0]
                if state.last_seq >= d.stream_seq:
                    return None
                if await self._accounted(d):
                    if self.seen.epoch == epoch:
                        return mine
                    cached = None  # an anchor since: what was read may be behind
                    continue
                try:
                    first = await self.bus.js.get_msg(
                        INBOUND.name, seq=state.last_seq + 1, subject=d.subject, next=True
                    )
                    head = first.seq or d.stream_seq
                except nats.js.errors.NotFoundError:
                    head = d.stream_seq
                if head >= d.stream_seq:
                    return mine
                if cached is not None:  # perhaps settled by another replica since: read it
                    cached = None
                    continue
                if d.overtaken():  # the earlier one is queued right behind us: let it go first
                    raise AbandonError(f"message {head} of this chat came back; it goes first")
                if time.monotonic() > deadline:
                    raise AbandonError(
                        f"message {head} of this chat is still in flight; trying again later",
                        delay=0.5,
                    )
                await asyncio.sleep(delay)  # another replica is settling message `head`
                delay = min(delay * 2, 0.25)
        except _NATS as exc:
            raise AbandonError(f"cannot read the chat's position: {exc!r}", delay=1.0) from None

    async def _accounted(self, d: Delivery) -> bool:
        """True if every earlier message of the chat is known settled without a read
        (`Seen.clear_before`); asks the consumer's ack floor now and then when this
        replica was not handed every delivery (another replica, a restart)."""
        seen = self.seen
        if seen.clear_before(d):
            return True
        if not seen.gap() or time.monotonic() - self._anchored_at < ANCHOR_EVERY:
            return False
        self._anchored_at = time.monotonic()
        try:
            info = await self.bus.js.consumer_info(INBOUND.name, CORE_CONSUMER)
        except _NATS as exc:  # only a shortcut: read the stream instead
            log.debug("cannot read the consumer's ack floor", extra={"error": repr(exc)})
            return False
        floor = info.ack_floor.consumer_seq if info.ack_floor else 0
        if seen.anchor(floor or 0):
            # Deliveries handed elsewhere were settled there: any chat's cached record
            # may be behind.
            self.chats.forget()
        return seen.clear_before(d)

    async def _turn(
        self, inbound: MessageReceived, state: ChatState, d: Delivery
    ) -> tuple[turn.TurnOutput, list[HistoryEntry]]:
        settings = self.settings
        model = self.llm.model
        if reason := turn.skip_reason(inbound, settings.group_replies):
            log.info("skipped", extra={"inbound_id": inbound.id, "reason": reason})
            return turn.skipped(inbound, reason, model), []
        asked = HistoryEntry(role="user", text=inbound.text, ref=inbound.id)
        tools = await self.tools.toolbox(inbound.channel, inbound.account, inbound.chat)
        presence = Presence(self.bus, settings.presence_for(inbound.account))
        await presence.started(inbound)  # read, then typing (ADR 0025)
        started = time.perf_counter()
        try:
            result = await run_turn(
                self.llm,
                tools,
                turn.prompt(inbound, settings.system_prompt, state),
                max_rounds=settings.max_tool_rounds,
            )
        except BaseException as exc:
            # Failed, or retried later: either way no reply is on its way now.
            await presence.ended_without_reply(inbound)
            if not isinstance(exc, LLMError):
                raise
            if exc.transient and not self.retry.last(d.attempt):
                # Retried in place, in order: after this attempt's declared backoff, or
                # later if the server asked for it (Retry-After, capped in llm.py).
                raise TransientError(f"llm: {exc}", delay=exc.retry_after or 0.0) from None
            log.error("turn failed", extra={"inbound_id": inbound.id, "error": str(exc)})
            failed = turn.failed(
                inbound,
                f"llm: {exc}",
                model,
                settings.fallback_reply,
                tools.plugins_seq,
                quote=settings.quote_replies,
            )
            return failed, [asked]
        elapsed = (time.perf_counter() - started) * 1000
        completion = Completion(
            text=result.text,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )
        output = turn.completed(
            inbound,
            completion,
            model,
            elapsed,
            result.tools,
            settings.reply_limit,
            plugins_seq=tools.plugins_seq,
            quote=settings.quote_replies,
        )
        if not output.jobs:
            await presence.ended_without_reply(inbound)
        entries = [asked]
        if result.text.strip():
            refs = ",".join(j.job_id for j in output.jobs)
            entries.append(HistoryEntry(role="assistant", text=result.text.strip(), ref=refs))
        return output, entries

    async def _settle(
        self,
        key: str,
        chat: str,
        seq: int,
        entries: list[HistoryEntry],
        state: ChatState,
        revision: int,
        rate_tat: float | None = None,
    ) -> None:
        """Advance the chat past `seq`, adding `entries` to its history (revision-checked)
        and, when given, setting its rate budget."""
        for _ in range(10):
            new = turn.remember(
                state,
                seq,
                entries,
                max_messages=self.settings.history_messages,
                max_chars=self.settings.history_chars,
            )
            tat = state.rate_tat if rate_tat is None else max(rate_tat, state.rate_tat)
            new = msgspec.structs.replace(new, rate_tat=tat)
            if await self.chats.save(key, new, revision):
                return
            state, revision = await self.chats.get(key, chat)
            if state.last_seq >= seq:
                return  # settled by a concurrent redelivery; its outputs deduped with ours
        raise TransientError("could not settle the chat's position")

    async def dead_lettered(self, d: Delivery, reason: str) -> None:
        """A message that cannot be handled still gives its chat's turn to the next one --
        in its own turn: advancing the chat past it while an earlier message is in flight
        would let later ones overtake that one and drop its history. Not yet its turn: a
        TransientError, and the loop tries the letter again later."""
        with self.seen.handling(d):
            await self._dead_lettered(d)

    async def _dead_lettered(self, d: Delivery) -> None:
        try:
            where = subjects.parse_chat_subject(d.subject)
        except ContractError:
            return  # no chat to unblock
        key = subjects.chat_key(where.channel, where.account, where.chat)
        try:
            mine = await self._my_turn(d, key, where.chat)
        except AbandonError as exc:
            raise TransientError(
                f"dead letter waits for its turn: {exc}", delay=exc.delay
            ) from None
        if mine is not None:
            state, revision = mine
            await self._settle(key, where.chat, d.stream_seq, [], state, revision)
