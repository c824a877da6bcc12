"""Read models for `svc replay conversation` and `svc audit explain`: decoded events in,
an ordered transcript or the causal chain of one job out, and their readable lines.

Pure: the services layer reads the streams and hands over decoded events with where they
were stored (stream, sequence, stored time); nothing here does I/O.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, assert_never

import msgspec

from contracts.events import (
    AnyMessage,
    DeadLettered,
    DeadLetterRequeued,
    DeliveryDeadLettered,
    DeliveryFailed,
    DeliveryReceipt,
    DeliveryUncertain,
    FactForgotten,
    FactRemembered,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    MessageReceived,
    MessageRefused,
    MessageSent,
    SendMessage,
    ToolCallRecord,
    TurnCompleted,
    TurnFailed,
)

ConversationEvent = (
    MessageReceived
    | MessageRefused
    | TurnCompleted
    | TurnFailed
    | MessageSent
    | DeliveryFailed
    | DeliveryDeadLettered
    | DeliveryUncertain
    | DeliveryReceipt
    | FactRemembered
    | FactForgotten
    | SendMessage  # a job still queued on OUTBOUND (a settled one is gone from it)
)
CONVERSATION_TYPES = (
    MessageReceived,
    MessageRefused,
    TurnCompleted,
    TurnFailed,
    MessageSent,
    DeliveryFailed,
    DeliveryDeadLettered,
    DeliveryUncertain,
    DeliveryReceipt,
    FactRemembered,
    FactForgotten,
    SendMessage,
)

# Ties at the same stored time follow the pipeline: a message, the facts its turn wrote
# (published while the turn ran), the turn record, its queued jobs, then what delivery did.
STREAM_ORDER = {"INBOUND": 0, "PLUGINS": 1, "AGENT": 2, "OUTBOUND": 3, "DELIVERY": 4}
TEXT_LIMIT = 300  # characters of a message shown on one human line (--json has it all)


class Entry(msgspec.Struct, frozen=True, kw_only=True):
    """One event of a conversation, with where and when it was stored."""

    kind: str
    at: datetime
    stream: str
    seq: int
    event: ConversationEvent


def kind_of(event: ConversationEvent) -> str:
    """The transcript's name for an event."""
    match event:
        case MessageReceived():
            return "inbound"
        case TurnCompleted() | TurnFailed():
            return "turn"
        case MessageRefused():
            return "refused"
        case MessageSent():
            return "sent"
        case DeliveryFailed():
            return "failed"
        case DeliveryDeadLettered():
            return "dead_lettered"
        case DeliveryUncertain():
            return "uncertain"
        case DeliveryReceipt():
            return "receipt"
        case FactRemembered():
            return "fact_remembered"
        case FactForgotten():
            return "fact_forgotten"
        case SendMessage():
            return "queued"
        case _:
            assert_never(event)


def entry(event: ConversationEvent, stream: str, seq: int, stored: datetime | None) -> Entry:
    """An entry at its stored time (the event's own `at` when the store gave none)."""
    return Entry(kind=kind_of(event), at=stored or event.at, stream=stream, seq=seq, event=event)


def in_chat(event: ConversationEvent, channel: str, account: str, chat: str) -> bool:
    """Whether `event` is about this chat (subjects already say so, except memory facts,
    which share one subject per account)."""
    return (event.channel, event.account, event.chat) == (channel, account, chat)


def settled(entries: list[Entry]) -> list[Entry]:
    """`entries` without a queued job that is also recorded as sent or dead-lettered (the
    egress records the outcome just before it removes the job from OUTBOUND)."""
    done = {
        e.event.job_id for e in entries if isinstance(e.event, MessageSent | DeliveryDeadLettered)
    }
    return [e for e in entries if not (isinstance(e.event, SendMessage) and e.event.job_id in done)]


