"""Pairing: link a WhatsApp number to an account (`svc whatsapp pair ACCOUNT`, and the
console through a `whatsapp` worker, services/whatsapp/pairing_service.py).

The command holds the account's lease while it pairs, so a running owner is never
disturbed (another holder: refused, naming it; a parked account -- e.g. needs_pairing
-- is taken over, which is what pairing is for). It builds a fresh neonize device in
the session store, prints each QR as it rotates (or, with a phone number, the pairing
code), waits for the phone's confirmation within its own deadline, and records account
-> device JID in the `devices` bucket, where any host finds it. See
docs/adr/0019-whatsapp-store-and-pairing.md.

`pair()` is the one pairing procedure: the CLI passes `on_code=terminal(show)` (the QR
drawn in the terminal), a `whatsapp` worker serving the console passes its own callback
(services/whatsapp/pairing.py) that hands each code to whoever asked, never to a log.
Both record `PairingStarted` and `PairingFinished` (who, via what, from where) on ACCOUNTS.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from contracts import subjects
from contracts.events import (
    CHANNEL_WHATSAPP,
    AccountResumed,
    PairingFinished,
    PairingOutcome,
    PairingStarted,
    new_id,
)
from contracts.streams import LEASES
from services.channel.devices import DeviceRegistry
from services.runtime.bus import Bus
from services.runtime.errors import ServiceError
from services.runtime.lease import Lease, read_lease
from services.runtime.provisioning import ensure_streams, raise_on_conflict
from services.runtime.settings import SessionStore
from services.whatsapp.neonize_store import (
    client_uuid,
    delete_device,
    devices_in_store,
    jid_string,
    mask_device,
    neonize_module,
    store_name,
)

log = logging.getLogger(__name__)

# The client a pairing uses: (store name, client uuid) -> a NewAClient-like object with
# `qr`, `event`, `connect`, `PairPhone` and `stop`. The command passes the real one; tests
# pass the real NewAClient with its Go bridge replaced (there is no WhatsApp here).
PairingClientFactory = Callable[[str, str], Any]
# E.164: a country code and subscriber number, 7 to 15 digits, without the leading 0.
_E164 = re.compile(r"\+?[1-9][0-9]{6,14}")
STOP_TIMEOUT = 10.0  # neonize's stop() blocks while a dial is in flight (55 s observed)


class PairingError(ServiceError):
    """Pairing refused or failed (one line, what to do next)."""


def new_pairing_client(name: str, uuid: str) -> Any:
    """A neonize client that pairs a brand-new device into the store `name`."""
    client = neonize_module("neonize.aioze.client")
    return client.NewAClient(name, uuid=uuid, new_device=True)


def check_phone(phone: str) -> str:
    """The digits of an E.164 number (`+1 555 000 0001` -> `15550000001`), else raise."""
    compact = re.sub(r"[\s().-]", "", phone)
    if not _E164.fullmatch(compact):
        raise ValueError(
            f"--phone {phone!r} is not an E.164 number: give the country code and number,"
            " e.g. +15550000001"
        )
    return compact.lstrip("+")


@dataclass(frozen=True)
class PairingCode:
    """A code for the phone: a QR code's text (`qr`, the `n`th; it rotates) or, with a
    phone number, the pairing code to type in (`code`). Pairing material: never logged."""

    kind: Literal["qr", "code"]
    data: str
    n: int = 1


# Called with each code as it comes (synchronously, in order).
OnCode = Callable[[PairingCode], None]


def terminal(show: Callable[[str], None], account: str) -> OnCode:
    """The CLI's way to show a code: the QR drawn in the terminal, or the pairing code,
    each with what to do on the phone."""

    def on_code(code: PairingCode) -> None:
        if code.kind == "qr":
            segno = neonize_module("segno")
            out = io.StringIO()
            segno.make_qr(code.data.encode()).terminal(out=out, compact=True)
            show(out.getvalue())
            show(
                f"{account}: scan this QR code ({code.n}; it rotates) in WhatsApp:"
                " Settings > Linked devices > Link a device"
            )
            return
        show(
            f"{account}: pairing code {code.data}: enter it in WhatsApp on the phone:"
            " Settings > Linked devices > Link a device > Link with phone number"
        )

    return on_code


@dataclass(frozen=True)
class Paired:
    """A pairing that succeeded."""

    account: str
    device_id: str

    def line(self) -> str:
        """The one-line outcome (the number masked)."""
        return f"{self.account}: paired as {mask_device(self.device_id)}"


async def pair(
    bus: Bus,
    store: SessionStore,
    account: str,
    *,
    holder: str,
    lease_ttl: int,
    timeout: float,
    phone: str | None = None,
    force: bool = False,
    actor: str = "",
    via: str = "cli",
    client: str = "",
    attempt: str = "",
    replicas: int = 1,
    show: Callable[[str], None] = print,
    on_code: OnCode | None = None,
    on_started: Callable[[], None] | None = None,
    client_factory: PairingClientFactory = new_pairing_client,
    stop_timeout: float = STOP_TIMEOUT,
) -> Paired:
    """Pair `account` within `timeout` seconds; raise PairingError with one line if it is
    already paired (unless `force`), owned by another holder, or the phone never confirms.
    Each code goes to `on_code` (default: drawn by `show`); `on_started` is called once
    the account's lease is held. The start and the outcome are recorded (attempt id
    `attempt`, a fresh one if empty) with `actor`, `via` and `client`."""
    subjects.check_account(account)
    digits = check_phone(phone) if phone else None
    # A writing command: the runbook pairs before any role has started, so it provisions
    # what it writes to (the `leases` and `devices` buckets), as every role does.
    raise_on_conflict(await ensure_streams(bus.js, replicas=replicas))
    attempt = attempt or new_id()
    where = subjects.accounts(CHANNEL_WHATSAPP, account)
    started = PairingStarted(
        account=account,
        attempt=attempt,
        actor=actor,
        via=via,
        client=client,
        by_code=digits is not None,
        force=force,
    )
    await bus.publish(where, started)
    try:
        paired = await _pair(
            bus,
            store,
            account,
            holder=holder,
            lease_ttl=lease_ttl,
            timeout=timeout,
            phone=digits,
            force=force,
            actor=actor,
            via=via,
            client=client,
            show=show,
            on_code=on_code or terminal(show, account),
            on_started=on_started,
            client_factory=client_factory,
            stop_timeout=stop_timeout,
        )
    except BaseException as exc:
        reason = str(exc) if isinstance(exc, PairingError) else f"{account}: {_failure(exc)}"
        with contextlib.suppress(Exception):  # the outcome the caller sees is the error
            await asyncio.shield(bus.publish(where, _finished(started, "failed", reason=reason)))
        raise
    await bus.publish(where, _finished(started, "paired", device=mask_device(paired.device_id)))
    return paired


def _finished(
    started: PairingStarted, outcome: PairingOutcome, *, device: str = "", reason: str = ""
) -> PairingFinished:
    return PairingFinished(
        account=started.account,
        attempt=started.attempt,
        outcome=outcome,
        device=device,
        reason=reason,
        actor=started.actor,
        via=started.via,
    )


def _failure(exc: BaseException) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return "the pairing was stopped (its process is shutting down); nothing recorded"
    return f"pairing failed ({type(exc).__name__}); nothing recorded"


async def _pair(
    bus: Bus,
    store: SessionStore,
    account: str,
    *,
    holder: str,
    lease_ttl: int,
    timeout: float,
    phone: str | None,
    force: bool,
    actor: str,
    via: str,
    client: str,
    show: Callable[[str], None],
    on_code: OnCode,
    on_started: Callable[[], None] | None,
    client_factory: PairingClientFactory,
    stop_timeout: float,
) -> Paired:
    registry = DeviceRegistry(bus, CHANNEL_WHATSAPP)
    existing = await registry.get(account)
    if existing is not None and not force:
        if existing.device_id in await devices_in_store(store):
            raise PairingError(
                f"{account}: already paired as {mask_device(existing.device_id)}:"
                " --force to re-pair (removes that device)"
            )
        show(
            f"{account}: the recorded device {mask_device(existing.device_id)} is no longer"
            " in the session store; pairing a new one"
        )
    lease = await _take_lease(
        bus, account, holder=holder, ttl=lease_ttl, actor=actor, via=via, client=client
    )
    lost = asyncio.Event()
    keeper = asyncio.create_task(_keep(lease, lost))
    try:
        if existing is not None:
            # Only now, under the lease: no owner can be running on that device.
            if await asyncio.to_thread(delete_device, store, existing.device_id):
                show(f"{account}: removed the old device {mask_device(existing.device_id)}")
            await registry.forget(account)
        if on_started is not None:
            on_started()
        device_id = await _run_pairing(
            store,
            account,
            timeout=timeout,
            phone=phone,
            on_code=on_code,
            lost=lost,
            client_factory=client_factory,
            stop_timeout=stop_timeout,
        )
        await registry.record(account, device_id, by=actor or holder)
        return Paired(account=account, device_id=device_id)
    finally:
        keeper.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await keeper
        await lease.release()


async def _take_lease(
    bus: Bus, account: str, *, holder: str, ttl: int, actor: str, via: str, client: str
) -> Lease:
    lease = Lease(bus, CHANNEL_WHATSAPP, account, holder, ttl)
    if await lease.try_acquire():
        return lease
    kv = await bus.js.key_value(LEASES.name)
    found = await read_lease(kv, subjects.lease_key(CHANNEL_WHATSAPP, account))
    if found is not None and found[0].parked:
        # A parked account waits for an operator -- pairing is that operator's act. One
        # revision-checked write replaces the marker by our lease: a delete first would
        # wake the standbys, and one would take the account (and park it again, unpaired).
        was = found[0].parked
        if await lease.take_parked(found[1]):
            await bus.publish(
                subjects.accounts(CHANNEL_WHATSAPP, account),
                AccountResumed(
                    account=account,
                    actor=actor,
                    reason="svc whatsapp pair",
                    client=client,
                    via=via,
                ),
            )
            log.info(
                "took over a parked account to pair it", extra={"account": account, "was": was}
            )
            return lease
        found = await read_lease(kv, subjects.lease_key(CHANNEL_WHATSAPP, account))
    if found is None:  # it expired just now: one more try
        if await lease.try_acquire():
            return lease
        found = await read_lease(kv, subjects.lease_key(CHANNEL_WHATSAPP, account))
    owner = f"{found[0].holder} (token {found[0].token})" if found else "another holder"
    raise PairingError(
        f"{account} is owned by {owner}: pairing would disturb it; run"
        f" 'svc accounts handover {account}' and stop its workers first"
    )


async def _keep(lease: Lease, lost: asyncio.Event) -> None:
    """Renew the lease for as long as the pairing runs (it outlasts any TTL)."""
    while True:
        await asyncio.sleep(max(0.5, lease.ttl / 3))
        try:
            if not await lease.renew():
                lost.set()
                return
        except Exception as exc:  # a NATS hiccup: the deadline decides, as for any holder
            log.warning("pairing lease renew failed", extra={"error": repr(exc)})
            if not lease.valid():
                lost.set()
                return


async def _run_pairing(
    store: SessionStore,
    account: str,
    *,
    timeout: float,
    phone: str | None,
    on_code: OnCode,
    lost: asyncio.Event,
    client_factory: PairingClientFactory,
    stop_timeout: float,
) -> str:
    """Drive one neonize client until the phone confirms; the new device's JID."""
    events_module: Any = neonize_module("neonize.aioze.events")
    pair_status = events_module.PairStatusEv
    # neonize delivers callbacks to a module-global loop it sets only once: point it at
    # this one (a second pairing in one process would otherwise post to a closed loop).
    events_module.event_global_loop = asyncio.get_running_loop()
    inbox: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()

    # Handlers only enqueue: neonize runs them unawaited and drops their exceptions.
    async def on_qr(_: Any, data: bytes) -> None:
        inbox.put_nowait(("qr", data))

    async def on_pair(_: Any, event: Any) -> None:
        inbox.put_nowait(("pair", event))

    client = client_factory(store_name(store), client_uuid(account))
    client.qr(on_qr)  # before connect(): the subscriptions are fixed then
    client.event(pair_status)(on_pair)
    deadline = time.monotonic() + timeout
    codes = 0
    connecting: asyncio.Task[Any] | None = None
    try:
        connecting = await client.connect()
        assert connecting is not None
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise PairingError(
                    f"{account}: timed out after {timeout:g} s without a confirmation from the"
                    " phone; nothing was recorded (run the command again)"
                )
            getter = asyncio.ensure_future(inbox.get())
            waiter = asyncio.ensure_future(lost.wait())
            done, _ = await asyncio.wait(
                {getter, waiter, connecting}, timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            getter.cancel()
            waiter.cancel()
            if lost.is_set():
                raise PairingError(f"{account}: lost the lease while pairing; nothing recorded")
            if getter in done and not getter.cancelled():
                kind, payload = getter.result()
                if kind == "qr":
                    codes += 1
                    await _on_code(client, account, payload, codes, phone, on_code)
                elif payload.Status == pair_status.SUCCESS:
                    return jid_string(payload.ID)
                else:
                    raise PairingError(f"{account}: the phone refused the pairing: {payload.Error}")
            elif connecting in done:
                error = connecting.exception() if not connecting.cancelled() else None
                raise PairingError(f"{account}: could not reach WhatsApp: {error or 'stopped'}")
    finally:
        try:
            await asyncio.wait_for(client.stop(), stop_timeout)
        except TimeoutError:
            log.warning("neonize stop timed out", extra={"account": account})
        if connecting is not None and not connecting.done():
            connecting.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await connecting


async def _on_code(
    client: Any, account: str, data: bytes, n: int, phone: str | None, on_code: OnCode
) -> None:
    if phone is None:
        on_code(PairingCode(kind="qr", data=data.decode(errors="replace"), n=n))
        return
    if n == 1:
        # neonize answers PairPhone only after the first QR ("client is nil" before it).
        try:
            code = await client.PairPhone(phone, True)
        except Exception as exc:
            raise PairingError(f"{account}: WhatsApp refused the pairing code: {exc}") from None
        on_code(PairingCode(kind="code", data=str(code)))
