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
- lost: a `MessageReceived` with no turn, refusal (`MessageRefused`) or dead letter,
  acked by the core or older than the grace period; a job (from a turn's reply ids, a
  requeue, or any DELIVERY event) with no `MessageSent` / `DeliveryDeadLettered` that is
  no longer queued.
- duplicates: a job sent twice (two different `MessageSent` records, or two sends on the
  network) without a recorded `DeliveryUncertain`; two outcomes (turns or refusals) for
  one inbound message.
- order: per chat, sends whose enqueue positions go backwards; turns whose inbound
  messages go backwards.
- replay (when asked): the plugin projection (or the access view) rebuilt twice up to the
  same sequence differs.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Never

from contracts.errors import ContractError
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
    MessageRefused,
    MessageSent,
    PairingFinished,
    PairingStarted,
    SendBudgetChanged,
    SendMessage,
    SessionBanned,
    SessionLoggedOut,
    SessionZombie,
)
from contracts.subjects import parse_chat_subject

RULES = ("split-brain", "lost", "duplicates", "order", "replay")


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
    horizons: dict[str, datetime] = field(default_factory=dict)  # streams missing their start
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


@dataclass(slots=True)
class _Send:
    seq: int
    at: datetime  # when the send began (sent_at), else when it was recorded
    event_id: str
    holder: str
    token: int
    job_id: str
    job_seq: int
    chat: str
    stream: str = "DELIVERY"


@dataclass(slots=True)
class _Job:
    account: str
    chat: str
    at: datetime  # when it is first known to exist (enqueue, requeue, or first event)
    order: tuple[int, int] | None = None  # (turn's AGENT seq, index in reply_ids)
    outcome: str = ""  # sent | dead-lettered | skipped
    pending: bool = False
    # The first send: DELIVERY seq, and a hash of (holder, token, transport message id) to
    # tell a second, different send from the same fact recorded twice.
    first_seq: int = 0
    first_sig: int = 0
    refs: list[str] | None = None


@dataclass(slots=True)
class _Inbound:
    seq: int
    at: datetime
    account: str
    chat: str
    turn: str = ""  # the first turn's event id
    turn_seq: int = 0


@dataclass(slots=True)
class _Token:
    """An account's sends under one token: who, and the first and last of them."""

    holder: str
    first: _Send
    last: _Send


@dataclass(slots=True)
class _Chat:
    """The last send of a chat (by when it began), for the order rule."""

    last: _Send | None = None
    last_position: tuple[int, int] = (0, 0)
    turn_inbound_seq: int = 0
    turn_id: str = ""