def ordered(entries: list[Entry]) -> list[Entry]:
    """Entries by stored time; ties in pipeline order, then stream order.

    One exception keeps cause before effect: the core stores a turn's jobs before the turn
    record, so egress may record a reply's send before its turn; such a turn is listed at
    the time of the first delivery event (or queued job) of its replies (its `at` stays
    the stored time).
    """
    first_delivery: dict[str, datetime] = {}
    for e in entries:
        if e.stream in ("DELIVERY", "OUTBOUND"):
            job_id = getattr(e.event, "job_id", "")
            if job_id not in first_delivery or e.at < first_delivery[job_id]:
                first_delivery[job_id] = e.at

    def key(e: Entry) -> tuple[datetime, int, int]:
        at = e.at
        if isinstance(e.event, TurnCompleted | TurnFailed):
            at = min([at, *(first_delivery[j] for j in e.event.reply_ids if j in first_delivery)])
        return at, STREAM_ORDER.get(e.stream, 9), e.seq

    return sorted(entries, key=key)


# --- human lines -------------------------------------------------------------------------


def clock(at: datetime) -> str:
    """`HH:MM:SS.mmm` in UTC."""
    at = at.astimezone(UTC)
    return f"{at:%H:%M:%S}.{at.microsecond // 1000:03d}"


def stamp(at: datetime | None) -> str:
    """`YYYY-MM-DD HH:MM:SS.mmm UTC`, or `-` when unknown."""
    if at is None:
        return "-"
    return f"{at.astimezone(UTC):%Y-%m-%d} {clock(at)} UTC"


def one_line(text: str, limit: int = TEXT_LIMIT) -> str:
    """`text` on one line, cut at `limit` characters (saying how much was cut)."""
    flat = text.replace("\r", "").replace("\n", "\\n")
    if len(flat) <= limit:
        return flat
    return f"{flat[:limit]}... (+{len(flat) - limit} chars)"


def _args(arguments: dict[str, Any]) -> str:
    return one_line(msgspec.json.encode(arguments).decode(), 120) if arguments else "{}"


def tool_call(call: ToolCallRecord) -> str:
    """`name {args} -> ok 1.2 ms` or `name {args} -> ERROR why 1.2 ms`."""
    outcome = f"ERROR {one_line(call.error, 120)}" if call.error is not None else "ok"
    digest = f" (result {call.result_digest})" if call.result_digest and call.error is None else ""
    return f"{call.name} {_args(call.arguments)} -> {outcome}{digest} {call.latency_ms:.1f} ms"


def operator_line(turn: TurnCompleted) -> str:
    """Who made an operator-originated turn: `operator send by alice (user) from 10.0.0.7
    via web`."""
    origin = turn.origin
    if origin is None:
        return ""
    where = f" from {origin.client}" if origin.client else ""
    return f"operator send by {origin.actor} ({origin.kind}){where} via {origin.via}"


def turn_summary(turn: TurnCompleted | TurnFailed) -> str:
    """`turn (echo, 1 tool: ...; 12.3 ms, 10+5 tokens)`, a skipped or a failed turn, or
    an operator's send."""
    if isinstance(turn, TurnCompleted) and turn.origin is not None:
        return f"{operator_line(turn)} ({len(turn.reply_ids)} job(s))"
    if isinstance(turn, TurnCompleted) and turn.skipped is not None:
        return f"turn skipped ({turn.skipped})"
    parts = [turn.model or "model unknown"]
    if turn.tools_called:
        n = len(turn.tools_called)
        calls = ", ".join(tool_call(c) for c in turn.tools_called)
        parts.append(f"{n} tool{'s' if n != 1 else ''}: {calls}")
    tail = []
    if isinstance(turn, TurnCompleted):
        tail.append(f"{turn.latency_ms:.1f} ms")
        if turn.usage is not None:
            tail.append(f"{turn.usage.prompt_tokens}+{turn.usage.completion_tokens} tokens")
    replies = len(turn.reply_ids)
    tail.append(f"{replies} repl{'ies' if replies != 1 else 'y'}")
    body = f"({', '.join(parts)}; {', '.join(tail)})"
    if isinstance(turn, TurnFailed):
        return f"turn FAILED {body}: {one_line(turn.error, 200)}"
    return f"turn {body}"


def sent_text(sent: MessageSent) -> str:
    """What was sent, or a note for records made before the text was kept."""
    return one_line(sent.text) if sent.text else "(text not recorded)"


