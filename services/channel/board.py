"""The session status board: what each account's owner last reported about its session.

One `SessionBoard` per (owner, account) writes `SessionStatus` to the `sessions` bucket
(key `<channel>.<account>`): `connecting` when the owner opens a session, `connected` /
`disconnected` as the transport reports them, the end state (banned until ..., replaced,
needs_pairing, ...) when the session ends, `standby` when the owner releases the lease.
Writes are best-effort: a failed write is logged and never stops sending; `post()` never
blocks (session events arrive on the account's event pump), and a burst coalesces to the
latest status, written in the order posted. The lease, not this board, is the truth about
who owns an account: `svc status` reads both.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import datetime

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.codec import encode
from contracts.events import utcnow
from contracts.payloads import SendBudgetStatus, SessionState, SessionStatus
from contracts.streams import SESSIONS
from services.runtime.bus import Bus

log = logging.getLogger(__name__)

WRITE_TIMEOUT = 2.0  # a status write never holds up an owner's exit longer than this


class SessionBoard:
    """Writes one account's `SessionStatus` (best-effort, latest wins, in order)."""

    def __init__(self, bus: Bus, channel: str, account: str, holder: str) -> None:
        self.bus = bus
        self.account = account
        self.holder = holder
        self.key = subjects.lease_key(channel, account)
        self.token = 0
        self.device = ""
        self.connected_at: datetime | None = None
        self.budget: SendBudgetStatus | None = None  # the owner's send budget, shown along
        self.current: SessionStatus | None = None
        self._kv: KeyValue | None = None
        self._pending: SessionStatus | None = None
        self._writer: asyncio.Task[None] | None = None

    def post(
        self, state: SessionState, reason: str = "", *, until: datetime | None = None
    ) -> SessionStatus:
        """Queue `state` for writing (never blocks); return the status queued."""
        now = utcnow()
        if state == "connected":
            self.connected_at = now
        status = SessionStatus(
            state=state,
            reason=reason,
            holder=self.holder,
            token=self.token,
            device=self.device,
            since=now,
            until=until,
            connected_at=self.connected_at,
            budget=self.budget,
        )
        self._queue(status)
        return status

    def _queue(self, status: SessionStatus) -> None:
        self.current = status
        self._pending = status
        if self._writer is None or self._writer.done():
            self._writer = asyncio.create_task(self._drain(), name=f"board-{self.account}")

    def post_budget(self, budget: SendBudgetStatus) -> None:
        """Show `budget` with the current state (never blocks; coalesces like `post`)."""
        self.budget = budget
        if self.current is not None:
            self._queue(msgspec.structs.replace(self.current, budget=budget))

    async def write(
        self, state: SessionState, reason: str = "", *, until: datetime | None = None
    ) -> None:
        """Write `state` now (after what was posted before it); never raises."""
        self.post(state, reason, until=until)
        await self.settle()

    async def settle(self) -> None:
        """Wait until what was posted is written (or given up)."""
        if self._writer is not None:
            await asyncio.shield(self._writer)

    async def _drain(self) -> None:
        while self._pending is not None:
            status, self._pending = self._pending, None
            await self._put(status)

    async def _put(self, status: SessionStatus) -> None:
        if not self.bus.nc.is_connected:
            # Nothing to wait for (e.g. shutting down after the server died): `svc status`
            # shows a board without a lease behind it as standby anyway.
            log.info("session status not written: not connected", extra={"account": self.account})
            return
        try:
            if self._kv is None:
                self._kv = await self.bus.js.key_value(SESSIONS.name)
            await asyncio.wait_for(self._kv.put(self.key, encode(status)), WRITE_TIMEOUT)
        except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
            log.warning(
                "could not write the session status",
                extra={"account": self.account, "state": status.state, "error": repr(exc)},
            )
