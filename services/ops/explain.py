"""`svc replay conversation` and `svc audit explain`: read the streams a chat or a job
touched (filtered by the chat's subjects, never a consumer on the OUTBOUND work queue)
and hand the decoded events to `projections.transcript` to assemble and format."""

from __future__ import annotations

import asyncio
import contextlib
from datetime import UTC, datetime
from typing import Any, TypeGuard

import msgspec
import nats.js.errors

from contracts import subjects
from contracts.codec import decode, decode_any
from contracts.errors import ContractError, InvalidSubjectError
from contracts.events import (
    AnyMessage,
    DeadLettered,
    DeadLetterRequeued,
    DeliveryDeadLettered,
    DeliveryEvent,
    DeliveryFailed,
    DeliveryReceipt,
    DeliveryUncertain,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    MessageReceived,
    MessageSent,
    SendMessage,
    TurnCompleted,
    TurnFailed,
)
from contracts.plugins import PluginManifest
from contracts.streams import ACCOUNTS, AGENT, DEADLETTER, DELIVERY, INBOUND, OUTBOUND, PLUGINS
from projections import plugins as view
from projections import transcript as tr
from services.plugins.projection import PluginProjection
from services.plugins.registry import discover, manifests
from services.runtime.bus import Bus
from services.runtime.errors import ServiceError
from services.runtime.reader import queued, read

MAX_REQUEUE_DEPTH = 8  # a requeue of a requeue of ...: follow this many links back


def check_chat(chat: str) -> str:
    """The chat JID `chat` names (a JID, or its subject token as `nats stream view` shows
    it); raise InvalidSubjectError for anything that cannot be a chat."""
    if "~" in chat:
        try:
            return subjects.decode_chat(chat)
        except ContractError:
            pass  # not a token: a JID that happens to contain '~'
    if not chat or len(chat) > 1024 or any(c.isspace() or not c.isprintable() for c in chat):
        raise InvalidSubjectError(
            f"chat {chat!r} is invalid: pass the chat's JID, e.g. 123@s.whatsapp.net"
        )
    subjects.encode_chat(chat)
    return chat


Found = tuple[int, Any, AnyMessage]  # (stream seq, stored time, event)


async def _events(
    bus: Bus,
    stream: str,
    subject: str = ">",
    *,
    contains: str | None = None,
    stop_seq: int | None = None,
) -> list[Found]:
    """Decoded events of `stream` on `subject` (those whose bytes contain `contains`, a
    cheap pre-filter before decoding), up to `stop_seq`; undecodable messages are skipped."""
    # As the string appears inside the JSON (escapes included), so the filter never misses.
    needle = msgspec.json.encode(contains)[1:-1] if contains else None
    out: list[Found] = []
    async for stored in read(bus, stream, subject=subject, stop_seq=stop_seq):
        if needle is not None and needle not in stored.data:
            continue
        try:
            out.append((stored.seq, stored.time, decode_any(stored.data)))
        except ContractError:
            continue
    return out


# --- svc replay conversation, the console's conversations -------------------------------

# The streams a transcript reads, and where in each a rendered transcript ends: the
# console's live view follows each from there (services/ops/follow.py).
TRANSCRIPT_STREAMS = (INBOUND.name, AGENT.name, DELIVERY.name, PLUGINS.name)
Position = dict[str, int]  # stream name -> the last sequence a transcript covers


def chat_subjects(channel: str, account: str, chat: str) -> dict[str, str]:
    """The subject a chat's events are on, per transcript stream (memory facts share one
    subject per account: the chat in the event narrows it)."""
    return {
        INBOUND.name: subjects.inbound(channel, account, chat),
        AGENT.name: subjects.agent(channel, account, chat),
        DELIVERY.name: subjects.delivery(channel, account, chat),
        PLUGINS.name: subjects.memory(channel, account),
    }


async def _last_seq(bus: Bus, stream: str) -> int:
    try:
        return int((await bus.js.stream_info(stream)).state.last_seq)
    except nats.js.errors.NotFoundError:
        return 0