class Auditor:
    """Feed events (in the services layer's read order), then `finish`.

    Memory: one small record per inbound message and per job, one per (account, token)
    and per chat; nothing per event beyond that.
    """

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
        self._names: dict[str, str] = {}  # one string object per account/chat/holder
        self._inbound: dict[str, _Inbound] = {}
        self._dead_inbound: set[int] = set()
        self._inbound_seq_done = 0  # the core consumer's ack floor (0: no core consumer)
        self._jobs: dict[str, dict[str, _Job]] = defaultdict(dict)  # account -> job id -> job
        self._letters: dict[int, tuple[str, str]] = {}  # OUTBOUND dead letter -> account, chat
        self._uncertain: set[str] = set()
        self._twice: list[tuple[str, _Send, _Send]] = []  # (job, first, second) sends
        self._granted: dict[tuple[str, int], tuple[str, datetime, str]] = {}
        self._grants: dict[str, list[tuple[int, datetime, str, str]]] = defaultdict(list)
        self._released: dict[tuple[str, int], tuple[datetime, str]] = {}
        self._tokens: dict[str, dict[int, _Token]] = defaultdict(dict)  # DELIVERY, per account
        self._network: dict[str, _Send] = {}  # SIM_OUT: the highest-token send per account
        self._network_owner: dict[tuple[str, int], _Send] = {}
        # SIM_OUT: account -> job id -> the network's first acceptance (seq, holder, token)
        self._network_jobs: dict[str, dict[str, tuple[int, str, int]]] = defaultdict(dict)
        self._chats: dict[tuple[str, str], _Chat] = {}

    def _name(self, text: str) -> str:
        return self._names.setdefault(text, text)

    # --- feeding -------------------------------------------------------------------------

    def _in_window(self, at: datetime) -> bool:
        return (self.since is None or at >= self.since) and (self.until is None or at <= self.until)

    def _count(self, stream: str) -> None:
        self.report.counts[stream] = self.report.counts.get(stream, 0) + 1

    def skipped(self, stream: str) -> None:
        """An event that did not decode (or of a kind that does not belong there)."""
        self._count(stream)
        self.report.skipped[stream] = self.report.skipped.get(stream, 0) + 1

    def _foreign(self, stream: str, event: Never) -> None:
        """An event of a kind `stream` does not hold, handed in anyway: skipped, like one
        that did not decode. `event` is typed Never, so a member added to the stream's
        union without a case of its own is a type error here, not a silent skip."""
        self.report.skipped[stream] = self.report.skipped.get(stream, 0) + 1

    def account_event(self, seq: int, at: datetime, event: AccountEvent) -> None:
        """ACCOUNTS: the lease timeline and the grants sends are checked against."""
        self._count("ACCOUNTS")
        match event:
            case LeaseAcquired():
                self._granted[(event.account, event.token)] = (event.holder, event.at, event.id)
                self._grants[event.account].append((event.token, event.at, event.holder, event.id))
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
            case SessionZombie():
                what = "recycled" if event.recycled else "reported only (recycle cap)"
                reason = f"nothing heard for {event.silent_for:.0f} s, {what}"
                entry = LeaseEntry(event.at, "zombie", event.holder, event.token, reason)
            case AccountRegistered():
                entry = LeaseEntry(event.at, "registered", "", 0, event.transport)
            case SendBudgetChanged():
                entry = LeaseEntry(event.at, "budget", event.holder, 0, event.reason)
            case PairingStarted():
                how = "by pairing code" if event.by_code else "by QR"
                entry = LeaseEntry(event.at, "pairing", event.actor, 0, f"{how} via {event.via}")
            case PairingFinished():
                what = f"paired as {event.device}" if event.outcome == "paired" else event.reason
                entry = LeaseEntry(event.at, f"pairing-{event.outcome}", event.actor, 0, what)
            case _:
                self._foreign("ACCOUNTS", event)
                return
        if self._in_window(event.at):
            self.report.leases.setdefault(event.account, []).append(entry)

    def inbound(self, seq: int, at: datetime, event: MessageReceived) -> None:
        """INBOUND: every message must end in a turn."""
        self._count("INBOUND")
        self._inbound[event.id] = _Inbound(
            seq, at, self._name(event.account), self._name(event.chat)
        )

    def core_progress(self, ack_floor: int) -> None:
        """Every INBOUND message up to `ack_floor` was acked by the core."""
        self._inbound_seq_done = ack_floor

    def replayed(self, stream: str, upto: int, rows: dict[str, int], differ: list[str]) -> None:
        """A projection of `stream` rebuilt twice up to `upto`: `differ` lists the tables
        whose rows were not the same both times (invariant 5)."""
        checked = self.report.checked.setdefault("replay", {})
        checked.update({f"{stream} events": upto, **rows})
        if differ:
            self._flag(
                "replay",
                "",
                f"rebuilding the {stream} projection twice up to sequence {upto} gave"
                f" different rows in: {', '.join(differ)}",
                [],
                [at_ref(stream, upto)],
            )

    def history_starts(self, stream: str, first: datetime) -> None:
        """`stream` no longer holds its beginning (limits, purge): its oldest message is
        from `first`. What only older events could vouch for is not judged."""
        self.report.horizons[stream] = first

    def turn(self, seq: int, at: datetime, event: AgentEvent) -> None:
        """AGENT: a turn (or a refusal) settles its inbound and enqueues its reply jobs, in
        order. A message has one outcome: a second one, of either kind, is a duplicate."""
        self._count("AGENT")
        refused = isinstance(event, MessageRefused)
        found = self._inbound.get(event.inbound_id)
        if found is not None:
            if found.turn:
                if self._in_window(found.at):
                    second = "refusal" if refused else "turn"
                    self._flag(
                        "duplicates",
                        found.account,
                        f"MessageReceived {event.inbound_id} has a second outcome (a {second})",
                        [found.turn, event.id],
                        [at_ref("AGENT", found.turn_seq), at_ref("AGENT", seq)],
                        found.chat,
                    )
            else:
                found.turn, found.turn_seq = event.id, seq
                self._turn_order(found, seq, event.id)
        if isinstance(event, MessageRefused):
            return
        for index, job_id in enumerate(event.reply_ids):
            job = self._job(job_id, event.account, event.chat, at)
            if job.order is None:
                job.order = (seq, index)

    def _turn_order(self, inbound: _Inbound, seq: int, turn_id: str) -> None:
        chat = self._chat(inbound.account, inbound.chat)
        if inbound.seq < chat.turn_inbound_seq:
            if self._in_window(inbound.at):
                self._flag(
                    "order",
                    inbound.account,
                    f"in chat {inbound.chat}, the turn for INBOUND:{inbound.seq}"
                    f" (AGENT:{seq}) came after the turn for the later"
                    f" INBOUND:{chat.turn_inbound_seq}",
                    [chat.turn_id, turn_id],
                    [at_ref("AGENT", seq)],
                    inbound.chat,
                )
        else:
            chat.turn_inbound_seq, chat.turn_id = inbound.seq, turn_id

    def _chat(self, account: str, chat: str) -> _Chat:
        key = (account, chat)
        found = self._chats.get(key)
        if found is None:
            found = self._chats[key] = _Chat()
        return found

    def dead_letter(self, seq: int, at: datetime, event: DeadLetterEvent) -> None:
        """DEADLETTER: dead-lettered inbound messages and jobs; requeued jobs."""
        self._count("DEADLETTER")
        match event:
            case DeadLettered():
                kind = event.source_stream or "?"
                self.report.dead_letters[kind] = self.report.dead_letters.get(kind, 0) + 1
                if event.source_stream == "INBOUND":
                    self._dead_inbound.add(event.source_seq)
                elif event.source_stream == "OUTBOUND":
                    with contextlib.suppress(ContractError):
                        where = parse_chat_subject(event.source_subject)
                        self._letters[seq] = (where.account, where.chat)
            case DeadLetterRequeued():
                self.report.dead_letters["requeued"] = (
                    self.report.dead_letters.get("requeued", 0) + 1
                )
                account, chat = self._letters.get(event.letter_seq, ("", ""))
                if event.new_job_id and (self.account is None or account == self.account):
                    self._job(event.new_job_id, account, chat, at)
            case DeadLetterDropped():
                self.report.dead_letters["dropped"] = self.report.dead_letters.get("dropped", 0) + 1
            case _:
                self._foreign("DEADLETTER", event)

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
        match event:
            case MessageSent():
                job = self._job(event.job_id, event.account, event.chat, at)
                job.outcome = job.outcome or "sent"
                self._sent(seq, job, event)
            case DeliveryDeadLettered():
                job = self._job(event.job_id, event.account, event.chat, at)
                job.outcome = job.outcome or "dead-lettered"
            case DeliveryUncertain():
                job = self._job(event.job_id, event.account, event.chat, at)
                self._uncertain.add(event.job_id)
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
                            "ref": at_ref("DELIVERY", seq),
                        }
                    )
            case DeliveryFailed():
                job = self._job(event.job_id, event.account, event.chat, at)
                if job.refs is None:
                    job.refs = []
                job.refs.append(at_ref("DELIVERY", seq))
            case DeliveryReceipt():
                pass
            case _:
                self._foreign("DELIVERY", event)

    def _sent(self, seq: int, job: _Job, event: MessageSent) -> None:
        send = _Send(
            seq,
            event.sent_at or event.at,
            event.id,
            self._name(event.holder),
            event.lease_token,
            event.job_id,
            event.job_seq,
            job.chat,
        )
        signature = hash((send.holder, send.token, event.transport_message_id))
        if not job.first_seq:
            job.first_seq, job.first_sig = seq, signature
            self._order(job, send)
        elif job.first_sig != signature:
            first = _Send(job.first_seq, send.at, "", "", 0, send.job_id, 0, job.chat)
            self._twice.append((job.account, first, send))
        if not self._in_window(send.at):
            self._track_token(job.account, send)
            return
        self._fencing(job.account, send)
        self._against_grants(job.account, send)

    def network_send(
        self, seq: int, at: datetime, account: str, chat: str, job_id: str, holder: str, token: int
    ) -> None:
        """SIM_OUT: what the simulated network accepted, in the order it accepted it."""
        self._count("SIM_OUT")
        holder = self._name(holder)
        send = _Send(seq, at, f"SIM_OUT:{seq}", holder, token, job_id, 0, chat, "SIM_OUT")
        first = self._network_jobs[account].get(job_id)
        if first is None:
            self._network_jobs[account][job_id] = (seq, holder, token)
        else:
            was = _Send(first[0], at, f"SIM_OUT:{first[0]}", first[1], first[2], job_id, 0, chat)
            was.stream = "SIM_OUT"
            self._twice.append((account, was, send))
        highest = self._network.get(account)
        owner = self._network_owner.setdefault((account, token), send)
        if self._in_window(at):
            if owner.holder != holder:
                self._two_holders(account, owner, send, "SIM_OUT")
            if highest is not None and token < highest.token:
                self._regression(account, highest, send, "SIM_OUT")
        if highest is None or token > highest.token:
            self._network[account] = send

    def _job(self, job_id: str, account: str, chat: str, at: datetime) -> _Job:
        jobs = self._jobs[account]
        job = jobs.get(job_id)
        if job is None:
            job = jobs[job_id] = _Job(self._name(account), self._name(chat), at)
        return job

    def _all_jobs(self) -> Iterator[tuple[str, _Job]]:
        for jobs in self._jobs.values():
            yield from jobs.items()

    # --- split-brain ---------------------------------------------------------------------

    def _track_token(self, account: str, send: _Send) -> _Token:
        tokens = self._tokens[account]
        known = tokens.get(send.token)
        if known is None:
            known = tokens[send.token] = _Token(send.holder, send, send)
        elif send.at < known.first.at:
            known.first = send
        elif send.at >= known.last.at:
            known.last = send
        return known

    def _fencing(self, account: str, send: _Send) -> None:
        """Each token has one holder; no send under a token began after a send under a
        higher one began (nor before a send under a lower one ended)."""
        tokens = self._tokens[account]
        before = tokens.get(send.token)
        if before is not None and before.holder != send.holder:
            self._two_holders(account, before.first, send, "DELIVERY")
        for token, seen in tokens.items():
            if token > send.token and seen.first.at < send.at:
                self._regression(account, seen.first, send, "DELIVERY")
                break
            if token < send.token and seen.last.at > send.at:
                self._regression(account, send, seen.last, "DELIVERY")
                break
        self._track_token(account, send)

    def _two_holders(self, account: str, first: _Send, send: _Send, source: str) -> None:
        self._flag(
            "split-brain",
            account,
            f"token {send.token} used by two holders: {first.holder} and {send.holder} ({source})",
            [first.event_id, send.event_id],
            [ref(first), ref(send)],
            send.chat,
        )

    def _regression(self, account: str, higher: _Send, lower: _Send, source: str) -> None:
        self._flag(
            "split-brain",
            account,
            f"{lower.holder} sent job {lower.job_id} under token {lower.token} after"
            f" {higher.holder} had sent under token {higher.token} ({source})",
            [higher.event_id, lower.event_id],
            [ref(higher), ref(lower)],
            lower.chat,
        )

    def _against_grants(self, account: str, s: _Send) -> None:
        """The token was granted to this holder, and the send began while it was the
        newest grant and before the holder released it."""
        if not self._granted:
            return  # no lease history to check against (e.g. ACCOUNTS was purged)
        grant = self._granted.get((account, s.token))
        if grant is None and "ACCOUNTS" in self.report.horizons:
            oldest = min((t for t, *_ in self._grants[account]), default=None)
            if oldest is None or s.token < oldest:
                return  # granted before the oldest lease event ACCOUNTS still holds
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
            return
        newer = min(
            ((t, at, h, e) for t, at, h, e in self._grants[account] if t > s.token),
            default=None,
        )
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

    # --- order ---------------------------------------------------------------------------

    def _order(self, job: _Job, send: _Send) -> None:
        """A chat's first sends, by when they began, follow enqueue order: the job's
        OUTBOUND sequence, or (for events written before it was recorded) its turn's
        reply order. A late record (sent earlier, recorded later) is checked against the
        chat's latest send only."""
        if send.job_seq:
            position = (send.job_seq, 0)
        elif job.order is not None:
            position = job.order
        else:
            return
        chat = self._chat(job.account, job.chat)
        last = chat.last
        if last is None:
            chat.last, chat.last_position = send, position
            return
        if bool(last.job_seq) != bool(send.job_seq):
            chat.last, chat.last_position = send, position  # two kinds of position: restart
            return
        if send.at >= last.at:
            if position < chat.last_position and self._in_window(send.at):
                self._reordered(job, (last, chat.last_position), (send, position))
            else:
                chat.last, chat.last_position = send, position
        elif position > chat.last_position and self._in_window(send.at):
            self._reordered(job, (send, position), (last, chat.last_position))

    def _reordered(
        self,
        job: _Job,
        first: tuple[_Send, tuple[int, int]],
        then: tuple[_Send, tuple[int, int]],
    ) -> None:
        """`then` was sent after `first`, though enqueued before it."""
        (early, early_at), (late, late_at) = first, then
        self._flag(
            "order",
            job.account,
            f"in chat {job.chat}, job {late.job_id} (enqueued at {fmt(late_at, late)}) was"
            f" sent after job {early.job_id} (enqueued later, at {fmt(early_at, early)})",
            [early.event_id, late.event_id],
            [ref(early), ref(late)],
            job.chat,
        )

    # --- judging -------------------------------------------------------------------------

    def finish(self, now: datetime) -> Report:
        """Judge what needs everything fed; return the report."""
        self._lost(now)
        self._duplicates()
        accounts = self._tokens.keys() | self._network.keys()
        self.report.checked["split-brain"] = {
            "accounts": len(accounts),
            "sends": self._sent_jobs(),
            "leases granted": len(self._granted),
        }
        self.report.checked["order"] = {"chats": len(self._chats)}
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

    def _sent_jobs(self) -> int:
        """Jobs sent at least once. One send is usually seen twice, as the sender's
        `MessageSent` and as the network's own record (SIM_OUT): count the job once."""
        accounts = self._jobs.keys() | self._network_jobs.keys()
        return sum(
            len(
                {j for j, job in self._jobs.get(a, {}).items() if job.first_seq}
                | self._network_jobs.get(a, {}).keys()
            )
            for a in accounts
        )

    def _lost(self, now: datetime) -> None:
        cutoff = now - self.grace
        floor = self._inbound_seq_done
        # A turn older than what AGENT still holds, an outcome older than what DELIVERY
        # holds, cannot be seen: what only they could vouch for is not judged.
        turns_from = self.report.horizons.get("AGENT")
        outcomes_from = self.report.horizons.get("DELIVERY")
        for inbound_id, m in self._inbound.items():
            if not self._in_window(m.at) or m.turn or m.seq in self._dead_inbound:
                continue
            if turns_from is not None and m.at < turns_from:
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
                f"MessageReceived {inbound_id} (INBOUND:{m.seq}) has no TurnCompleted,"
                f" TurnFailed or MessageRefused; {why}",
                [inbound_id],
                [f"INBOUND:{m.seq}"],
                m.chat,
            )
        for job_id, job in self._all_jobs():
            if job.outcome or job.pending or not self._in_window(job.at) or job.at > cutoff:
                continue
            if outcomes_from is not None and job.at < outcomes_from:
                continue
            self._flag(
                "lost",
                job.account,
                f"job {job_id} has no MessageSent or DeliveryDeadLettered and is no longer"
                " queued in OUTBOUND",
                [job_id],
                job.refs or [],
                job.chat,
            )
        self.report.checked["lost"] = {
            "inbound messages": sum(1 for m in self._inbound.values() if self._in_window(m.at)),
            "jobs": sum(1 for _, j in self._all_jobs() if self._in_window(j.at)),
            "pending jobs": self.report.pending_jobs,
        }

    def _duplicates(self) -> None:
        allowed = 0
        for account, first, again in self._twice:
            if not (self._in_window(first.at) or self._in_window(again.at)):
                continue
            if again.job_id in self._uncertain:
                allowed += 1
                continue
            before = f"first by {first.holder}, token {first.token}" if first.holder else ""
            self._flag(
                "duplicates",
                account,
                f"job {again.job_id} was sent again (by {again.holder}, token {again.token};"
                f" {before or 'first at ' + ref(first)}) with no DeliveryUncertain recorded",
                [i for i in (first.event_id, again.event_id) if i],
                [ref(first), ref(again)],
                again.chat,
            )
        self.report.checked["duplicates"] = {
            "jobs": sum(len(jobs) for jobs in self._jobs.values()),
            "uncertain resends allowed": allowed,
        }


def at_ref(stream: str, seq: int) -> str:
    """`STREAM:seq`, how a report points at a stored event."""
    return f"{stream}:{seq}"


def ref(s: _Send) -> str:
    return at_ref(s.stream, s.seq)


def fmt(position: tuple[int, int], send: _Send) -> str:
    if send.job_seq:
        return f"OUTBOUND:{position[0]}"
    return f"AGENT:{position[0]} reply #{position[1] + 1}"