def entry_line(e: Entry) -> str:
    """One readable transcript line, after the time."""
    event = e.event
    match event:
        case MessageReceived():
            who = f"{event.sender_name} ({event.sender})" if event.sender_name else event.sender
            own = " [own message]" if event.from_me else ""
            if who == event.chat:
                return f"user > {one_line(event.text)}{own}"
            return f"user > {one_line(event.text)}   [from {who}]{own}"
        case TurnCompleted() | TurnFailed():
            return turn_summary(event)
        case MessageRefused():
            detail = f"; {one_line(event.detail, 120)}" if event.detail else ""
            return f"REFUSED by policy {event.rule}{detail} (never reached the model)"
        case MessageSent():
            again = f", attempt {event.attempt}" if event.attempt != 1 else ""
            return (
                f"bot  < {sent_text(event)}   [sent by {event.holder} token {event.lease_token}"
                f"{again}; job {event.job_id}]"
            )
        case DeliveryFailed():
            kind = "permanently" if event.permanent else ""
            return f"FAILED {kind + ' ' if kind else ''}attempt {event.attempt}: {event.error}" + (
                f"   [job {event.job_id}]"
            )
        case DeliveryDeadLettered():
            return (
                f"DEAD-LETTERED after {event.attempts} attempt(s): {one_line(event.reason, 200)}"
                f"   [job {event.job_id}; svc audit explain {event.job_id}]"
            )
        case DeliveryUncertain():
            return (
                f"UNCERTAIN whether job {event.job_id} reached the network (holder "
                f"{event.holder} token {event.lease_token}); resolution: "
                f"{event.resolution or 'unknown'}"
            )
        case DeliveryReceipt():
            return f"receipt {event.status}   [job {event.job_id}, {event.transport_message_id}]"
        case FactRemembered():
            return f"memory: remember {event.key} = {one_line(event.value, 120)}"
        case FactForgotten():
            return f"memory: forget {event.key}"
        case SendMessage():
            return f"queued < {one_line(event.text)}   [job {event.job_id}; still on OUTBOUND]"
        case _:
            assert_never(event)


def transcript_lines(entries: list[Entry]) -> list[str]:
    """The transcript: a date line whenever the UTC day changes, then `time  line`; a turn
    that does not directly follow its message says which message it answers."""
    lines: list[str] = []
    day = ""
    asked = {e.event.id: e.event.text for e in entries if isinstance(e.event, MessageReceived)}
    previous = ""
    for e in entries:
        today = f"{e.at.astimezone(UTC):%Y-%m-%d}"
        if today != day:
            lines.append(f"--- {today} (UTC) ---")
            day = today
        line = entry_line(e)
        if (
            isinstance(e.event, TurnCompleted | TurnFailed)
            and e.event.inbound_id != previous
            and e.event.inbound_id in asked
        ):
            line += f'   [re: "{one_line(asked[e.event.inbound_id], 40)}"]'
        lines.append(f"{clock(e.at)}  {line}")
        previous = e.event.id
    return lines


# --- the causal chain of one job ---------------------------------------------------------


class Step(msgspec.Struct, frozen=True, kw_only=True):
    """One stored event of a chain: where it is and what it says."""

    stream: str
    seq: int
    at: datetime | None
    event: AnyMessage


class PolicyDecision(msgspec.Struct, frozen=True, kw_only=True):
    """Whether a tool was offered, and which rule decided."""

    tool: str
    allowed: bool
    rule: str


class Policy(msgspec.Struct, frozen=True, kw_only=True):
    """The tool policy a turn was resolved under, rebuilt as of its PLUGINS position."""

    plugins_seq: int
    basis: str  # "projection" (replayed up to plugins_seq) or "defaults" (no projection)
    decisions: list[PolicyDecision]
    # Tools whose decision differs now (the latest PLUGINS event), as they are now.
    changed_since: list[PolicyDecision] = msgspec.field(default_factory=list)