async def current_position(bus: Bus) -> Position:
    """Where every transcript stream ends now (following from here shows only new events)."""
    lasts = await asyncio.gather(*(_last_seq(bus, name) for name in TRANSCRIPT_STREAMS))
    return dict(zip(TRANSCRIPT_STREAMS, lasts, strict=True))


async def conversation_at(
    bus: Bus, channel: str, account: str, chat: str
) -> tuple[list[tr.Entry], Position]:
    """Every recorded event of one chat, merged in stored order, and the position (per
    stream, the last sequence read): following from there misses and repeats nothing."""
    subjects.check_channel(channel)
    subjects.check_account(account)
    upto = await current_position(bus)
    where = chat_subjects(channel, account, chat)
    reads = await asyncio.gather(
        *(
            _events(
                bus,
                name,
                where[name],
                stop_seq=upto[name],
                # Facts share one subject per account; the chat JID in the JSON narrows it.
                contains=chat[:64] if name == PLUGINS.name else None,
            )
            for name in TRANSCRIPT_STREAMS
        )
    )
    entries = []
    for name, found in zip(TRANSCRIPT_STREAMS, reads, strict=True):
        for seq, at, event in found:
            if conversation_event(event, channel, account, chat):
                entries.append(tr.entry(event, name, seq, at))
    # Jobs still queued (a work queue: read by direct gets, never a consumer; the live
    # view does not follow it, their outcome arrives on DELIVERY).
    async for stored in queued(
        bus, OUTBOUND.name, subject=subjects.outbound(channel, account, chat)
    ):
        try:
            job = decode(stored.data, SendMessage)
        except ContractError:
            continue
        if conversation_event(job, channel, account, chat):
            entries.append(tr.entry(job, OUTBOUND.name, stored.seq, stored.time))
    return tr.ordered(tr.settled(entries)), upto


def conversation_event(
    event: AnyMessage, channel: str, account: str, chat: str
) -> TypeGuard[tr.ConversationEvent]:
    """Whether `event` belongs in this chat's transcript."""
    return isinstance(event, tr.CONVERSATION_TYPES) and tr.in_chat(event, channel, account, chat)


async def conversation(bus: Bus, channel: str, account: str, chat: str) -> list[tr.Entry]:
    """Every recorded event of one chat, merged in stored order."""
    entries, _ = await conversation_at(bus, channel, account, chat)
    return entries


class Chat(msgspec.Struct, frozen=True, kw_only=True):
    """A chat of an account and when anything last happened in it."""

    account: str
    chat: str
    last_at: datetime | None


async def chats(bus: Bus, channel: str, account: str | None = None) -> list[Chat]:
    """The chats of `account` (every account: None), most recent activity first: the last
    message on each chat subject of INBOUND, AGENT and DELIVERY (headers only, one pass
    per stream; no event is decoded)."""
    subjects.check_channel(channel)
    scope = subjects.check_account(account) if account is not None else "*"
    latest: dict[tuple[str, str], datetime | None] = {}
    streams = (("inbound", INBOUND.name), ("agent", AGENT.name), ("delivery", DELIVERY.name))
    for kind, name in streams:
        async for stored in read(
            bus, name, subject=f"{kind}.{channel}.{scope}.*", last_per_subject=True
        ):
            try:
                found = subjects.parse_chat_subject(stored.subject)
            except ContractError:
                continue
            key = (found.account, found.chat)
            seen = latest.get(key)
            if key not in latest or (stored.time and (seen is None or stored.time > seen)):
                latest[key] = stored.time
    rows = [Chat(account=a, chat=c, last_at=at) for (a, c), at in latest.items()]
    epoch = datetime.min.replace(tzinfo=UTC)
    return sorted(rows, key=lambda r: (r.last_at or epoch, r.account, r.chat), reverse=True)


# --- svc audit explain -------------------------------------------------------------------


def _step(stream: str, found: Found) -> tr.Step:
    seq, at, event = found
    return tr.Step(stream=stream, seq=seq, at=at, event=event)


