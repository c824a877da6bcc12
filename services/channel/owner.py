"""Account ownership: hold the lease, attach the session, send (and relay) until it ends.

One `AccountOwner` per (worker, account). As a standby it retries acquisition on a
jittered timer, wakes at once when the lease board sees the key released, and aims its
next attempt at the moment a silent owner's key expires. As the owner it renews every
ttl/3, proves the lease before every send (egress), and stops sending on: shutdown,
loss of proof, the session's own end (logged out / replaced / banned / not paired: the
lease is parked, revision-checked so a park never lands on someone else's lease),
a fair-share rebalance, or an operator's handover request. A parked lease with an end
(`until`: a temporary ban) is cleared by a standby once it has passed -- revision-checked,
so of several standbys one clears it -- and recorded as `AccountResumed(actor="auto")`.
Along the way the owner reports its session on the status board (`sessions` bucket).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Callable

import msgspec
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg

from contracts import subjects
from contracts.codec import decode_any
from contracts.errors import ContractError
from contracts.events import (
    AccountResumed,
    Event,
    LeaseAcquired,
    LeaseLost,
    LeaseReleased,
    SendBudgetChanged,
    SendMessage,
    derived_id,
    utcnow,
)
from contracts.streams import ACCOUNTS, OUTBOUND
from services.channel.board import SessionBoard
from services.channel.budget import ActiveChats, SendBudget, ban_cut, fold
from services.channel.devices import DeviceRegistry
from services.channel.dispatch import EventDispatch
from services.channel.egress import Egress, egress_consumer_spec
from services.channel.fleet import Fleet, LeaseBoard
from services.channel.ingress import Ingress
from services.channel.ledger import SendLedger
from services.channel.port import (
    Connected,
    Disconnected,
    Incoming,
    SessionEnd,
    SessionEvent,
    Transport,
)
from services.channel.presence import presence_relay
from services.channel.watchdog import RecyclableSession, ZombieWatch
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop
from services.runtime.lease import Lease, LeaseValue, read_lease
from services.runtime.metrics import Labels, account_parked, instruments, labels
from services.runtime.reader import read
from services.runtime.settings import Delivery as DeliverySettings
from services.runtime.settings import SessionWatch

log = logging.getLogger(__name__)


def _park_reason(value: LeaseValue) -> str:
    """A parked lease's reason label: its state (needs_pairing, banned, ...), never the
    free-text reason (unbounded)."""
    return value.state or "parked"


def _handover(reason: str) -> Callable[[Labels], Labels]:
    def by(where: Labels) -> Labels:
        return labels(*where.items(), ("reason", reason))

    return by


# Release reasons that hand the account to another owner -> the handover label.
_HANDOVERS = {"operator handover": _handover("operator"), "rebalance": _handover("rebalance")}


async def _first(*events: asyncio.Event, timeout: float | None = None) -> None:
    """Wait until any of `events` is set, or `timeout` seconds pass."""
    waiters = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waiters, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waiters:
            w.cancel()


class HandoverReply(msgspec.Struct, frozen=True, kw_only=True):
    """What the owner answers to `svc accounts handover`."""

    account: str
    holder: str
    token: int
    released: bool


class ResumeRequest(msgspec.Struct, frozen=True, kw_only=True):
    """Asks a worker of the account to clear its parked lease (`svc.lease.resume.*`)."""

    actor: str
    reason: str = ""
    client: str = ""  # from where (an address), recorded with the resume
    via: str = "cli"


class ResumeReply(msgspec.Struct, frozen=True, kw_only=True):
    """What was parked (`parked`), or why nothing was cleared (`error`, one line)."""

    account: str
    parked: str = ""
    error: str = ""


class AccountOwner:
    """Competes for one account's lease; while held, the account's only sender."""

    def __init__(
        self,
        bus: Bus,
        transport: Transport,
        account: str,
        holder: str,
        *,
        lease_ttl: int,
        receive: bool,
        board: LeaseBoard | None = None,
        fleet: Fleet | None = None,
        delivery: DeliverySettings | None = None,
        watch: SessionWatch | None = None,
    ) -> None:
        self.bus = bus
        self.transport = transport
        self.account = account
        self.holder = holder
        self.receive = receive
        self.board = board
        self.fleet = fleet
        self.channel = transport.channel
        self._labels = labels(("channel", self.channel), ("account", account))
        self.lease = Lease(bus, self.channel, account, holder, lease_ttl)
        self.delivery = delivery or DeliverySettings()
        self.ledger = SendLedger(bus, account)
        # Chats that wrote lately (the send budget's replies vs first contact): kept across
        # ownerships, fed by this owner's ingress.
        self.active = ActiveChats(bus, self.channel, account, self.delivery.active_window)
        self.budget: SendBudget | None = None
        self.retry_interval = min(1.0, max(0.2, lease_ttl / 5))
        self.owning = asyncio.Event()
        self._cooldown_until = 0.0
        self._parked_logged = ""
        self._subject = subjects.accounts(self.channel, account)
        self.status = SessionBoard(bus, self.channel, account, holder)
        self.watch = watch or SessionWatch()
        self.zombie_watch: ZombieWatch | None = None  # the current session's, while owning

    async def run(self, stop: asyncio.Event) -> None:
        """Acquire, own, and on loss go back to standby, until `stop`. Meanwhile answer
        resume requests for the account (one worker of the queue group answers each)."""
        resumes = await self.bus.nc.subscribe(
            subjects.lease_resume(self.channel, self.account), queue="resume", cb=self._on_resume
        )
        try:
            await self._run(stop)
        finally:
            with contextlib.suppress(nats.errors.Error):
                await resumes.unsubscribe()

    async def _on_resume(self, msg: Msg) -> None:
        """Clear the parked lease for the operator named in the request (revision-checked,
        recorded as AccountResumed with that actor) and say what was parked."""
        try:
            request = msgspec.json.decode(msg.data, type=ResumeRequest)
        except msgspec.DecodeError as exc:
            reply = ResumeReply(account=self.account, error=f"bad resume request: {exc}")
        else:
            reply = await self._resume(request)
        if msg.reply:
            with contextlib.suppress(nats.errors.Error):
                await msg.respond(msgspec.json.encode(reply))

    async def _resume(self, request: ResumeRequest) -> ResumeReply:
        try:
            kv = await self.lease.bucket()
            found = await read_lease(kv, self.lease.key)
            if found is None:
                return ResumeReply(account=self.account, error="is not parked (nobody holds it)")
            value, revision = found
            if not value.parked:
                return ResumeReply(
                    account=self.account, error=f"is not parked: {value.holder} holds it"
                )
            await kv.delete(self.lease.key, last=revision)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, msgspec.DecodeError) as exc:
            return ResumeReply(
                account=self.account, error=f"changed while resuming ({exc!r}); retry"
            )
        log.warning(
            "parked account resumed by an operator",
            extra={"account": self.account, "parked": value.parked, "actor": request.actor},
        )
        await self._note(
            AccountResumed(
                channel=self.channel,
                account=self.account,
                actor=request.actor,
                reason=request.reason,
                client=request.client,
                via=request.via,
            ),
            "the resume",
        )
        return ResumeReply(account=self.account, parked=value.parked)

    async def _run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            if self.fleet is not None and not self.fleet.settled.is_set():
                await _first(stop, self.fleet.settled)  # first see who else is there
                continue
            if time.monotonic() < self._cooldown_until or (
                self.fleet is not None and not self.fleet.may_acquire()
            ):
                await _first(stop, timeout=self.retry_interval)
                continue
            try:
                acquired = await self.lease.try_acquire()
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.warning(
                    "lease acquire failed", extra={"account": self.account, "error": repr(exc)}
                )
                acquired = False
            if acquired:
                self._parked_logged = ""
                await self._own(stop)
            else:
                await self._standby(stop)

    async def _standby(self, stop: asyncio.Event) -> None:
        """Wait for the next acquisition attempt: a release, an expected expiry, a parked
        lease's end, or a timer."""
        delay = self.retry_interval * random.uniform(0.5, 1.0)
        parked = await self._parked()
        account_parked(self.channel, self.account, _park_reason(parked[0]) if parked else None)
        if parked is not None:
            value, revision = parked
            until = value.parked_until()
            if until is not None:
                left = (until - utcnow()).total_seconds()
                if left <= 0:
                    if await self._resume_expired(value, revision):
                        return  # compete at once
                    # Another standby cleared it (the board wakes us), or NATS trouble:
                    # the next look comes after the usual retry interval, not in a loop.
                else:
                    delay = left  # wake exactly when it ends: no busy loop, no over-sleep
            else:
                delay = 10.0  # `svc accounts resume` deletes the key: the board wakes us
            if value.parked != self._parked_logged:
                log.warning(
                    "account parked, resuming by itself at its end"
                    if until is not None
                    else "account parked, waiting for an operator",
                    extra={"account": self.account, "reason": value.parked, "until": value.until},
                )
                self._parked_logged = value.parked
        elif self.board is not None:
            expires = self.board.expires_in(self.lease.key, self.lease.ttl)
            if expires is not None:
                delay = min(delay, max(0.05, expires + 0.05))
        wake = [stop] if self.board is None else [stop, self.board.changed(self.lease.key)]
        await _first(*wake, timeout=delay)

    async def _parked(self) -> tuple[LeaseValue, int] | None:
        """The parked marker on the account's lease and its revision, or None."""
        try:
            found = await read_lease(await self.lease.bucket(), self.lease.key)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, msgspec.DecodeError):
            return None
        return found if found is not None and found[0].parked else None

    async def _resume_expired(self, value: LeaseValue, revision: int) -> bool:
        """Clear a parked marker whose end has passed; only the revision we read, so of
        several standbys exactly one clears it (the others just compete for the lease)."""
        try:
            await (await self.lease.bucket()).delete(self.lease.key, last=revision)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.info(
                "parked lease not cleared (changed meanwhile)",
                extra={"account": self.account, "error": repr(exc)},
            )
            return False
        reason = "ban expired" if value.state == "banned" else f"{value.state or 'park'} expired"
        log.warning(
            "parked account resumed: its end passed",
            extra={"account": self.account, "parked": value.parked, "until": value.until},
        )
        await self._note(
            AccountResumed(channel=self.channel, account=self.account, actor="auto", reason=reason),
            "the resume",
        )
        return True

    async def _own(self, stop: asyncio.Event) -> None:
        token = self.lease.token
        log.info(
            "lease acquired", extra={"account": self.account, "holder": self.holder, "token": token}
        )
        handover = asyncio.Event()
        handover_replies: list[str] = []

        async def on_handover(msg: Msg) -> None:
            if msg.reply:
                handover_replies.append(msg.reply)
            handover.set()

        # Listening before the acquisition is recorded (and counted): whoever sees it may
        # ask for a handover at once, and must not be told that nobody holds the account.
        sub = await self.bus.nc.subscribe(
            subjects.lease_handover(self.channel, self.account), cb=on_handover
        )
        ingress = Ingress(
            self.bus,
            self.channel,
            self.account,
            self.holder,
            self.ledger,
            on_connection=self._connection,
        )
        lost = asyncio.Event()
        done = asyncio.Event()  # stop sending
        end: SessionEnd | None = None

        async def received(event: SessionEvent) -> None:
            if isinstance(event, Incoming):
                self.active.saw(event.chat)  # a reply to this chat is not a first contact
            await ingress(event)

        try:
            await self._record(LeaseAcquired, token)
            self.status.token = token
            self.status.device = await self._device()
            self.status.connected_at = None
            self.status.post("connecting")
            shed = self.fleet.owning(self.account) if self.fleet else asyncio.Event()
            budget = self.budget = await self._send_budget()
            spec = egress_consumer_spec(self.channel, self.account, self.delivery)
            # A new owner starts from the first unacked job at once, instead of waiting for
            # the ack deadline of a job the previous owner held when it died (work queue:
            # everything still stored is unacked, so nothing is skipped).
            delivered = 0
            with contextlib.suppress(nats.js.errors.NotFoundError):
                previous = await self.bus.js.consumer_info(OUTBOUND.name, spec.durable)
                delivered = previous.delivered.stream_seq if previous.delivered else 0
            # Durable before the consumer goes: jobs up to here get their records checked.
            in_flight_upto = await self.ledger.raise_boundary(delivered)
            with contextlib.suppress(nats.js.errors.NotFoundError):
                await self.bus.js.delete_consumer(OUTBOUND.name, spec.durable)
            async with (
                EventDispatch(received, name=f"{self.channel}.{self.account}") as events,
                RecyclableSession(
                    self.transport, self.account, events, receive=self.receive
                ) as session,
                presence_relay(self.bus, self.channel, self.account, session),
            ):
                egress = Egress(
                    self.bus,
                    session,
                    self.lease,
                    lost,
                    settings=self.delivery,
                    ledger=self.ledger,
                    budget=budget,
                    stop=done,
                    in_flight_upto=in_flight_upto,
                )
                loop = ConsumerLoop(
                    self.bus, spec, SendMessage, egress.handle, on_dead_letter=egress.dead_lettered
                )
                self.owning.set()
                sending = asyncio.create_task(loop.run(done), name=f"egress-{self.account}")
                renewing = asyncio.create_task(
                    self._renew(lost, done), name=f"renew-{self.account}"
                )
                ending = asyncio.create_task(session.ended(), name=f"session-{self.account}")
                restoring = asyncio.create_task(
                    budget.restore(done, self._record_budget), name=f"budget-{self.account}"
                )
                self.zombie_watch = ZombieWatch(
                    self.bus,
                    self.channel,
                    self.account,
                    self.holder,
                    self.status,
                    after=self.watch.zombie_after,
                )
                watching = asyncio.create_task(
                    self.zombie_watch.run(session, done), name=f"zombie-watch-{self.account}"
                )
                ended = asyncio.create_task(_first(stop, lost, shed, handover))
                await asyncio.wait([ended, ending, sending], return_when=asyncio.FIRST_COMPLETED)
                ended.cancel()
                if ending.done() and not ending.cancelled() and ending.exception() is None:
                    end = ending.result()
                ending.cancel()
                done.set()  # stop taking jobs; the in-flight send finishes
                await asyncio.gather(sending, restoring, watching, return_exceptions=True)
                # Not cancelled: a renewal cut off mid-flight could land with a revision we
                # never learn, and the revision-checked release would then be refused.
                await renewing
                self.owning.clear()
        finally:
            with contextlib.suppress(nats.errors.Error):
                await sub.unsubscribe()
            if self.fleet is not None:
                self.fleet.released(self.account)
        await self._finish(token, lost, end, shed, handover, handover_replies, gone=loop.gone)

    async def _finish(
        self,
        token: int,
        lost: asyncio.Event,
        end: SessionEnd | None,
        shed: asyncio.Event,
        handover: asyncio.Event,
        replies: list[str],
        *,
        gone: bool = False,
    ) -> None:
        if lost.is_set() or not self.lease.valid():
            reason = self._lost_reason or "lease deadline passed before a renewal succeeded"
            self.lease.forget()
            log.warning(
                "lease lost", extra={"account": self.account, "token": token, "reason": reason}
            )
            await self._record(LeaseLost, token, reason)
            return
        if end is not None:
            try:
                parked = await self.lease.park(end.reason, state=end.state, until=end.until)
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.warning(
                    "could not park the account",
                    extra={"account": self.account, "error": repr(exc)},
                )
                parked = False
            if not parked:
                # The key is no longer our lease (a failover took it, or it expired): nothing
                # was written over it. Ours is lost, whatever the session said.
                reason = f"lease gone before the session end could park it ({end.reason})"
                log.warning(
                    "lease lost", extra={"account": self.account, "token": token, "reason": reason}
                )
                await self._record(LeaseLost, token, reason)
                return
            await self.status.write(end.state, end.reason, until=end.until)
            account_parked(self.channel, self.account, end.state or "parked")
            if end.state == "banned":
                await self._cut_budget(end)
            log.error(
                "session ended, account parked",
                extra={
                    "account": self.account,
                    "state": end.state,
                    "reason": end.reason,
                    "until": end.until.isoformat() if end.until else "",
                },
            )
            return
        reason = (
            "operator handover"
            if handover.is_set()
            else "rebalance"
            if shed.is_set()
            else "egress consumer deleted"
            if gone
            else "shutdown"
        )
        # Before the release: once released, the next owner's `connecting` must win.
        await self.status.write("standby", reason)
        released = await self.lease.release()
        if released:
            log.info(
                "lease released", extra={"account": self.account, "token": token, "reason": reason}
            )
            await self._record(LeaseReleased, token, reason)
        if reason not in ("shutdown", "egress consumer deleted"):
            # Step aside long enough for a standby to take it; compete again afterwards.
            self._cooldown_until = time.monotonic() + 3 * self.retry_interval
        reply = msgspec.json.encode(
            HandoverReply(account=self.account, holder=self.holder, token=token, released=released)
        )
        for inbox in replies:
            with contextlib.suppress(nats.errors.Error):
                await self.bus.nc.publish(inbox, reply)

    _lost_reason = ""

    async def _send_budget(self) -> SendBudget:
        """The account's send budget at the level its ACCOUNTS events leave (a recent ban
        cut it, whoever owned the account then)."""
        level = None
        if self.delivery.limit_for(self.account) is not None or (
            self.delivery.first_contact != "any"
        ):
            events = []
            try:
                async for stored in read(self.bus, ACCOUNTS.name, subject=self._subject):
                    with contextlib.suppress(msgspec.DecodeError, ContractError):
                        events.append(decode_any(stored.data))
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                # Sending on the level of what was read beats not sending at all: a ban
                # is rare, and its cut was also recorded in what did come back.
                log.warning(
                    "could not read the account's budget history",
                    extra={"account": self.account, "error": repr(exc)},
                )
            level = fold(events, self.delivery.restore_step)
        budget = SendBudget(
            self.delivery,
            self.account,
            self.active,
            level=level,
            on_change=lambda: self.status.post_budget(budget.status()),
        ).bind(self.channel, self.holder)
        self.status.budget = budget.status()
        return budget

    async def _cut_budget(self, end: SessionEnd) -> None:
        """A ban (or an account-level send error the transport reports as one) cuts the
        budget: recorded, so the next owner, whoever it is, starts cut."""
        budget = self.budget
        if budget is None or budget.limits() == (None, None):
            return  # no budget to cut (the sim's default)
        budget.set_level(ban_cut(budget.level, end.reason, end.until, self.delivery.restore_step))
        log.warning(
            "send budget cut",
            extra={"account": self.account, "reason": end.reason, "factor": budget.level.factor},
        )
        await self._record_budget(budget.changed_event_for_record())

    async def _record_budget(self, event: SendBudgetChanged) -> None:
        await self._note(event, "the send budget")

    def _connection(self, event: Connected | Disconnected) -> None:
        """The transport says the session is up or down: onto the status board."""
        if isinstance(event, Connected):
            self.status.post("connected")
        else:
            self.status.post("disconnected", event.reason)

    async def _device(self) -> str:
        """The account's paired device (for the status board), or "" when unknown."""
        try:
            record = await DeviceRegistry(self.bus, self.channel).get(self.account)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError, msgspec.DecodeError):
            return ""
        return record.device_id if record else ""

    async def _renew(self, lost: asyncio.Event, done: asyncio.Event) -> None:
        """Renew every ttl/3 until `done`; on failure retry fast until the deadline passes."""
        self._lost_reason = ""
        interval = self.lease.ttl / 3
        while not done.is_set() and not lost.is_set():
            try:
                ok = await self.lease.renew()
                if not ok:
                    self._lost_reason = "renewal refused: the revision moved (someone else wrote)"
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                log.warning(
                    "lease renew failed", extra={"account": self.account, "error": repr(exc)}
                )
                ok = self.lease.valid()
                if ok:
                    await _first(done, timeout=min(0.5, max(0.05, self.lease.remaining() / 4)))
                    continue
                self._lost_reason = f"could not renew before the deadline: {exc!r}"
            if not ok or not self.lease.valid():
                self._lost_reason = self._lost_reason or "lease deadline passed (process paused?)"
                lost.set()
                return
            await _first(done, lost, timeout=interval)

    async def _record(
        self, kind: type[LeaseAcquired | LeaseLost | LeaseReleased], token: int, reason: str = ""
    ) -> None:
        """Publish a lease event; its id derives from (kind, account, token): no duplicates."""
        fields = {"account": self.account, "holder": self.holder, "token": token}
        if kind is not LeaseAcquired:
            fields["reason"] = reason
        self._count_lease(kind, reason)
        event = kind(id=derived_id(kind.__name__, self.account, str(token)), **fields)  # type: ignore[arg-type]
        await self._note(event, "lease event")

    def _count_lease(
        self, kind: type[LeaseAcquired | LeaseLost | LeaseReleased], reason: str
    ) -> None:
        """The lease metrics (the lease, not its best-effort event, is the fact)."""
        metrics, where = instruments(), self._labels
        if kind is LeaseAcquired:
            metrics.lease_acquisitions.add(1, where)
            account_parked(self.channel, self.account, None)
        elif kind is LeaseLost:
            metrics.lease_losses.add(1, where)
        elif reason in _HANDOVERS:  # released for another owner, not at shutdown
            metrics.lease_handovers.add(1, _HANDOVERS[reason](where))

    async def _note(self, event: Event, what: str) -> None:
        """Record `event` on the account's ACCOUNTS subject, best effort: the lease and the
        budget are the truth, the event is their record; a failed publish is logged."""
        try:
            await self.bus.publish(self._subject, event)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.warning(
                f"could not record {what}", extra={"account": self.account, "error": repr(exc)}
            )