class Job(msgspec.Struct, frozen=True, kw_only=True):
    """The job as far as the log still shows it (OUTBOUND is a work queue: a settled job
    is gone from it; its text then comes from MessageSent or the dead letter)."""

    job_id: str
    channel: str
    account: str
    chat: str
    text: str | None = None
    reply_to: str | None = None
    cause_id: str = ""
    requeued_from: str | None = None
    job_seq: int = 0  # its OUTBOUND sequence (enqueue position), 0 when unknown
    part: int = 0  # 1-based position in the turn's replies, 0 when unknown
    parts: int = 0
    pending: bool = False  # still in OUTBOUND
    source: str = ""  # where text/reply_to came from


class Chain(msgspec.Struct, frozen=True, kw_only=True):
    """Inbound -> turn (+ policy) -> job -> attempts -> sent + lease -> receipts, or the
    dead letter; and, for a requeued job, the chain of the job it was requeued from."""

    job: Job
    outcome: str  # sent | dead-lettered | pending | uncertain | unknown
    inbound: Step | None = None
    turn: Step | None = None
    policy: Policy | None = None
    attempts: list[Step] = msgspec.field(default_factory=list)  # DeliveryFailed/Uncertain
    sent: list[Step] = msgspec.field(default_factory=list)  # MessageSent (more = a resend)
    lease: Step | None = None  # LeaseAcquired of the (first) send's holder and token
    lease_end: Step | None = None  # LeaseReleased / LeaseLost of that token, if any
    receipts: list[Step] = msgspec.field(default_factory=list)
    dead_lettered: Step | None = None  # DeliveryDeadLettered
    letter: Step | None = None  # DeadLettered with every attempt's error
    requeued_as: list[Step] = msgspec.field(default_factory=list)  # this job's letter, requeued
    requeued_by: Step | None = None  # the DeadLetterRequeued that created this job
    original: Chain | None = None
    notes: list[str] = msgspec.field(default_factory=list)


def reply_position(turn: TurnCompleted | TurnFailed | None, job_id: str) -> tuple[int, int]:
    """(1-based part, parts) of `job_id` among the turn's replies; (0, 0) if unknown."""
    if turn is None or job_id not in turn.reply_ids:
        return 0, 0
    return turn.reply_ids.index(job_id) + 1, len(turn.reply_ids)


def job_of(
    job_id: str,
    where: tuple[str, str, str],
    *,
    pending: tuple[int, SendMessage] | None = None,
    letter: DeadLettered | None = None,
    letter_job: SendMessage | None = None,
    sent: MessageSent | None = None,
    dead: DeliveryDeadLettered | None = None,
    turn: TurnCompleted | TurnFailed | None = None,
    inbound: MessageReceived | None = None,
) -> Job:
    """Assemble what is known about a job from every place that still shows it."""
    channel, account, chat = where
    part, parts = reply_position(turn, job_id)
    # What the send quoted, as recorded; before MessageSent recorded it, a turn's first
    # reply always named the message it answered.
    if sent is not None and sent.reply_to is not msgspec.UNSET:
        derived_reply_to = sent.reply_to
    else:
        derived_reply_to = inbound.message_id if inbound is not None and part == 1 else None
    seq = (
        (pending[0] if pending else 0)
        or (sent.job_seq if sent else 0)
        or (dead.job_seq if dead else 0)
        or (letter.source_seq if letter else 0)
    )
    command = pending[1] if pending else letter_job
    if command is not None:
        return Job(
            job_id=job_id,
            channel=command.channel,
            account=command.account,
            chat=command.chat,
            text=command.text,
            reply_to=command.reply_to,
            cause_id=command.cause_id,
            requeued_from=command.requeued_from,
            job_seq=seq,
            part=part,
            parts=parts,
            pending=pending is not None,
            source="OUTBOUND (still queued)" if pending else "the dead letter's payload",
        )
    return Job(
        job_id=job_id,
        channel=channel,
        account=account,
        chat=chat,
        text=(sent.text or None) if sent else None,
        reply_to=derived_reply_to,
        cause_id=turn.inbound_id if turn is not None else "",
        job_seq=seq,
        part=part,
        parts=parts,
        source="MessageSent" if sent is not None and sent.text else "",
    )


def outcome_of(sent: list[Step], dead: Step | None, attempts: list[Step], pending: bool) -> str:
    """What became of the job."""
    if sent:
        return "sent"
    if dead is not None:
        return "dead-lettered"
    if pending:
        return "pending"
    if any(isinstance(s.event, DeliveryUncertain) for s in attempts):
        return "uncertain"
    return "unknown"