async def _pending(bus: Bus, job_id: str, subject: str) -> tuple[int, SendMessage] | None:
    """The job if it is still queued on OUTBOUND on `subject`."""
    needle = job_id.encode()
    async for stored in queued(bus, OUTBOUND.name, subject=subject):
        if needle not in stored.data:
            continue
        try:
            job = decode(stored.data, SendMessage)
        except ContractError:
            continue
        if job.job_id == job_id:
            return stored.seq, job
    return None


class _DeadLetters:
    """DEADLETTER read once: letters by job id and the requeue records."""

    def __init__(self, found: list[Found]) -> None:
        self.letters: dict[str, tr.Step] = {}
        self.by_seq: dict[int, DeadLettered] = {}
        self.requeues: list[tr.Step] = []
        for f in found:
            event = f[2]
            if isinstance(event, DeadLettered):
                self.by_seq[f[0]] = event
                if event.job_id:
                    self.letters[event.job_id] = _step(DEADLETTER.name, f)
            elif isinstance(event, DeadLetterRequeued):
                self.requeues.append(_step(DEADLETTER.name, f))

    def created(self, job_id: str) -> tr.Step | None:
        """The requeue that made `job_id`, if it is a requeued job."""
        return next(
            (s for s in self.requeues if getattr(s.event, "new_job_id", None) == job_id), None
        )

    def requeued_as(self, letter_seq: int) -> list[tr.Step]:
        """The requeues of the letter at `letter_seq`."""
        return [s for s in self.requeues if getattr(s.event, "letter_seq", None) == letter_seq]


def _payload_job(letter: AnyMessage | None) -> SendMessage | None:
    """The job a dead letter holds, if it holds one."""
    if not isinstance(letter, DeadLettered):
        return None
    try:
        return decode(letter.payload, SendMessage)
    except ContractError:
        return None


async def _policy(
    bus: Bus, found: dict[str, PluginManifest], turn: TurnCompleted | TurnFailed
) -> tr.Policy:
    """The tool policy as the turn saw it: PLUGINS replayed up to its `plugins_seq`
    (plugin defaults at 0), and which decisions differ now."""
    async with PluginProjection(bus, ":memory:", found, name="explain") as projection:
        if turn.plugins_seq > 0:
            await projection.catch_up(upto=turn.plugins_seq)
            then = await projection.resolve(turn.channel, turn.account)
        else:  # no projection: no rows, the plugins' own defaults
            then = view.resolve([], {}, found, turn.channel, turn.account)
        await projection.catch_up()
        now = await projection.resolve(turn.channel, turn.account)

    def decision(d: view.Decision) -> tr.PolicyDecision:
        return tr.PolicyDecision(tool=d.tool, allowed=d.allowed, rule=d.rule)

    before = {d.tool: (d.allowed, d.rule) for d in then}
    return tr.Policy(
        plugins_seq=turn.plugins_seq,
        basis="projection" if turn.plugins_seq > 0 else "defaults",
        decisions=[decision(d) for d in then],
        changed_since=[decision(d) for d in now if before.get(d.tool) != (d.allowed, d.rule)],
    )


def _turn_of(found: list[Found], job_id: str) -> Found | None:
    """The turn (of those found) that lists `job_id` among its replies."""
    return next(
        (
            f
            for f in found
            if isinstance(f[2], TurnCompleted | TurnFailed) and job_id in f[2].reply_ids
        ),
        None,
    )


