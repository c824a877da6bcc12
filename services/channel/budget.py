"""The ban-aware send budget of one account (ADR 0024).

What a WhatsApp number may send without being banned, as the egress spends it per job:

- **Replies** (the chat had an inbound message within SVC_ACTIVE_WINDOW) spend the reply
  budget (WHATSAPP_RATE_LIMIT): a token bucket served first come, first served.
- **First contact** (no inbound within the window) is refused -- a permanent error, so
  the job is dead-lettered with one line saying how to allow it -- under
  WHATSAPP_FIRST_CONTACT_RATE=off, or spends that (much tighter) budget on top of the reply
  budget under a rate. `any` makes no difference (the sim's default). Whether a chat is
  active is known from the owner's ingress (`saw`), else from a last-by-subject get on the
  chat's INBOUND subject, cached.
- **The same text** to more than SVC_SAME_TEXT_LIMIT chats within SVC_SAME_TEXT_WINDOW
  waits until the oldest of those sends leaves the window (it waits, never drops).
- **A ban** (TemporaryBan, or an account-level send error the transport reports as one)
  cuts every budget to a quarter; after the ban it doubles every WHATSAPP_BUDGET_RESTORE
  seconds until it is as configured. Each change is a `SendBudgetChanged` on ACCOUNTS, and
  the level is folded from the account's ACCOUNTS events on acquisition (`fold`), so a new
  owner starts cut when the account was recently banned.

Waiting never spins: each wait sleeps exactly until the next token (or the oldest
same-text send leaving the window). Per-chat order holds because the egress handles one
job per chat at a time; the buckets are FIFO across chats.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import nats.js.errors

from contracts import subjects
from contracts.codec import decode
from contracts.events import (
    MessageReceived,
    SendBudgetChanged,
    SendMessage,
    SessionBanned,
    derived_id,
    utcnow,
)
from contracts.payloads import SendBudgetStatus
from contracts.streams import INBOUND
from services.channel.ratelimit import TokenBucket
from services.runtime.bus import Bus
from services.runtime.errors import ServiceError
from services.runtime.settings import Delivery, RateLimit

# A ban cuts every budget to this fraction of what is configured; each restore step
# doubles it, so a cut takes two steps to undo.
BAN_CUT = 0.25
# A chat looked up with no recent inbound is asked again after this long at most (a
# flood of proactive sends to one chat costs one get, and a new inbound is seen soon).
NEGATIVE_TTL = 2.0
MAX_CACHED_CHATS = 20_000


class FirstContactRefusedError(ServiceError):
    """A send to a chat that has not written recently, with first contact off."""


def describe(limit: RateLimit | None) -> str:
    """A budget as `svc status` shows it."""
    if limit is None:
        return "unlimited"
    return f"{limit.per_minute:g}/min burst {limit.burst}"


def scaled(limit: RateLimit | None, factor: float) -> RateLimit | None:
    """`limit` cut to `factor` (at least one send of burst, never a zero rate)."""
    if limit is None or factor >= 1:
        return limit
    return RateLimit(
        per_minute=max(limit.per_minute * factor, 0.01),
        burst=max(1, math.floor(limit.burst * factor)),
    )


@dataclass(frozen=True)
class Level:
    """How far the budget is cut (`factor`), why, and when the next doubling is due
    (None: none scheduled -- full, or a ban whose end is not known yet)."""

    factor: float = 1.0
    reason: str = ""
    next_step_at: datetime | None = None


def fold(events: Iterable[object], restore_step: float) -> Level:
    """The budget level an account's ACCOUNTS events leave (pure, replayable): a ban cuts
    to BAN_CUT with its first restore step one `restore_step` after its end; a recorded
    change sets the level it names."""
    level = Level()
    step = timedelta(seconds=restore_step)
    for event in events:
        match event:
            case SessionBanned(reason=reason, until=until):
                level = Level(
                    min(level.factor, BAN_CUT),
                    f"banned: {reason}",
                    until + step if until is not None else None,
                )
            case SendBudgetChanged(factor=factor, reason=reason, next_step_at=next_at):
                level = Level(factor, reason, next_at)
            case _:
                pass
    return level


def ban_cut(level: Level, reason: str, until: datetime | None, restore_step: float) -> Level:
    """The level after a ban ending at `until` (None: unknown, an operator resumes)."""
    step = timedelta(seconds=restore_step)
    return Level(min(level.factor, BAN_CUT), reason, until + step if until else None)


def next_level(level: Level, now: datetime, restore_step: float) -> Level | None:
    """The next level due by `now` (one doubling), or None if nothing is due. A cut whose
    restore is not scheduled yet (a ban with no known end, now over: we own the account
    again) gets its first step scheduled one `restore_step` from `now`."""
    if level.factor >= 1:
        return None
    step = timedelta(seconds=restore_step)
    if level.next_step_at is None:
        return Level(level.factor, "restoring after the ban", now + step)
    if level.next_step_at > now:
        return None
    factor = min(1.0, level.factor * 2)
    if factor >= 1:
        return Level(1.0, "restored after the ban", None)
    return Level(factor, "restoring after the ban", level.next_step_at + step)


class ActiveChats:
    """Which chats wrote within the active window: told by the owner's ingress, else one
    last-by-subject get on the chat's INBOUND subject, cached."""

    def __init__(
        self,
        bus: Bus | None,
        channel: str,
        account: str,
        window: float,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.bus = bus
        self.channel = channel
        self.account = account
        self.window = window
        self.wall = wall
        self._last: dict[str, float] = {}  # chat -> wall time of its last inbound
        self._checked: dict[str, float] = {}  # chat -> when a get found nothing recent
        self.lookups = 0

    def saw(self, chat: str, at: float | None = None) -> None:
        """An inbound message from `chat` (at `at`, default now)."""
        self._remember(chat, self.wall() if at is None else at)
        self._checked.pop(chat, None)

    def _remember(self, chat: str, at: float) -> None:
        self._last.pop(chat, None)  # most recent last, so the oldest go first
        self._last[chat] = max(at, self._last.get(chat, 0.0))
        while len(self._last) > MAX_CACHED_CHATS:
            del self._last[next(iter(self._last))]

    async def active(self, chat: str) -> bool:
        """True if `chat` sent something within the window."""
        now = self.wall()
        last = self._last.get(chat)
        if last is not None and now - last <= self.window:
            return True
        checked = self._checked.get(chat)
        if checked is not None and now - checked < NEGATIVE_TTL:
            return False
        last = await self._lookup(chat)
        if last is not None:
            self._remember(chat, last)
            if now - last <= self.window:
                return True
        self._checked[chat] = now
        if len(self._checked) > MAX_CACHED_CHATS:
            self._checked.clear()
        return False

    async def _lookup(self, chat: str) -> float | None:
        """When the chat's last inbound message was stored, or None if it has none."""
        if self.bus is None:
            return None
        self.lookups += 1
        subject = subjects.inbound(self.channel, self.account, chat)
        try:
            msg = await self.bus.js.get_last_msg(INBOUND.name, subject)
        except nats.js.errors.NotFoundError:
            return None
        if msg.time is not None:
            return msg.time.timestamp()
        return decode(msg.data or b"", MessageReceived).at.timestamp()


class SameText:
    """Throttles one text to many chats: at most `limit` distinct chats per `window` s."""

    def __init__(self, limit: int, window: float, clock: Callable[[], float]) -> None:
        self.limit = limit
        self.window = window
        self.clock = clock
        self._sent: dict[str, deque[tuple[float, str]]] = {}  # digest -> (time, chat)

    @staticmethod
    def digest(text: str) -> str:
        """The text's key: case and runs of whitespace do not make it another text."""
        normal = " ".join(text.split()).casefold()
        return hashlib.blake2b(normal.encode(), digest_size=16).hexdigest()

    def _recent(self, key: str, now: float) -> deque[tuple[float, str]]:
        sent = self._sent.get(key)
        if sent is None:
            return deque()
        while sent and now - sent[0][0] >= self.window:
            sent.popleft()
        if not sent:
            del self._sent[key]
        return sent

    def wait_time(self, key: str, chat: str) -> float:
        """Seconds until `chat` may get this text (0: now)."""
        now = self.clock()
        latest: dict[str, float] = {}  # each chat's latest send of the text
        for at, to in self._recent(key, now):
            latest[to] = at
        if chat in latest or len(latest) < self.limit:
            return 0.0  # already one of the chats that got it, or room for one more
        # Room comes when enough of the others' latest sends have left the window.
        ordered = sorted(latest.values())
        return ordered[len(latest) - self.limit] + self.window - now

    def note(self, key: str, chat: str) -> tuple[str, float, str]:
        """Count a send of the text to `chat`; the handle undoes it."""
        at = self.clock()
        self._sent.setdefault(key, deque()).append((at, chat))
        if len(self._sent) > MAX_CACHED_CHATS:
            for k in list(self._sent):
                self._recent(k, at)
        return (key, at, chat)

    def undo(self, handle: tuple[str, float, str]) -> None:
        """Take back a counted send that never happened."""
        key, at, chat = handle
        sent = self._sent.get(key)
        if sent is not None:
            with contextlib.suppress(ValueError):
                sent.remove((at, chat))


@dataclass
class Grant:
    """What one acquire took, so a send that never happened gives it back."""

    reply: bool = False
    first_contact: bool = False
    same_text: tuple[str, float, str] | None = None


class SendBudget:
    """One account's send budget: `acquire(job)` before a send, `refund(grant)` if it
    never happened; `waiting` jobs are held in acquire now."""

    def __init__(
        self,
        settings: Delivery,
        account: str,
        active: ActiveChats,
        *,
        level: Level | None = None,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        self.settings = settings
        self.account = account
        self.active = active
        self.clock = clock
        self.on_change = on_change
        self.configured = settings.limit_for(account)
        self.first_contact = settings.first_contact
        self.level = level or Level()
        self.reply: TokenBucket | None = None
        self.first: TokenBucket | None = None
        self.same_text = (
            SameText(settings.same_text_limit, settings.same_text_window, clock)
            if settings.same_text_limit is not None
            else None
        )
        self.waiting = 0
        self._apply()

    @property
    def unlimited(self) -> bool:
        """No budget at all (the sim's default): nothing to wait for or look up."""
        return self.configured is None and self.first_contact == "any" and self.same_text is None

    def limits(self) -> tuple[RateLimit | None, RateLimit | None]:
        """The reply and first-contact budgets at the current level."""
        first = self.first_contact if isinstance(self.first_contact, RateLimit) else None
        return scaled(self.configured, self.level.factor), scaled(first, self.level.factor)

    def _apply(self) -> None:
        reply, first = self.limits()
        self.reply = _resized(self.reply, reply, self.clock)
        self.first = _resized(self.first, first, self.clock)

    def set_level(self, level: Level) -> None:
        """Run at `level` from now on."""
        self.level = level
        self._apply()
        self._changed()

    def status(self) -> SendBudgetStatus:
        """What `svc status` shows."""
        reply, first = self.limits()
        first_contact = describe(first) if first is not None else str(self.first_contact)
        same = self.same_text
        return SendBudgetStatus(
            reply=describe(reply),
            first_contact=first_contact,
            same_text=f"{same.limit} chats/{same.window:g}s" if same else "off",
            factor=self.level.factor,
            reason=self.level.reason,
            waiting=self.waiting,
            next_step_at=self.level.next_step_at,
        )

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    async def acquire(self, job: SendMessage) -> Grant:
        """Spend the budget for one send of `job`, waiting for it if it is spent; raise
        FirstContactRefusedError if first contact is off and the chat has not written."""
        grant = Grant()
        if self.unlimited:
            return grant
        self.waiting += 1
        self._changed()
        try:
            first = False
            if self.first_contact != "any":
                first = not await self.active.active(job.chat)
            if first and self.first_contact == "off":
                raise FirstContactRefusedError(
                    f"first contact refused: {job.chat} has not written to {job.account} in the"
                    f" last {self.settings.active_window:g} s and WHATSAPP_FIRST_CONTACT_RATE"
                    " is off; set it to a rate (e.g. 2:1, sends per minute:burst) to allow"
                    " proactive sends, then requeue the job ('svc dlq requeue')"
                )
            if self.same_text is not None:
                key = SameText.digest(job.text)
                while True:
                    delay = self.same_text.wait_time(key, job.chat)
                    if delay <= 0:
                        break
                    # Exactly until enough earlier sends of it leave the window; then look
                    # again (another chat may have taken the place meanwhile).
                    await asyncio.sleep(delay)
                grant.same_text = self.same_text.note(key, job.chat)
            if first and self.first is not None:
                await self.first.acquire()
                grant.first_contact = True
            if self.reply is not None:
                await self.reply.acquire()
                grant.reply = True
        except BaseException:
            self.refund(grant)
            raise
        finally:
            self.waiting -= 1
            self._changed()
        return grant

    def refund(self, grant: Grant) -> None:
        """Give back what `grant` took (the send never happened)."""
        if grant.reply and self.reply is not None:
            self.reply.refund()
        if grant.first_contact and self.first is not None:
            self.first.refund()
        if grant.same_text is not None and self.same_text is not None:
            self.same_text.undo(grant.same_text)
        grant.reply = grant.first_contact = False
        grant.same_text = None

    def changed_event(self, channel: str, holder: str) -> SendBudgetChanged:
        """The record of the current level (its id derives from the level, so two owners
        recording the same step store it once)."""
        reply, _ = self.limits()
        next_at = self.level.next_step_at
        return SendBudgetChanged(
            id=derived_id(
                "budget",
                channel,
                self.account,
                f"{self.level.factor:g}",
                self.level.reason,
                next_at.isoformat() if next_at else "",
            ),
            channel=channel,
            account=self.account,
            reason=self.level.reason,
            per_minute=reply.per_minute if reply else 0.0,
            burst=reply.burst if reply else 0,
            factor=self.level.factor,
            next_step_at=next_at,
            holder=holder,
        )

    async def restore(
        self,
        stop: asyncio.Event,
        record: Callable[[SendBudgetChanged], Awaitable[None]],
        wall: Callable[[], datetime] = utcnow,
    ) -> None:
        """Step the level back up while it is cut, recording each step, until `stop`."""
        step = self.settings.restore_step
        if self.limits() == (None, None):
            await stop.wait()  # no rate to cut or restore (the sim's default)
            return
        while not stop.is_set():
            upcoming = next_level(self.level, wall(), step)
            if upcoming is not None:
                self.set_level(upcoming)
                await record(self.changed_event_for_record())
                continue
            if self.level.next_step_at is None:
                await stop.wait()
                return
            delay = (self.level.next_step_at - wall()).total_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), max(0.0, delay))

    # Overridden per owner (channel, holder) by `bind`.
    _channel = ""
    _holder = ""

    def bind(self, channel: str, holder: str) -> SendBudget:
        """Name the channel and holder its records carry."""
        self._channel, self._holder = channel, holder
        return self

    def changed_event_for_record(self) -> SendBudgetChanged:
        """`changed_event` for the bound channel and holder."""
        return self.changed_event(self._channel, self._holder)


def _resized(
    bucket: TokenBucket | None, limit: RateLimit | None, clock: Callable[[], float]
) -> TokenBucket | None:
    if limit is None:
        return None
    if bucket is None:
        return TokenBucket(limit, clock=clock)
    bucket.resize(limit)
    return bucket