def lease_notes(
    sent: MessageSent, lease: LeaseAcquired | None, end: LeaseReleased | LeaseLost | None
) -> list[str]:
    """What the lease records say about the fencing of a send."""
    if sent.lease_token <= 0:
        return [f"the send carries no fencing token (holder {sent.holder!r})"]
    if lease is None:
        return [
            f"no LeaseAcquired for holder {sent.holder} token {sent.lease_token} on ACCOUNTS:"
            " the token was never recorded as granted"
        ]
    notes = []
    began = sent.sent_at or sent.at
    if lease.at > began:
        notes.append("the lease was recorded as acquired after the send began")
    if end is not None and end.at < began:
        notes.append(f"the lease was recorded as {type(end).__name__} before the send began")
    return notes


def chain_notes(chain: Chain) -> list[str]:
    """Things an operator should look at: missing links, resends, contradictions."""
    notes: list[str] = []
    if chain.turn is None and chain.job.requeued_from is None and chain.requeued_by is None:
        notes.append("no turn lists this job among its replies (a job not made by the core?)")
    operator = (
        isinstance(chain.turn.event, TurnCompleted) and chain.turn.event.origin is not None
        if chain.turn
        else False
    )
    if chain.turn is not None and chain.inbound is None and not operator:
        notes.append("the turn's inbound message is not on INBOUND (removed by limits?)")
    if len(chain.sent) > 1:
        notes.append(f"recorded as sent {len(chain.sent)} times (a resend)")
    if chain.sent and chain.dead_lettered is not None:
        notes.append("recorded both as sent and as dead-lettered")
    if chain.outcome == "unknown":
        notes.append("neither sent, dead-lettered nor queued: its outcome is not recorded")
    return notes


def _ref(step: Step | None, width: int = 14) -> str:
    return f"{step.stream} {step.seq}".ljust(width) if step else "-".ljust(width)


def _at(step: Step) -> str:
    return clock(step.at) if step.at else "--:--:--.---"