async def resolve_job_id(bus: Bus, ref: str) -> str:
    """`ref` if a stream knows that job id, else the one job id it is a prefix of (job ids
    are 32 characters; operators abbreviate them). ServiceError, in one line, when the
    prefix names several jobs; `ref` itself when it names none (explain then says so)."""
    subjects.check_job_id(ref)
    delivery, dead, turns = await asyncio.gather(
        _events(bus, DELIVERY.name, contains=ref),
        _events(bus, DEADLETTER.name, contains=ref),
        _events(bus, AGENT.name, contains=ref),
    )
    found: set[str] = set()
    for _, _, event in [*delivery, *dead, *turns]:
        if isinstance(event, DeliveryEvent | DeadLettered) and event.job_id:
            found.add(event.job_id)
        elif isinstance(event, DeadLetterRequeued) and event.new_job_id:
            found.add(event.new_job_id)
        elif isinstance(event, TurnCompleted | TurnFailed):
            found.update(event.reply_ids)
    async for stored in queued(bus, OUTBOUND.name, subject="outbound.>"):
        if ref.encode() in stored.data:
            with contextlib.suppress(ContractError):
                found.add(decode(stored.data, SendMessage).job_id)
    matches = sorted(j for j in found if j.startswith(ref))
    if ref in matches or not matches:
        return ref
    if len(matches) == 1:
        return matches[0]
    raise ServiceError(
        f"job id prefix {ref!r} matches {len(matches)} jobs ({', '.join(matches[:3])}"
        f"{', ...' if len(matches) > 3 else ''}): give more characters"
    )


