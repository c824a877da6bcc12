"""How whatsapp workers share accounts: a lease board for wake-ups, presence for fair share.

`LeaseBoard` watches every write to the `leases` bucket with a plain subscription on
`$KV.leases.>` (no consumer to lose on a server restart): standbys wake on a release at
once, and learn when a silent owner's key is due to expire. It is a hint, never proof:
acquisition is always the revision-checked create.

`Fleet` announces this worker in the `presence` bucket (per-key TTL) and computes its
fair share: with W live workers for the same account list and N accounts, at most
ceil(N / W) each. A worker over its share hands accounts over gracefully (release, then a
cool-down so another worker takes them); one under it competes for the rest.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from dataclasses import dataclass, field

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from contracts.streams import LEASES, PRESENCE
from services.runtime.bus import Bus

log = logging.getLogger(__name__)


@dataclass
class _KeySeen:
    last_write: float = 0.0  # monotonic time of the last write seen on the key
    deleted: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)


class LeaseBoard:
    """Wake-ups for standbys from the writes on `$KV.leases.>`."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._keys: dict[str, _KeySeen] = {}
        self._sub: Subscription | None = None
        self._prefix = f"$KV.{LEASES.name}."

    async def __aenter__(self) -> LeaseBoard:
        self._sub = await self.bus.nc.subscribe(f"{self._prefix}>", cb=self._on_write)
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            with contextlib.suppress(nats.errors.Error):
                await self._sub.unsubscribe()

    def _seen(self, key: str) -> _KeySeen:
        return self._keys.setdefault(key, _KeySeen())

    async def _on_write(self, msg: Msg) -> None:
        headers = msg.headers or {}
        if headers.get("Nats-Expected-Last-Subject-Sequence") == "0":
            return  # a create: someone's acquisition attempt, not a change of the lease
        seen = self._seen(msg.subject.removeprefix(self._prefix))
        seen.last_write = time.monotonic()
        seen.deleted = headers.get("KV-Operation") in ("DEL", "PURGE")
        seen.changed.set()
        seen.changed = asyncio.Event()

    def changed(self, key: str) -> asyncio.Event:
        """An event set at the next write (renew, release, park) seen on `key`."""
        return self._seen(key).changed

    def expires_in(self, key: str, ttl: float) -> float | None:
        """Seconds until a key last written (not deleted) `ttl` ago expires, if known."""
        seen = self._keys.get(key)
        if seen is None or seen.deleted or not seen.last_write:
            return None
        return seen.last_write + ttl - time.monotonic()


def account_set_id(accounts: tuple[str, ...]) -> str:
    """A short id of an account list: workers with the same list share fairly."""
    return hashlib.blake2b(",".join(sorted(accounts)).encode(), digest_size=4).hexdigest()


class Fleet:
    """This worker's presence, and its fair share of `accounts`."""

    def __init__(self, bus: Bus, holder: str, accounts: tuple[str, ...], ttl: int) -> None:
        self.bus = bus
        self.holder = holder
        self.accounts = accounts
        self.ttl = ttl
        self.prefix = f"$KV.{PRESENCE.name}.{account_set_id(accounts)}"
        self.workers = 1
        self.owned: list[str] = []  # accounts held now, in acquisition order
        self.settled = asyncio.Event()  # set once this worker has seen the others
        self._shed: dict[str, asyncio.Event] = {}

    @property
    def limit(self) -> int:
        """The most accounts this worker should hold: ceil(N / W)."""
        return math.ceil(len(self.accounts) / max(1, self.workers))

    def may_acquire(self) -> bool:
        """True while holding fewer accounts than the fair share."""
        return self.settled.is_set() and len(self.owned) < self.limit

    def owning(self, account: str) -> asyncio.Event:
        """Record that `account` is held; the returned event asks its owner to hand it over."""
        self.owned.append(account)
        self._shed[account] = asyncio.Event()
        return self._shed[account]

    def released(self, account: str) -> None:
        """Record that `account` is no longer held."""
        with contextlib.suppress(ValueError):
            self.owned.remove(account)
        self._shed.pop(account, None)

    async def run(self, stop: asyncio.Event) -> None:
        """Heartbeat presence, recount workers and rebalance until `stop`; then leave."""
        interval = min(1.0, self.ttl / 3)
        try:
            while not stop.is_set():
                try:
                    await self._announce()
                    self.workers = max(1, await self._count())
                    self.settled.set()
                    self._rebalance()
                except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
                    log.warning("presence update failed", extra={"error": repr(exc)})
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), interval)
        finally:
            # Purge, not a KV delete: a delete marker would still count as a worker. Not
            # connected: the entry expires after its TTL; waiting out a timeout would only
            # delay the exit (e.g. the embedded server died).
            with contextlib.suppress(Exception):
                if self.bus.nc.is_connected:
                    await self.bus.js.purge_stream(
                        f"KV_{PRESENCE.name}", subject=f"{self.prefix}.{self.holder}"
                    )

    async def _announce(self) -> None:
        await self.bus.js.publish(
            f"{self.prefix}.{self.holder}", self.holder.encode(), msg_ttl=self.ttl, timeout=2.0
        )

    async def _count(self) -> int:
        info = await self.bus.js.stream_info(
            f"KV_{PRESENCE.name}", subjects_filter=f"{self.prefix}.>"
        )
        return len(info.state.subjects or {})

    def _rebalance(self) -> None:
        excess = len(self.owned) - self.limit
        if excess <= 0:
            return
        # Hand over the most recently acquired first: the least churn for the others.
        for account in list(reversed(self.owned))[:excess]:
            shed = self._shed.get(account)
            if shed is not None and not shed.is_set():
                log.info(
                    "over fair share, handing over",
                    extra={"account": account, "workers": self.workers, "limit": self.limit},
                )
                shed.set()
