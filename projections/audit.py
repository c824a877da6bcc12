"""The audit: DESIGN.md's invariants checked against the log, as a pure fold.

The services layer reads the streams in a fixed order (ACCOUNTS, INBOUND, the core
consumer's ack floor, AGENT, DEADLETTER, OUTBOUND's pending jobs, DELIVERY, SIM_OUT) and
feeds every decoded event here; `finish(now)` judges. The order matters for "lost": a
turn is published before its inbound is acked, a job's outcome before the job is acked,
so what one read misses the next one sees, and nothing in flight is called lost.

Rules (each violation names the offending event ids):
- split-brain: per account, sends (`MessageSent`, by the time the send began) under a
  token lower than one already used; one token used by two holders; a token the lease
  store never granted to that holder (`LeaseAcquired`); a send that began after a newer
  lease had been granted or after its own lease was released. With SIM_OUT (the sim
  network's own record) the network's order is checked the same way.
- lost: a `MessageReceived` with no turn (nor a dead letter), acked by the core or older
  than the grace period; a job (from a turn's reply ids, a requeue, or any DELIVERY event)
  with no `MessageSent` / `DeliveryDeadLettered` that is no longer queued.
- duplicates: a job sent twice (two different `MessageSent` records, or two sends on the
  network) without a recorded `DeliveryUncertain`; two turns for one inbound message.
- order: per chat, sends whose enqueue positions go backwards; turns whose inbound
  messages go backwards.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from contracts.events import (
    AccountEvent,
    AccountRegistered,
    AccountResumed,
    AgentEvent,
    DeadLetterDropped,
    DeadLettered,
    DeadLetterEvent,
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
    SessionBanned,
    SessionLoggedOut,
)

RULES = ("split-brain", "lost", "duplicates", "order")


@dataclass(frozen=True)
class Violation:
    """One broken promise, with the events that show it."""

    rule: str
    account: str
    message: str
    event_ids: tuple[str, ...]
    refs: tuple[str, ...] = ()  # "STREAM:seq" of the offending events
    chat: str = ""


@dataclass(frozen=True)
class LeaseEntry:
    """One line of an account's lease timeline."""

    at: datetime
    event: str
    holder: str
    token: int
    reason: str = ""


@dataclass
class Report:
    """What `svc audit` prints: violations per rule and a summary."""

    violations: list[Violation] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # events read per stream
    skipped: dict[str, int] = field(default_factory=dict)  # undecodable events per stream
    checked: dict[str, dict[str, int]] = field(default_factory=dict)  # per rule: what/how many
    dead_letters: dict[str, int] = field(default_factory=dict)
    uncertain: list[dict[str, Any]] = field(default_factory=list)
    leases: dict[str, list[LeaseEntry]] = field(default_factory=dict)
    pending_jobs: int = 0
    waiting_inbound: int = 0
    oldest_pending: datetime | None = None

    @property
    def ok(self) -> bool:
        """No rule was violated."""
        return not self.violations

    def by_rule(self) -> dict[str, list[Violation]]:
        """Violations grouped by rule, every rule present."""
        out: dict[str, list[Violation]] = {rule: [] for rule in RULES}
        for v in self.violations:
            out[v.rule].append(v)
        return out


@dataclass
class _Send:
    seq: int
    at: datetime  # when the send began (sent_at), else when it was recorded
    event_id: str
    holder: str
    token: int
    job_id: str
    job_seq: int
    transport_id: str
    chat: str
    stream: str = "DELIVERY"


@dataclass
class _Job:
    account: str
    chat: str
    at: datetime  # when it is first known to exist (enqueue, requeue, or first event)
    order: tuple[int, int] | None = None  # (turn's AGENT seq, index in reply_ids)
    outcome: str = ""  # sent | dead-lettered | skipped
    pending: bool = False
    sent: list[_Send] = field(default_factory=list)
    uncertain: bool = False
    refs: list[str] = field(default_factory=list)


@dataclass
class _Inbound:
    seq: int
    at: datetime
    account: str
    chat: str
    turns: list[tuple[int, str]] = field(default_factory=list)  # (AGENT seq, event id)
    dead: bool = False


