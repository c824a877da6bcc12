"""Zombie sessions (ADR 0025): a session that says it is connected but hears nothing.

A WhatsApp Web socket can stay "connected" while the network has stopped talking to it:
no messages, no receipts, no keepalive answers. Nothing fails, so nothing reconnects, and
the account silently stops answering. The owner's `ZombieWatch` compares the session's
`last_heard()` (an optional capability, see `port.SessionCapabilities`) with
`SVC_ZOMBIE_AFTER`; past it, while the board says connected, it reports the silence
(`SessionZombie` on ACCOUNTS, the board's `zombie` state, a log line) and recycles the
session once: `RecyclableSession` closes the transport session and opens a new one under
the same lease (no release, no new token; the egress sees `NotConnectedError` meanwhile,
so jobs keep their places). The cap: one recycle per `2 x SVC_ZOMBIE_AFTER` (a silence
takes a full window to detect, so a one-window cap could never see a second one); a
session silent again within it is reported only, and each silence is reported once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from types import TracebackType

import nats.errors
import nats.js.errors

from contracts import subjects
from contracts.events import SessionZombie, derived_id
from contracts.payloads import PresenceAction
from services.channel.board import SessionBoard
from services.channel.port import (
    Events,
    NotConnectedError,
    Outgoing,
    Session,
    SessionEnd,
    SessionEnding,
    Transport,
    last_heard_of,
)
from services.runtime.bus import Bus

log = logging.getLogger(__name__)

# How long a recycle waits for sends already inside the old session, beyond their timeout.
_DRAIN_SLACK = 1.0


class RecyclableSession:
    """The owner's view of an account's session: forwards to the transport's session and
    can replace it with a fresh one (`recycle()`) while the lease stays held."""

    def __init__(
        self, transport: Transport, account: str, events: Events, *, receive: bool
    ) -> None:
        self.transport = transport
        self.account = account
        self.events = events
        self.receive = receive
        self.recycles = 0
        # What the current session declares (the egress reads them per send).
        self.reports_receipts = False
        self.send_timeout = transport.send_timeout
        self._cm: AbstractAsyncContextManager[Session] | None = None
        self._inner: Session | None = None
        self._swapped = asyncio.Event()
        self._failed = SessionEnding()  # a recycle that could not reopen ends the session
        self._in_flight = 0
        self._drained = asyncio.Event()
        self._drained.set()

    async def __aenter__(self) -> RecyclableSession:
        await self._open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close(exc_type, exc, tb)

    async def _open(self) -> None:
        cm = self.transport.session(self.account, self.events, receive=self.receive)
        inner = await cm.__aenter__()
        self._cm, self._inner = cm, inner
        self.reports_receipts = inner.reports_receipts
        self.send_timeout = inner.send_timeout

    async def _close(
        self,
        exc_type: type[BaseException] | None = None,
        exc: BaseException | None = None,
        tb: TracebackType | None = None,
    ) -> None:
        cm, self._cm, self._inner = self._cm, None, None
        if cm is not None:
            await cm.__aexit__(exc_type, exc, tb)

    async def recycle(self) -> bool:
        """Close the session and open a new one; False (and the session ends) if the new
        one cannot be opened."""
        self._inner = None  # sends from here on wait, in place, for the new session
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._drained.wait(), self.send_timeout + _DRAIN_SLACK)
        await self._close()
        try:
            await self._open()
        except Exception as exc:
            log.error(
                "zombie session could not be reopened",
                extra={"account": self.account, "error": repr(exc)},
            )
            self._failed.end(SessionEnd("connect_failed", f"recycle failed: {exc}"))
            return False
        self.recycles += 1
        self._swapped.set()
        return True

    # -- Session ---------------------------------------------------------------------

    async def send(self, out: Outgoing) -> str:
        inner = self._inner
        if inner is None:
            raise NotConnectedError("session is being recycled (it went silent)")
        self._in_flight += 1
        self._drained.clear()
        try:
            return await inner.send(out)
        finally:
            self._in_flight -= 1
            if self._in_flight == 0:
                self._drained.set()

    async def ended(self) -> SessionEnd:
        """The current session's own end (a replaced one never ends by itself)."""
        while True:
            inner = self._inner
            self._swapped.clear()
            failed = asyncio.create_task(self._failed.ended())
            waits: list[asyncio.Task[object]] = [asyncio.create_task(self._swapped.wait()), failed]
            own = asyncio.create_task(inner.ended()) if inner is not None else None
            if own is not None:
                waits.append(own)
            try:
                done, _ = await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for w in waits:
                    w.cancel()
            if failed in done:
                return failed.result()
            if own in done and self._inner is inner:  # not a session closed by a recycle
                result = own.result()
                assert isinstance(result, SessionEnd)
                return result

    # -- optional capabilities -------------------------------------------------------

    def last_heard(self) -> float | None:
        return last_heard_of(self._inner)

    async def presence(
        self, chat: str, action: PresenceAction, message_ids: tuple[str, ...], sender: str = ""
    ) -> None:
        show = getattr(self._inner, "presence", None)
        if show is not None:
            await show(chat, action, message_ids, sender)

    async def confirmed(self, job_id: str) -> str | None:
        """The current session's `confirmed` (ADR 0028), or None when it has none."""
        probe = getattr(self._inner, "confirmed", None)
        found = await probe(job_id) if probe is not None else None
        return found if isinstance(found, str) else None