def chain_lines(chain: Chain, indent: str = "") -> list[str]:
    """The chain, one step per line: `  name  STREAM seq  time  what`."""
    job = chain.job
    lines = [
        f"{indent}job {job.job_id}  {job.channel}/{job.account}  {job.chat}"
        f"  -> {chain.outcome.upper()}"
    ]
    pad = indent + "  "

    def add(name: str, step: Step | None, text: str) -> None:
        when = _at(step) if step else " " * 12
        lines.append(f"{pad}{name:<9} {_ref(step)} {when}  {text}")

    def sub(text: str) -> None:
        lines.append(f"{pad}{'':<9} {'':<14} {'':<12}    {text}")

    if chain.requeued_by is not None:
        rq = chain.requeued_by.event
        assert isinstance(rq, DeadLetterRequeued)
        who = f" by {rq.actor}" if rq.actor else ""
        why = f" ({rq.reason})" if rq.reason else ""
        add("requeued", chain.requeued_by, f"from dead letter {rq.letter_seq}{who}{why}")
    if chain.inbound is not None:
        msg = chain.inbound.event
        assert isinstance(msg, MessageReceived)
        add(
            "inbound",
            chain.inbound,
            f"user {msg.sender} > {one_line(msg.text, 200)}"
            f"   [id {msg.id}, message_id {msg.message_id}]",
        )
    if chain.turn is not None:
        turn = chain.turn.event
        assert isinstance(turn, TurnCompleted | TurnFailed)
        status = "TurnFailed" if isinstance(turn, TurnFailed) else "TurnCompleted"
        part = f"; this job is reply {job.part} of {job.parts}" if job.part else ""
        latency = f", {turn.latency_ms:.1f} ms" if isinstance(turn, TurnCompleted) else ""
        add("turn", chain.turn, f"{status} model {turn.model}{latency}{part}   [id {turn.id}]")
        if isinstance(turn, TurnCompleted) and turn.origin is not None:
            sub(operator_line(turn))  # a proactive send: no inbound message caused it
        if isinstance(turn, TurnFailed):
            sub(f"error: {one_line(turn.error, 200)}")
        for call in turn.tools_called:
            sub(f"tool {tool_call(call)}")
        if not turn.tools_called:
            sub("no tools called")
    if chain.policy is not None:
        pol = chain.policy
        basis = (
            f"as of PLUGINS seq {pol.plugins_seq} (replayed up to the turn's position)"
            if pol.basis == "projection"
            else "plugin defaults (no plugin event before the turn: plugins_seq 0)"
        )
        lines.append(
            f"{pad}{'policy':<9} {'PLUGINS <= ' + str(pol.plugins_seq):<14} {'':<12}  {basis}"
        )
        for d in pol.decisions:
            sub(f"{'allow' if d.allowed else 'DENY ':<5} {d.tool:<24} {d.rule}")
        for d in pol.changed_since:
            sub(f"since changed: {d.tool} is now {'allowed' if d.allowed else 'DENIED'} ({d.rule})")
    text = f'"{one_line(job.text, 200)}"' if job.text is not None else "(text not recorded)"
    reply = f", reply_to {job.reply_to}" if job.reply_to else ""
    origin = f", requeued from job {job.requeued_from}" if job.requeued_from else ""
    queued = "OUTBOUND " + (str(job.job_seq) if job.job_seq else "?")
    lines.append(
        f"{pad}{'job':<9} {queued:<14} {'':<12}  {text}{reply}{origin}"
        + ("   [still queued]" if job.pending else "")
    )
    for step in chain.attempts:
        ev = step.event
        if isinstance(ev, DeliveryFailed):
            perm = " (permanent)" if ev.permanent else ""
            add("attempt", step, f"FAILED attempt {ev.attempt}{perm}: {one_line(ev.error, 200)}")
        elif isinstance(ev, DeliveryUncertain):
            add(
                "uncertain",
                step,
                f"holder {ev.holder} token {ev.lease_token} stopped mid-send; "
                f"resolution: {ev.resolution or 'unknown'}",
            )
    for step in chain.sent:
        ev = step.event
        assert isinstance(ev, MessageSent)
        began = f"; send began {clock(ev.sent_at)}" if ev.sent_at else ""
        add(
            "sent",
            step,
            f"attempt {ev.attempt} by {ev.holder}, token {ev.lease_token}, "
            f"transport id {ev.transport_message_id}{began}",
        )
    if chain.lease is not None:
        lease = chain.lease.event
        assert isinstance(lease, LeaseAcquired)
        add("lease", chain.lease, f"LeaseAcquired by {lease.holder}, token {lease.token}")
    if chain.lease_end is not None:
        end = chain.lease_end.event
        assert isinstance(end, LeaseReleased | LeaseLost)
        why = f": {end.reason}" if end.reason else ""
        add("lease end", chain.lease_end, f"{type(end).__name__} token {end.token}{why}")
    for step in chain.receipts:
        ev = step.event
        assert isinstance(ev, DeliveryReceipt)
        add("receipt", step, f"{ev.status} ({ev.transport_message_id})")
    if chain.dead_lettered is not None:
        ev = chain.dead_lettered.event
        assert isinstance(ev, DeliveryDeadLettered)
        add("dead", chain.dead_lettered, f"after {ev.attempts} attempt(s): {ev.reason}")
    if chain.letter is not None:
        letter = chain.letter.event
        assert isinstance(letter, DeadLettered)
        add(
            "letter",
            chain.letter,
            f"from {letter.source_stream} {letter.source_seq}: {one_line(letter.reason, 200)}",
        )
        for err in letter.errors:
            sub(f"attempt {err.attempt} at {clock(err.at)}: {one_line(err.error, 200)}")
    for step in chain.requeued_as:
        rq = step.event
        assert isinstance(rq, DeadLetterRequeued)
        who = f" by {rq.actor}" if rq.actor else ""
        add("requeue", step, f"the dead letter was requeued as job {rq.new_job_id}{who}")
    for note in chain.notes:
        lines.append(f"{pad}NOTE: {note}")
    if chain.original is not None:
        lines.append(f"{pad}requeued from:")
        lines.extend(chain_lines(chain.original, indent=pad + "  "))
    return lines
