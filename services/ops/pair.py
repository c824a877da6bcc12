"""Pairing operations: `svc whatsapp pair` runs the procedure in its own process; the
console asks a `whatsapp` worker to run it (`start_pairing`) and reads the attempt's
codes and outcome back (`pairing_state`), over core NATS request/reply (contracts/
pairing.py). The procedure itself is services/whatsapp/pairing.py, shared by both."""

from __future__ import annotations

import msgspec
import nats.errors

from contracts import subjects
from contracts.events import CHANNEL_WHATSAPP
from contracts.pairing import (
    PairingStart,
    PairingState,
    StartPairing,
    attempt_subject,
    check_attempt,
    start_subject,
)
from services.runtime.bus import Bus
from services.runtime.errors import ServiceError
from services.whatsapp.pairing import (
    Paired,
    PairingClientFactory,
    PairingCode,
    PairingError,
    check_phone,
    new_pairing_client,
    pair,
    terminal,
)

__all__ = [
    "NoPairingWorkerError",
    "Paired",
    "PairingAttemptGoneError",
    "PairingClientFactory",
    "PairingCode",
    "PairingError",
    "PairingRefusedError",
    "check_phone",
    "new_pairing_client",
    "pair",
    "pairing_state",
    "start_pairing",
    "terminal",
]

START_TIMEOUT = 30.0  # the worker answers once it holds the lease (or refuses at once)
STATE_TIMEOUT = 5.0


class NoPairingWorkerError(ServiceError):
    """No `whatsapp` worker on the neonize transport answers pairing requests."""


class PairingRefusedError(PairingError):
    """The worker refused the pairing (one line); `status` says why (409, 422)."""

    def __init__(self, line: str, status: int) -> None:
        super().__init__(line)
        self.status = status


class PairingAttemptGoneError(ServiceError):
    """No worker knows the attempt (never started, ended long ago, or its worker stopped)."""


async def start_pairing(
    bus: Bus,
    account: str,
    *,
    phone: str = "",
    force: bool = False,
    actor: str = "",
    via: str = "web",
    client: str = "",
    timeout: float = START_TIMEOUT,
) -> str:
    """Have a `whatsapp` worker pair `account`; the attempt id, or PairingRefusedError
    (one line: owned by another holder, already paired...) / NoPairingWorkerError."""
    subjects.check_account(account)
    if phone:
        check_phone(phone)
    request = StartPairing(
        account=account, phone=phone, force=force, actor=actor, via=via, client=client
    )
    try:
        reply = await bus.nc.request(
            start_subject(CHANNEL_WHATSAPP), msgspec.json.encode(request), timeout=timeout
        )
    except nats.errors.NoRespondersError:
        raise NoPairingWorkerError(
            f"{account}: no whatsapp worker serves pairing: start 'svc run whatsapp' (or all)"
            " with WHATSAPP_TRANSPORT=neonize on the host of the session store"
        ) from None
    answer = msgspec.json.decode(reply.data, type=PairingStart)
    if answer.error:
        raise PairingRefusedError(answer.error, answer.status)
    return answer.attempt


async def pairing_state(
    bus: Bus, account: str, attempt: str, *, timeout: float = STATE_TIMEOUT
) -> PairingState:
    """The attempt's state now (its current code, or how it ended), from its worker."""
    subjects.check_account(account)
    check_attempt(attempt)
    gone = PairingAttemptGoneError(
        f"{account}: no pairing attempt {attempt} is running or recently ended"
        " (its worker stopped, or it ended over 10 minutes ago): start a new one"
    )
    try:
        reply = await bus.nc.request(
            attempt_subject(CHANNEL_WHATSAPP, attempt), b"", timeout=timeout
        )
    except nats.errors.NoRespondersError:
        raise gone from None
    state = msgspec.json.decode(reply.data, type=PairingState)
    if state.account != account:
        raise gone
    return state