class ZombieWatch:
    """Watches one owned session for silence; reports it and recycles it (capped)."""

    def __init__(
        self,
        bus: Bus,
        channel: str,
        account: str,
        holder: str,
        status: SessionBoard,
        *,
        after: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.bus = bus
        self.channel = channel
        self.account = account
        self.holder = holder
        self.status = status
        self.after = after
        self.cap = 2 * after
        self.clock = clock
        self._last_recycle: float | None = None
        self._reported_for: float | None = None  # the last_heard() of the silence reported
        self.checks = 0  # looks taken (observability for tests and debugging)

    @property
    def interval(self) -> float:
        """How often the watch looks: a small fraction of the window, at most 30 s."""
        return min(30.0, max(0.05, self.after / 10))

    def _connected(self) -> bool:
        current = self.status.current
        return current is not None and current.state in ("connected", "zombie")

    async def run(self, session: RecyclableSession, done: asyncio.Event) -> None:
        """Look every `interval` until `done` (never raises: a watch must not stop sends)."""
        if self.after <= 0:
            return
        while not done.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.interval)
            if done.is_set():
                return
            try:
                await self.check(session)
            except Exception as exc:  # a watch that fails must never take the owner down
                log.warning(
                    "zombie watch failed", extra={"account": self.account, "error": repr(exc)}
                )

    async def check(self, session: RecyclableSession) -> None:
        """One look: report (and maybe recycle) a silence longer than the window."""
        self.checks += 1
        heard = session.last_heard()
        if heard is None or not self._connected():
            return
        now = self.clock()
        silent = now - heard
        if silent <= self.after:
            if self._reported_for is not None and heard > self._reported_for:
                self._reported_for = None  # heard again: a later silence is a new one
                if self.status.current is not None and self.status.current.state == "zombie":
                    self.status.post("connected")
            return
        if self._reported_for == heard:
            return  # this silence was reported already: never loop on it
        self._reported_for = heard
        recycle = self._last_recycle is None or now - self._last_recycle >= self.cap
        what = "recycling the session" if recycle else "recycle cap reached, reported only"
        reason = f"nothing heard for {silent:.0f} s (SVC_ZOMBIE_AFTER={self.after:g}): {what}"
        log.error(
            "zombie session: connected but nothing heard",
            extra={
                "account": self.account,
                "silent_for_s": round(silent, 1),
                "recycle": recycle,
                "token": self.status.token,
            },
        )
        self.status.post("zombie", reason)
        await self._record(silent, recycle, heard)
        if recycle:
            self._last_recycle = now
            if await session.recycle():
                log.warning(
                    "zombie session recycled under the same lease",
                    extra={"account": self.account, "token": self.status.token},
                )

    async def _record(self, silent: float, recycled: bool, heard: float) -> None:
        event = SessionZombie(
            id=derived_id("SessionZombie", self.account, self.holder, f"{heard:.6f}"),
            channel=self.channel,
            account=self.account,
            holder=self.holder,
            token=self.status.token,
            silent_for=round(silent, 3),
            recycled=recycled,
        )
        try:
            await self.bus.publish(subjects.accounts(self.channel, self.account), event)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.warning(
                "could not record the zombie session",
                extra={"account": self.account, "error": repr(exc)},
            )