async def explain(
    bus: Bus,
    job_id: str,
    *,
    plugin_manifests: dict[str, PluginManifest] | None = None,
    _depth: int = 0,
) -> tr.Chain:
    """The causal chain of one outbound job (its id, or a unique prefix of it);
    ServiceError if no stream knows it."""
    subjects.send_key("x", job_id)  # the job id grammar (InvalidSubjectError otherwise)
    if _depth == 0:
        job_id = await resolve_job_id(bus, job_id)
    delivery_found, dead_found = await asyncio.gather(
        _events(bus, DELIVERY.name, contains=job_id), _events(bus, DEADLETTER.name)
    )
    delivery = [
        f for f in delivery_found if isinstance(f[2], DeliveryEvent) and f[2].job_id == job_id
    ]
    dead = _DeadLetters(dead_found)
    letter = dead.letters.get(job_id)
    letter_job = _payload_job(letter.event if letter else None)
    requeued_by = dead.created(job_id)
    origin_job = None  # for a requeued job: the original, from the letter that was requeued
    if requeued_by is not None and isinstance(requeued_by.event, DeadLetterRequeued):
        origin_job = _payload_job(dead.by_seq.get(requeued_by.event.letter_seq))

    where: tuple[str, str, str] | None = None
    if delivery:
        first = delivery[0][2]
        assert isinstance(first, DeliveryEvent)
        where = (first.channel, first.account, first.chat)
    elif (known := letter_job or origin_job) is not None:
        where = (known.channel, known.account, known.chat)

    pending = None
    if where is not None:
        pending = await _pending(bus, job_id, subjects.outbound(*where))
    else:
        pending = await _pending(bus, job_id, "outbound.>")
        if pending is not None:
            where = (pending[1].channel, pending[1].account, pending[1].chat)

    turn_found: Found | None = None
    if where is None:
        # Last resort: a turn that names the job (a job lost between turn and delivery).
        turns = await _events(bus, AGENT.name, contains=job_id)
        turn_found = _turn_of(turns, job_id)
        if turn_found is None:
            raise ServiceError(
                f"no job {job_id}: not on DELIVERY, OUTBOUND or DEADLETTER,"
                " and no turn lists it among its replies"
            )
        t = turn_found[2]
        assert isinstance(t, TurnCompleted | TurnFailed)
        where = (t.channel, t.account, t.chat)
    channel, account, _ = where

    if turn_found is None:
        turns = await _events(bus, AGENT.name, subjects.agent(*where), contains=job_id)
        turn_found = _turn_of(turns, job_id)
    turn = turn_found[2] if turn_found else None
    assert turn is None or isinstance(turn, TurnCompleted | TurnFailed)

    inbound_found: Found | None = None
    queued = letter_job or (pending[1] if pending else None)
    cause_id = turn.inbound_id if turn is not None else (queued.cause_id if queued else "")
    if cause_id:
        inbounds = await _events(bus, INBOUND.name, subjects.inbound(*where), contains=cause_id)
        inbound_found = next(
            (f for f in inbounds if isinstance(f[2], MessageReceived) and f[2].id == cause_id),
            None,
        )
    inbound = inbound_found[2] if inbound_found else None
    assert inbound is None or isinstance(inbound, MessageReceived)

    steps = [_step(DELIVERY.name, f) for f in delivery]
    attempts = [s for s in steps if isinstance(s.event, DeliveryFailed | DeliveryUncertain)]
    sent = [s for s in steps if isinstance(s.event, MessageSent)]
    receipts = [s for s in steps if isinstance(s.event, DeliveryReceipt)]
    dead_lettered = next((s for s in steps if isinstance(s.event, DeliveryDeadLettered)), None)
    first_sent = sent[0].event if sent else None
    assert first_sent is None or isinstance(first_sent, MessageSent)
    dead_event = dead_lettered.event if dead_lettered else None
    assert dead_event is None or isinstance(dead_event, DeliveryDeadLettered)

    job = tr.job_of(
        job_id,
        where,
        pending=pending,
        letter=letter.event if letter and isinstance(letter.event, DeadLettered) else None,
        letter_job=letter_job,
        sent=first_sent,
        dead=dead_event,
        turn=turn,
        inbound=inbound,
    )
    if job.requeued_from is None and requeued_by is not None and origin_job is not None:
        job = msgspec.structs.replace(job, requeued_from=origin_job.job_id)

    notes: list[str] = []
    lease = lease_end = None
    if first_sent is not None:
        lease, lease_end = await _lease(bus, channel, account, first_sent)
        notes += tr.lease_notes(
            first_sent,
            lease.event if lease and isinstance(lease.event, LeaseAcquired) else None,
            lease_end.event
            if lease_end and isinstance(lease_end.event, LeaseReleased | LeaseLost)
            else None,
        )

    policy = None
    if turn is not None and not (isinstance(turn, TurnCompleted) and turn.skipped):
        found = plugin_manifests if plugin_manifests is not None else manifests(discover())
        policy = await _policy(bus, found, turn)

    original = None
    if job.requeued_from and _depth < MAX_REQUEUE_DEPTH:
        try:
            original = await explain(
                bus, job.requeued_from, plugin_manifests=plugin_manifests, _depth=_depth + 1
            )
        except ServiceError as exc:
            notes.append(f"the original job {job.requeued_from} cannot be explained: {exc}")

    chain = tr.Chain(
        job=job,
        outcome=tr.outcome_of(sent, dead_lettered, attempts, pending is not None),
        inbound=_step(INBOUND.name, inbound_found) if inbound_found else None,
        turn=_step(AGENT.name, turn_found) if turn_found else None,
        policy=policy,
        attempts=attempts,
        sent=sent,
        lease=lease,
        lease_end=lease_end,
        receipts=receipts,
        dead_lettered=dead_lettered,
        letter=letter,
        requeued_as=dead.requeued_as(letter.seq) if letter else [],
        requeued_by=requeued_by,
        original=original,
        notes=notes,
    )
    return msgspec.structs.replace(chain, notes=[*notes, *tr.chain_notes(chain)])


async def _lease(
    bus: Bus, channel: str, account: str, sent: MessageSent
) -> tuple[tr.Step | None, tr.Step | None]:
    """The LeaseAcquired that granted the send's token, and how that lease ended."""
    found = await _events(
        bus, ACCOUNTS.name, subjects.accounts(channel, account), contains=sent.holder
    )

    def match(kind: tuple[type[Any], ...]) -> Found | None:
        return next(
            (
                f
                for f in found
                if isinstance(f[2], kind)
                and getattr(f[2], "holder", None) == sent.holder
                and getattr(f[2], "token", None) == sent.lease_token
            ),
            None,
        )

    acquired, ended = match((LeaseAcquired,)), match((LeaseReleased, LeaseLost))
    return (
        _step(ACCOUNTS.name, acquired) if acquired else None,
        _step(ACCOUNTS.name, ended) if ended else None,
    )
