"""A fenced lease on the `leases` KV bucket: one sender per account.

Acquire by `create` (with a per-key TTL), renew by a revision-checked raw publish that
keeps the TTL (`kv.update` would drop it), release by a revision-checked delete. The
revision at acquisition is the fencing token. `valid()` is the local proof: a monotonic
deadline computed from the time each successful write was *sent*, minus a safety margin,
so the holder stops trusting its lease before the server could expire the key. `prove()`
adds a revision-checked renew when the last one is older than `fresh_for` -- so a lease
whose revision moved under us (deleted by hand, say) is noticed before the next send --
or when what is left of the proof would not cover a send (`cover`, the transport's send
timeout) plus the `sending` write before it. `covers()` is the synchronous last check
right before the transport call. See docs/adr/0007-fenced-leases.md for the argument and
its remaining window.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import secrets
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import msgspec
import nats.errors
import nats.js.errors
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.events import utcnow
from contracts.streams import LEASES
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError

log = logging.getLogger(__name__)

_WRONG_LAST_SEQUENCE = 10071
# Time allowed between a proof and the transport call: the `sending` record is written
# in between, so a proof must leave this much on top of the send's own cover.
WRITE_HEADROOM = 0.25


def lease_margin(ttl: float) -> float:
    """How long before the server could expire the key the holder stops trusting it: room
    for the time a write takes to reach the server and for clock-rate drift."""
    return max(0.5, ttl * 0.2)


def longest_proof(ttl: float) -> float:
    """The most a fresh renewal can prove: TTL minus the margin."""
    return ttl - lease_margin(ttl)


def check_send_cover(ttl: int, send_timeout: float, transport: str) -> None:
    """Refuse a TTL whose fresh proof cannot cover two of the transport's sends: a send
    only starts while the proof covers its whole timeout, so it could hardly ever start."""
    if send_timeout * 2 > longest_proof(ttl):
        need = 2
        while send_timeout * 2 > longest_proof(need):
            need += 1
        raise ConfigError(
            f"WHATSAPP_LEASE_TTL={ttl} proves the lease for at most {longest_proof(ttl):.2f} s,"
            f" less than twice the {transport} transport's send timeout of {send_timeout:.2f} s:"
            f" set WHATSAPP_LEASE_TTL to at least {need}"
        )


def new_holder_id(role: str = "svc") -> str:
    """A holder id unique per process: host, pid and a random suffix (a valid KV token)."""
    host = re.sub(r"[^A-Za-z0-9-]", "-", socket.gethostname().split(".")[0])[:24] or "host"
    return f"{host}-{os.getpid()}-{role}-{secrets.token_hex(3)}"


class LeaseValue(msgspec.Struct, frozen=True, kw_only=True):
    """What the `leases` bucket stores per account. `parked` (no TTL) blocks takeover;
    `state` is the session end that parked it (e.g. `banned`) and `until` (RFC 3339, UTC)
    when a parked account may be taken over again without an operator (a ban's end)."""

    holder: str
    token: int
    acquired_at: str
    parked: str = ""
    state: str = ""
    until: str = ""

    def parked_until(self) -> datetime | None:
        """When the park ends by itself, or None (an operator resumes it)."""
        if not self.parked or not self.until:
            return None
        try:
            until = datetime.fromisoformat(self.until)
        except ValueError:
            return None  # written by hand: treated as no end, like a park without one
        # Without an offset (written by hand) it is read as UTC, like every time we write.
        return until if until.tzinfo else until.replace(tzinfo=UTC)


@dataclass
class LeaseState:
    """What the holder knows about its lease."""

    token: int = 0
    revision: int = 0
    deadline: float = 0.0  # time.monotonic() after which we no longer trust the lease
    renewed: float = 0.0  # time.monotonic() when the last successful write was sent
    acquired_at: str = ""


class Lease:
    """The lease on one account, as seen by one would-be holder."""

    def __init__(
        self, bus: Bus, channel: str, account: str, holder: str, ttl: int, *, fresh_for: float = 1.0
    ) -> None:
        self.bus = bus
        self.channel = channel
        self.account = account
        self.holder = holder
        self.ttl = ttl
        self.fresh_for = fresh_for
        self.key = subjects.lease_key(channel, account)
        # Stop trusting the lease well before the server could expire it: a margin for
        # the time a write takes to reach the server and for clock-rate drift.
        self.margin = lease_margin(ttl)
        self.state = LeaseState()
        self._kv: KeyValue | None = None
        self._lock = asyncio.Lock()  # one write at a time: each needs the last revision

    @property
    def token(self) -> int:
        """The fencing token (0 while not held)."""
        return self.state.token

    def valid(self) -> bool:
        """True while the holder can prove nobody else can hold the lease."""
        return self.state.token > 0 and time.monotonic() < self.state.deadline

    def remaining(self) -> float:
        """Seconds of proof left (negative when expired)."""
        return self.state.deadline - time.monotonic()

    def covers(self, seconds: float) -> bool:
        """True while the proof still holds `seconds` from now: no I/O, so nothing can
        run between this check and the caller's next statement."""
        return self.state.token > 0 and time.monotonic() + seconds < self.state.deadline

    @property
    def deadline(self) -> float:
        """The monotonic time after which the holder no longer trusts the lease."""
        return self.state.deadline

    async def bucket(self) -> KeyValue:
        """The `leases` bucket."""
        if self._kv is None:
            self._kv = await self.bus.js.key_value(LEASES.name)
        return self._kv

    def _value(
        self, token: int, acquired_at: str, parked: str = "", state: str = "", until: str = ""
    ) -> bytes:
        return msgspec.json.encode(
            LeaseValue(
                holder=self.holder,
                token=token,
                acquired_at=acquired_at,
                parked=parked,
                state=state,
                until=until,
            )
        )

    async def try_acquire(self) -> bool:
        """Take the lease if nobody holds it; True on success."""
        kv = await self.bucket()
        async with self._lock:
            sent = time.monotonic()
            acquired_at = utcnow().isoformat(timespec="milliseconds")
            try:
                revision = await kv.create(self.key, self._value(0, acquired_at), msg_ttl=self.ttl)
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.KeyNotFoundError):
                # KeyNotFound: nats-py's create found the key taken, and it expired before
                # the follow-up read; the next attempt can take it.
                return False
            except nats.js.errors.APIError as exc:
                if getattr(exc, "err_code", None) == _WRONG_LAST_SEQUENCE:
                    return False
                raise
            self.state = LeaseState(
                token=revision,
                revision=revision,
                deadline=sent + self.ttl - self.margin,
                renewed=sent,
                acquired_at=acquired_at,
            )
        # Record the token in the value so `svc status` and `nats kv get` show it.
        await self.renew()
        return self.valid()

    async def take_parked(self, revision: int) -> bool:
        """Take a parked account's lease by one write checked against the parked marker's
        `revision` (an operator's act, e.g. pairing): no moment without a key, so no
        standby can take it in between. False if the marker changed meanwhile."""
        async with self._lock:
            sent = time.monotonic()
            acquired_at = utcnow().isoformat(timespec="milliseconds")
            self.state = LeaseState(
                token=revision,  # for _write's check only; the token is the new revision
                revision=revision,
                deadline=sent + self.ttl - self.margin,
                renewed=sent,
                acquired_at=acquired_at,
            )
            if not await self._write(self._value(0, acquired_at)):
                return False
            self.state.token = self.state.revision
        await self.renew()  # record the token in the value, as try_acquire does
        return self.valid()

    async def renew(self) -> bool:
        """Extend the lease; False (and no longer held) if someone else's write came first."""
        async with self._lock:
            return await self._write(self._value(self.state.token, self.state.acquired_at))

    async def prove(self, cover: float = 0.0) -> bool:
        """Before a send: renew if the last write is older than `fresh_for` or the proof
        left would not cover `cover` seconds (plus the write before the send); then check
        it covers `cover`. False means: do not send."""
        if not self.valid():
            return False
        if self._needs_renewal(cover):
            try:
                async with self._lock:
                    # Judged again under the lock: of many concurrent provers, one renews.
                    if self._needs_renewal(cover) and not await self._write(
                        self._value(self.state.token, self.state.acquired_at)
                    ):
                        return False
            except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                # Unreachable NATS does not void the lease by itself: the deadline decides.
                log.warning(
                    "lease proof renew failed", extra={"account": self.account, "error": repr(exc)}
                )
        return self.covers(cover)

    def _needs_renewal(self, cover: float) -> bool:
        stale = time.monotonic() - self.state.renewed > self.fresh_for
        return stale or not self.covers(cover + WRITE_HEADROOM)

    async def _write(self, value: bytes, *, ttl: bool = True) -> bool:
        if self.state.token == 0:
            return False
        sent = time.monotonic()
        headers = {"Nats-Expected-Last-Subject-Sequence": str(self.state.revision)}
        try:
            ack = await self.bus.js.publish(
                f"$KV.{LEASES.name}.{self.key}",
                value,
                headers=headers,
                msg_ttl=self.ttl if ttl else None,
                timeout=max(0.5, min(2.0, self.remaining())),
            )
        except nats.js.errors.APIError as exc:
            if getattr(exc, "err_code", None) == _WRONG_LAST_SEQUENCE:
                self.state = LeaseState()
                return False
            raise
        self.state.revision = ack.seq
        self.state.renewed = sent
        self.state.deadline = sent + self.ttl - self.margin
        return True

    async def release(self) -> bool:
        """Give the lease up (only if still ours); True if it was released."""
        kv = await self.bucket()
        async with self._lock:
            if self.state.token == 0:
                return False
            revision, self.state = self.state.revision, LeaseState()
            if not self.bus.nc.is_connected:
                # Nothing to tell: waiting out a publish timeout would only delay the exit
                # (e.g. the embedded server died); the key expires after its TTL anyway.
                log.info("lease left to expire: not connected", extra={"account": self.account})
                return False
            try:
                await kv.delete(self.key, last=revision)
            except (nats.js.errors.Error, nats.errors.Error) as exc:
                log.info(
                    "lease release refused", extra={"account": self.account, "error": repr(exc)}
                )
                return False
            return True

    async def park(self, reason: str, *, state: str = "", until: datetime | None = None) -> bool:
        """Replace our lease by a parked marker without TTL: nobody takes the account over
        until an operator resumes it (the session was logged out, replaced or banned) or,
        with `until`, until then (a temporary ban). Revision-checked like a renewal: False
        (nothing written) when the key is no longer our lease -- a parked marker never
        lands over someone else's lease."""
        async with self._lock:
            value = self._value(
                self.state.token,
                self.state.acquired_at,
                parked=reason or "parked",
                state=state,
                until=_ceil_ms(until).astimezone(UTC).isoformat(timespec="milliseconds")
                if until
                else "",
            )
            try:
                return await self._write(value, ttl=False)
            finally:
                self.state = LeaseState()

    def forget(self) -> None:
        """Drop local proof (the lease is lost or expired)."""
        self.state = LeaseState()


def _ceil_ms(at: datetime) -> datetime:
    """`at` rounded up to the millisecond the lease stores: a park never ends early."""
    extra = at.microsecond % 1000
    return at + timedelta(microseconds=1000 - extra) if extra else at


async def read_lease(kv: KeyValue, key: str) -> tuple[LeaseValue, int] | None:
    """The current value of `key` and the entry's revision, or None."""
    try:
        entry = await kv.get(key)
    except nats.js.errors.KeyNotFoundError:
        return None
    if entry.value is None:
        return None
    return msgspec.json.decode(entry.value, type=LeaseValue), entry.revision or 0
