"""Account ownership: hold the lease, attach the session, send (and relay) until it ends."""

from __future__ import annotations

import asyncio
import logging
import random

from contracts import subjects
from contracts.events import CHANNEL_WHATSAPP, LeaseAcquired, LeaseLost, LeaseReleased, derived_id
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop
from services.runtime.lease import Lease
from services.whatsapp.egress import Egress, egress_consumer_spec
from services.whatsapp.ingress import Ingress
from services.whatsapp.transport import Transport

log = logging.getLogger(__name__)


async def _wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `event`; True if it was set."""
    try:
        await asyncio.wait_for(event.wait(), seconds)
    except TimeoutError:
        return False
    return True


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
    ) -> None:
        self.bus = bus
        self.transport = transport
        self.account = account
        self.holder = holder
        self.receive = receive
        self.lease = Lease(bus, CHANNEL_WHATSAPP, account, holder, lease_ttl)
        self.retry_interval = max(0.5, lease_ttl / 5)
        self.owning = asyncio.Event()
        self._subject = subjects.accounts(CHANNEL_WHATSAPP, account)

    async def run(self, stop: asyncio.Event) -> None:
        """Acquire, own, and on loss go back to standby, until `stop`."""
        while not stop.is_set():
            try:
                acquired = await self.lease.try_acquire()
            except Exception as exc:  # NATS trouble: stay standby and retry
                log.warning(
                    "lease acquire failed", extra={"account": self.account, "error": repr(exc)}
                )
                acquired = False
            if not acquired:
                await _wait(stop, self.retry_interval * random.uniform(0.75, 1.25))
                continue
            await self._own(stop)

    async def _own(self, stop: asyncio.Event) -> None:
        token = self.lease.token
        log.info(
            "lease acquired", extra={"account": self.account, "holder": self.holder, "token": token}
        )
        await self._record(
            LeaseAcquired(
                id=derived_id("lease-acquired", self.account, str(token)),
                account=self.account,
                holder=self.holder,
                token=token,
            )
        )
        ingress = Ingress(self.bus, self.account, self.holder)
        lost = asyncio.Event()
        done = asyncio.Event()  # stop sending: shutdown, lease lost, or session ended
        async with self.transport.session(self.account, ingress, receive=self.receive) as session:
            egress = Egress(self.bus, session, self.lease)
            loop = ConsumerLoop(
                self.bus,
                egress_consumer_spec(CHANNEL_WHATSAPP, self.account),
                egress.handle,
                on_dead_letter=egress.dead_lettered,
            )
            self.owning.set()
            sending = asyncio.create_task(loop.run(done), name=f"egress-{self.account}")
            renewing = asyncio.create_task(self._renew(lost, done), name=f"renew-{self.account}")
            waiters = [asyncio.create_task(e.wait()) for e in (stop, lost, ingress.session_ended)]
            await asyncio.wait([*waiters, sending], return_when=asyncio.FIRST_COMPLETED)
            done.set()
            for w in waiters:
                w.cancel()
            await asyncio.gather(sending, return_exceptions=True)  # finish the in-flight send
            # Not cancelled: a renewal cut off mid-flight could land with a revision we
            # never learn, and the revision-checked release would then be refused.
            await renewing
            self.owning.clear()
        if lost.is_set() or not self.lease.valid():
            self.lease.forget()
            log.warning("lease lost", extra={"account": self.account, "token": token})
            await self._record(
                LeaseLost(
                    id=derived_id("lease-lost", self.account, str(token)),
                    account=self.account,
                    holder=self.holder,
                    token=token,
                    reason="could not renew",
                )
            )
            return
        reason = ingress.end_reason or "shutdown"
        released = await self.lease.release()
        if released:
            log.info(
                "lease released", extra={"account": self.account, "token": token, "reason": reason}
            )
            await self._record(
                LeaseReleased(
                    id=derived_id("lease-released", self.account, str(token)),
                    account=self.account,
                    holder=self.holder,
                    token=token,
                    reason=reason,
                )
            )
        if ingress.session_ended.is_set():
            # Logged out / replaced / banned: wait for an operator instead of looping.
            log.error(
                "session ended; waiting for an operator",
                extra={"account": self.account, "reason": reason},
            )
            await stop.wait()

    async def _renew(self, lost: asyncio.Event, done: asyncio.Event) -> None:
        """Renew every ttl/3 until `done`; on failure retry fast until the deadline passes."""
        interval = self.lease.ttl / 3
        while not done.is_set():
            try:
                ok = await self.lease.renew()
            except Exception as exc:
                log.warning(
                    "lease renew failed", extra={"account": self.account, "error": repr(exc)}
                )
                ok = self.lease.valid()
                if ok:
                    await _wait(done, min(0.5, max(0.05, self.lease.remaining() / 4)))
                    continue
            if not ok:
                lost.set()
                return
            await _wait(done, interval)

    async def _record(self, event: LeaseAcquired | LeaseLost | LeaseReleased) -> None:
        try:
            await self.bus.publish(self._subject, event)
        except Exception as exc:  # the lease itself is the truth; the event is the record
            log.warning(
                "could not record lease event", extra={"account": self.account, "error": repr(exc)}
            )