class Auditor:
    """Feed events (in the services layer's read order), then `finish`."""

    def __init__(
        self,
        *,
        since: datetime | None = None,
        until: datetime | None = None,
        grace: float = 60.0,
        account: str | None = None,
    ) -> None:
        self.since = since
        self.until = until
        self.grace = timedelta(seconds=grace)
        self.account = account
        self.report = Report()
        self._inbound: dict[str, _Inbound] = {}
        self._inbound_seq_done: int = 0  # the core consumer's ack floor (0: unknown)
        self._jobs: dict[str, _Job] = {}
        self._granted: dict[tuple[str, int], tuple[str, datetime, str]] = {}
        self._released: dict[tuple[str, int], tuple[datetime, str]] = {}
        self._sends: dict[str, list[_Send]] = defaultdict(list)  # per account
        self._network: dict[str, list[_Send]] = defaultdict(list)  # SIM_OUT per account
        self._chat_turns: dict[tuple[str, str], list[tuple[int, str, str]]] = defaultdict(list)
        self._dead_inbound: set[int] = set()

    # --- feeding -------------------------------------------------------------------------

    def _in_window(self, at: datetime) -> bool:
        return (self.since is None or at >= self.since) and (self.until is None or at <= self.until)

    def _count(self, stream: str) -> None:
        self.report.counts[stream] = self.report.counts.get(stream, 0) + 1

    def skipped(self, stream: str) -> None:
        """An event that did not decode (or of a kind that does not belong there)."""
        self._count(stream)
        self.report.skipped[stream] = self.report.skipped.get(stream, 0) + 1

    def account_event(self, seq: int, at: datetime, event: AccountEvent) -> None:
        """ACCOUNTS: the lease timeline and the grants sends are checked against."""
        self._count("ACCOUNTS")
        match event:
            case LeaseAcquired():
                self._granted[(event.account, event.token)] = (event.holder, event.at, event.id)
                entry = LeaseEntry(event.at, "acquired", event.holder, event.token)
            case LeaseReleased():
                self._released[(event.account, event.token)] = (event.at, event.id)
                entry = LeaseEntry(event.at, "released", event.holder, event.token, event.reason)
            case LeaseLost():
                entry = LeaseEntry(event.at, "lost", event.holder, event.token, event.reason)
            case SessionLoggedOut():
                entry = LeaseEntry(event.at, "logged-out", event.holder, 0, event.reason)
            case SessionBanned():
                entry = LeaseEntry(event.at, "banned", event.holder, 0, event.reason)
            case AccountResumed():
                entry = LeaseEntry(event.at, "resumed", event.actor, 0, event.reason)
            case AccountRegistered():
                entry = LeaseEntry(event.at, "registered", "", 0, event.transport)
        if self._in_window(event.at):
            self.report.leases.setdefault(event.account, []).append(entry)

    def inbound(self, seq: int, at: datetime, event: MessageReceived) -> None:
        """INBOUND: every message must end in a turn."""
        self._count("INBOUND")
        self._inbound[event.id] = _Inbound(seq, at, event.account, event.chat)

    def core_progress(self, ack_floor: int) -> None:
        """Every INBOUND message up to `ack_floor` was acked by the core."""
        self._inbound_seq_done = ack_floor

    def turn(self, seq: int, at: datetime, event: AgentEvent) -> None:
        """AGENT: a turn settles its inbound and enqueues its reply jobs, in order."""
        self._count("AGENT")
        found = self._inbound.get(event.inbound_id)
        if found is not None:
            found.turns.append((seq, event.id))
            if len(found.turns) == 1:
                self._chat_turns[(event.account, event.chat)].append(
                    (found.seq, event.id, at_ref("AGENT", seq))
                )
        for index, job_id in enumerate(event.reply_ids):
            job = self._job(job_id, event.account, event.chat, at)
            if job.order is None:
                job.order = (seq, index)

    def dead_letter(self, seq: int, at: datetime, event: DeadLetterEvent) -> None:
        """DEADLETTER: dead-lettered inbound messages and jobs; requeued jobs."""
        self._count("DEADLETTER")
        match event:
            case DeadLettered():
                kind = event.source_stream or "?"
                self.report.dead_letters[kind] = self.report.dead_letters.get(kind, 0) + 1
                if event.source_stream == "INBOUND":
                    self._dead_inbound.add(event.source_seq)
            case DeadLetterRequeued():
                self.report.dead_letters["requeued"] = (
                    self.report.dead_letters.get("requeued", 0) + 1
                )
                if event.new_job_id:
                    self._job(event.new_job_id, "", "", at)
            case DeadLetterDropped():
                self.report.dead_letters["dropped"] = self.report.dead_letters.get("dropped", 0) + 1

    def pending(self, seq: int, at: datetime, job: SendMessage) -> None:
        """OUTBOUND: a job still queued (not lost: it waits for the account's owner)."""
        self._count("OUTBOUND")
        found = self._job(job.job_id, job.account, job.chat, at)
        found.pending = True
        self.report.pending_jobs += 1
        if self.report.oldest_pending is None or at < self.report.oldest_pending:
            self.report.oldest_pending = at

    def delivery(self, seq: int, at: datetime, event: DeliveryEvent) -> None:
        """DELIVERY: outcomes, attempts, uncertain sends, receipts."""
        self._count("DELIVERY")
        job = self._job(event.job_id, event.account, event.chat, at)
        ref = at_ref("DELIVERY", seq)
        match event:
            case MessageSent():
                send = _Send(
                    seq,
                    event.sent_at or event.at,
                    event.id,
                    event.holder,
                    event.lease_token,
                    event.job_id,
                    event.job_seq,
                    event.transport_message_id,
                    event.chat,
                )
                job.sent.append(send)
                job.outcome = job.outcome or "sent"
                job.refs.append(ref)
                self._sends[event.account].append(send)
            case DeliveryDeadLettered():
                job.outcome = job.outcome or "dead-lettered"
                job.refs.append(ref)
            case DeliveryUncertain():
                job.uncertain = True
                if event.resolution == "skip":
                    job.outcome = job.outcome or "skipped"
                if self._in_window(event.at):
                    self.report.uncertain.append(
                        {
                            "job_id": event.job_id,
                            "account": event.account,
                            "chat": event.chat,
                            "holder": event.holder,
                            "lease_token": event.lease_token,
                            "resolution": event.resolution,
                            "event_id": event.id,
                            "ref": ref,
                        }
                    )
            case DeliveryFailed() | DeliveryReceipt():
                pass

    def network_send(
        self, seq: int, at: datetime, account: str, chat: str, job_id: str, holder: str, token: int
    ) -> None:
        """SIM_OUT: what the simulated network accepted, in the order it accepted it."""
        self._count("SIM_OUT")
        send = _Send(seq, at, f"SIM_OUT:{seq}", holder, token, job_id, 0, "", chat, "SIM_OUT")
        self._network[account].append(send)

    def _job(self, job_id: str, account: str, chat: str, at: datetime) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = _Job(account, chat, at)
        elif not job.account and account:
            job.account, job.chat = account, chat
        return job

    # --- judging -------------------------------------------------------------------------

    def finish(self, now: datetime) -> Report:
        """Judge everything fed; return the report."""
        self._split_brain()
        self._lost(now)
        self._duplicates()
        self._order()
        return self.report

    def _flag(
        self,
        rule: str,
        account: str,
        message: str,
        ids: list[str],
        refs: list[str],
        chat: str = "",
    ) -> None:
        self.report.violations.append(
            Violation(rule, account, message, tuple(ids), tuple(refs), chat)
        )

    def _split_brain(self) -> None:
        sends_checked = 0
        for account, sends in sorted(self._sends.items()):
            sends_checked += len(sends)
            self._fencing(account, sends, "DELIVERY")
            self._grants(account, sends)
        for account, sends in sorted(self._network.items()):
            sends_checked += len(sends)
            self._fencing(account, sends, "SIM_OUT")  # already in the network's order
        self.report.checked["split-brain"] = {
            "accounts": len(self._sends.keys() | self._network.keys()),
            "sends": sends_checked,
            "leases granted": len(self._granted),
        }

    def _fencing(self, account: str, sends: list[_Send], source: str) -> None:
        """Tokens never go back, and each token has one holder."""
        ordered = sends if source == "SIM_OUT" else sorted(sends, key=lambda s: (s.at, s.seq))
        highest: _Send | None = None
        owner: dict[int, _Send] = {}
        for s in ordered:
            if not self._in_window(s.at):
                highest = s if highest is None or s.token > highest.token else highest
                owner.setdefault(s.token, s)
                continue
            first = owner.setdefault(s.token, s)
            if first.holder != s.holder:
                self._flag(
                    "split-brain",
                    account,
                    f"token {s.token} used by two holders: {first.holder} and {s.holder}"
                    f" ({source})",
                    [first.event_id, s.event_id],
                    [ref(first), ref(s)],
                    s.chat,
                )
            if highest is not None and s.token < highest.token:
                self._flag(
                    "split-brain",
                    account,
                    f"{s.holder} sent job {s.job_id} under token {s.token} after"
                    f" {highest.holder} had sent under token {highest.token} ({source})",
                    [highest.event_id, s.event_id],
                    [ref(highest), ref(s)],
                    s.chat,
                )
            if highest is None or s.token > highest.token:
                highest = s

    def _grants(self, account: str, sends: list[_Send]) -> None:
        """Every token was granted to its holder, and used only while it was the newest."""
        if not self._granted:
            return  # no lease history to check against (e.g. ACCOUNTS was purged)
        grants = sorted(
            (token, at, holder, eid)
            for (acct, token), (holder, at, eid) in self._granted.items()
            if acct == account
        )
        for s in sends:
            if not self._in_window(s.at):
                continue
            grant = self._granted.get((account, s.token))
            if grant is None or grant[0] != s.holder:
                who = f"to {grant[0]}" if grant else "to anyone"
                self._flag(
                    "split-brain",
                    account,
                    f"{s.holder} sent job {s.job_id} under token {s.token}, which was never"
                    f" granted {who} (no matching LeaseAcquired)",
                    [s.event_id, *([grant[2]] if grant else [])],
                    [ref(s)],
                    s.chat,
                )
                continue
            newer = next(((t, at, h, e) for t, at, h, e in grants if t > s.token), None)
            if newer is not None and newer[1] <= s.at:
                self._flag(
                    "split-brain",
                    account,
                    f"{s.holder} began sending job {s.job_id} under token {s.token} at"
                    f" {s.at.isoformat()}, after the lease passed to {newer[2]} (token"
                    f" {newer[0]}) at {newer[1].isoformat()}",
                    [s.event_id, newer[3]],
                    [ref(s)],
                    s.chat,
                )
            released = self._released.get((account, s.token))
            if released is not None and released[0] <= s.at:
                self._flag(
                    "split-brain",
                    account,
                    f"{s.holder} began sending job {s.job_id} under token {s.token} after"
                    f" releasing that lease at {released[0].isoformat()}",
                    [s.event_id, released[1]],
                    [ref(s)],
                    s.chat,
                )

    def _lost(self, now: datetime) -> None:
        cutoff = now - self.grace
        floor = self._inbound_seq_done
        for inbound_id, m in self._inbound.items():
            if not self._in_window(m.at) or m.turns or m.seq in self._dead_inbound:
                continue
            acked = m.seq <= floor
            if not acked and floor:
                self.report.waiting_inbound += 1  # queued for the core, not lost
                continue
            if not acked and m.at > cutoff:
                continue  # too recent to judge (and no core consumer to ask)
            why = (
                f"the core acked it (ack floor INBOUND:{floor})"
                if acked
                else f"no core consumer, older than {self.grace.total_seconds():g}s"
            )
            self._flag(
                "lost",
                m.account,
                f"MessageReceived {inbound_id} (INBOUND:{m.seq}) has no TurnCompleted or"
                f" TurnFailed; {why}",
                [inbound_id],
                [f"INBOUND:{m.seq}"],
                m.chat,
            )
        for job_id, job in self._jobs.items():
            if self.account is not None and job.account != self.account:
                continue
            if job.outcome or job.pending or not self._in_window(job.at) or job.at > cutoff:
                continue
            self._flag(
                "lost",
                job.account,
                f"job {job_id} has no MessageSent or DeliveryDeadLettered and is no longer"
                " queued in OUTBOUND",
                [job_id],
                job.refs,
                job.chat,
            )
        self.report.checked["lost"] = {
            "inbound messages": sum(1 for m in self._inbound.values() if self._in_window(m.at)),
            "jobs": sum(1 for j in self._jobs.values() if self._in_window(j.at)),
            "pending jobs": self.report.pending_jobs,
        }

    def _duplicates(self) -> None:
        allowed = 0
        on_network: dict[str, list[_Send]] = defaultdict(list)
        account_of: dict[str, str] = {}
        for account, sends in self._network.items():
            for s in sends:
                on_network[s.job_id].append(s)
                account_of[s.job_id] = account
        for job_id in self._jobs.keys() | on_network.keys():
            job = self._jobs.get(job_id)
            recorded = job.sent if job is not None else []
            distinct = {(s.holder, s.token, s.transport_id) for s in recorded}
            network = on_network.get(job_id, [])
            if len(distinct) < 2 and len(network) < 2:
                continue
            if not any(self._in_window(s.at) for s in [*recorded, *network]):
                continue
            if job is not None and job.uncertain:
                allowed += 1
                continue
            sends = recorded if len(distinct) >= 2 else network
            self._flag(
                "duplicates",
                job.account if job is not None else account_of[job_id],
                f"job {job_id} was sent {max(len(distinct), len(network))} times with no"
                " DeliveryUncertain recorded",
                [s.event_id for s in sends],
                [ref(s) for s in sends],
                sends[0].chat,
            )
        for inbound_id, m in self._inbound.items():
            if len(m.turns) > 1 and self._in_window(m.at):
                self._flag(
                    "duplicates",
                    m.account,
                    f"MessageReceived {inbound_id} has {len(m.turns)} turns",
                    [eid for _, eid in m.turns],
                    [f"AGENT:{seq}" for seq, _ in m.turns],
                    m.chat,
                )
        self.report.checked["duplicates"] = {
            "jobs": len(self._jobs),
            "uncertain resends allowed": allowed,
        }

    def _order(self) -> None:
        chats: dict[tuple[str, str], list[_Send]] = defaultdict(list)
        for account, sends in self._sends.items():
            for s in sends:
                chats[(account, s.chat)].append(s)
        for (account, chat), sends in sorted(chats.items()):
            firsts: list[_Send] = []
            seen: set[str] = set()
            for s in sorted(sends, key=lambda s: (s.at, s.seq)):
                if s.job_id not in seen:  # a resend of an uncertain job repeats, not reorders
                    seen.add(s.job_id)
                    firsts.append(s)
            # The job's OUTBOUND sequence is its enqueue position; events written before
            # it was recorded fall back to the order of their turns' reply ids.
            self._ordered(account, chat, [(s.job_seq, 0, s) for s in firsts if s.job_seq])
            by_turn = []
            for s in firsts:
                job = self._jobs.get(s.job_id)
                if not s.job_seq and job is not None and job.order is not None:
                    by_turn.append((*job.order, s))
            self._ordered(account, chat, by_turn)
        for (account, chat), turns in sorted(self._chat_turns.items()):
            highest = 0
            prev = ""
            for inbound_seq, event_id, where in turns:
                if inbound_seq < highest:
                    self._flag(
                        "order",
                        account,
                        f"in chat {chat}, the turn for INBOUND:{inbound_seq} ({where}) came after"
                        f" the turn for the later INBOUND:{highest}",
                        [prev, event_id],
                        [where],
                        chat,
                    )
                else:
                    highest, prev = inbound_seq, event_id
        self.report.checked["order"] = {
            "chats with sends": len(chats),
            "chats with turns": len(self._chat_turns),
        }

    def _ordered(self, account: str, chat: str, sends: list[tuple[int, int, _Send]]) -> None:
        """Flag a send whose enqueue position is below one already sent in the chat."""
        last: tuple[int, int, _Send] | None = None
        for position in sends:
            s = position[2]
            if last is not None and position[:2] < last[:2] and self._in_window(s.at):
                before = last[2]
                self._flag(
                    "order",
                    account,
                    f"in chat {chat}, job {s.job_id} (enqueued at {fmt(position)}) was sent"
                    f" after job {before.job_id} (enqueued later, at {fmt(last)})",
                    [before.event_id, s.event_id],
                    [ref(before), ref(s)],
                    chat,
                )
            if last is None or position[:2] > last[:2]:
                last = position


def at_ref(stream: str, seq: int) -> str:
    """`STREAM:seq`, how a report points at a stored event."""
    return f"{stream}:{seq}"


def ref(s: _Send) -> str:
    return at_ref(s.stream, s.seq)


def fmt(position: tuple[int, int, _Send]) -> str:
    if position[2].job_seq:
        return f"OUTBOUND:{position[0]}"
    return f"AGENT:{position[0]} reply #{position[1] + 1}"
