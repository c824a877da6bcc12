"""Pairing for the console (issue 18): every `whatsapp`/`all` process on the neonize
transport serves pairing requests, because that is where neonize and the session store
are (the web role is stateless and holds no WhatsApp session).

- `svc.pair.whatsapp.start` (queue group `pairing`: one worker takes each request): run
  `services.whatsapp.pairing.pair()` -- the CLI's procedure, lease, device registry, deadline and
  all -- in a task; answer with the attempt id once the lease is held, or the one-line
  refusal (owned by another holder, already paired, bad phone number).
- `svc.pair.whatsapp.attempt.<id>`: this process alone answers the attempt's state (the
  current QR code or pairing code, then the outcome), kept `keep` seconds after the end.

QR codes and pairing codes live only in this process's memory and in the replies to the
one who asks; they never reach a log line, an event or a stream. The start and the
outcome are recorded by `pair()` as PairingStarted / PairingFinished with the actor.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from contracts import subjects
from contracts.events import CHANNEL_WHATSAPP, new_id
from contracts.pairing import (
    PAIRING_QUEUE,
    PairingPhase,
    PairingStart,
    PairingState,
    StartPairing,
    attempt_subject,
    start_subject,
)
from services.runtime.bus import Bus
from services.runtime.settings import SessionStore
from services.whatsapp.neonize import BridgeInstaller, bridge_from_env
from services.whatsapp.pairing import (
    PairingClientFactory,
    PairingCode,
    PairingError,
    check_phone,
    new_pairing_client,
    pair,
)

log = logging.getLogger(__name__)

PAIRING_TIMEOUT = 180.0  # whatsmeow rotates its codes for ~160 s, then gives up
START_WAIT = 20.0  # how long a start request waits for the lease before answering anyway
KEEP = 600.0  # how long an ended attempt's state stays readable


@dataclass
class _Attempt:
    """One pairing's state, as its readers see it (in this process only)."""

    attempt: str
    account: str
    phase: PairingPhase = "starting"
    seq: int = 0
    qr: str = ""
    qr_number: int = 0
    code: str = ""
    line: str = ""
    started: asyncio.Event = field(default_factory=asyncio.Event)
    ended: asyncio.Event = field(default_factory=asyncio.Event)

    def move(self, phase: PairingPhase, **values: Any) -> None:
        self.phase = phase
        self.qr, self.qr_number, self.code, self.line = "", 0, "", ""
        for name, value in values.items():
            setattr(self, name, value)
        self.seq += 1
        if phase in ("paired", "failed"):
            self.ended.set()

    def on_code(self, code: PairingCode) -> None:
        if code.kind == "qr":
            self.move("qr", qr=code.data, qr_number=code.n)
        else:
            self.move("code", code=code.data)

    def view(self) -> PairingState:
        return PairingState(
            attempt=self.attempt,
            account=self.account,
            phase=self.phase,
            seq=self.seq,
            qr=self.qr,
            qr_number=self.qr_number,
            code=self.code,
            line=self.line,
        )


class PairingService:
    """Serves the console's pairing requests on one `whatsapp` process (see the module)."""

    def __init__(
        self,
        bus: Bus,
        store: SessionStore,
        holder: str,
        *,
        lease_ttl: int,
        replicas: int = 1,
        timeout: float = PAIRING_TIMEOUT,
        keep: float = KEEP,
        client_factory: PairingClientFactory = new_pairing_client,
        bridge: BridgeInstaller | None = None,
    ) -> None:
        self.bus = bus
        self.store = store
        self.holder = holder
        self.lease_ttl = lease_ttl
        self.replicas = replicas
        self.timeout = timeout
        self.keep = keep
        self.client_factory = client_factory
        self.bridge = bridge if bridge is not None else bridge_from_env()
        self._tasks: set[asyncio.Task[None]] = set()

    async def run(self, stop: asyncio.Event) -> None:
        """Answer start requests until `stop`; then stop every pairing still running."""
        sub = await self.bus.nc.subscribe(
            start_subject(CHANNEL_WHATSAPP), queue=PAIRING_QUEUE, cb=self._on_start
        )
        try:
            await stop.wait()
        finally:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    def _spawn(self, work: Any, name: str) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(work, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _on_start(self, msg: Msg) -> None:
        # Each request in a task of its own: one pairing's start never waits for another's.
        self._spawn(self._start(msg), "pairing-start")

    async def _start(self, msg: Msg) -> None:
        try:
            request = msgspec.json.decode(msg.data, type=StartPairing)
            subjects.check_account(request.account)
            if request.phone:
                check_phone(request.phone)
        except (msgspec.DecodeError, ValueError) as exc:
            await _answer(msg, PairingStart(error=str(exc), status=422))
            return
        state = _Attempt(attempt=new_id(), account=request.account)
        reader = await self.bus.nc.subscribe(
            attempt_subject(CHANNEL_WHATSAPP, state.attempt), cb=partial_reply(state)
        )
        self._spawn(self._pair(request, state, reader), f"pairing-{request.account}")
        waiters = {
            asyncio.ensure_future(state.started.wait()),
            asyncio.ensure_future(state.ended.wait()),
        }
        try:
            await asyncio.wait(waiters, timeout=START_WAIT, return_when="FIRST_COMPLETED")
        finally:
            for waiter in waiters:
                waiter.cancel()
        if state.phase == "failed" and not state.started.is_set():
            await _answer(msg, PairingStart(error=state.line, status=409))
            return
        await _answer(msg, PairingStart(attempt=state.attempt))

    async def _pair(self, request: StartPairing, state: _Attempt, reader: Subscription) -> None:
        account = request.account
        bridge = self.bridge
        factory = self.client_factory

        def build(name: str, uuid: str) -> Any:
            client = factory(name, uuid)
            if bridge is not None:  # the test seam (SVC_TEST_NEONIZE_BRIDGE), tests only
                bridge(client, account)
            return client

        log.info(
            "pairing started",
            extra={"account": account, "attempt": state.attempt, "actor": request.actor},
        )
        try:
            paired = await pair(
                self.bus,
                self.store,
                account,
                holder=self.holder,
                lease_ttl=self.lease_ttl,
                timeout=self.timeout,
                phone=request.phone or None,
                force=request.force,
                actor=request.actor,
                via=request.via,
                client=request.client,
                attempt=state.attempt,
                replicas=self.replicas,
                show=lambda line: log.info(line, extra={"attempt": state.attempt}),
                on_code=state.on_code,
                on_started=state.started.set,
                client_factory=build,
            )
            state.move("paired", line=paired.line())
        except PairingError as exc:
            state.move("failed", line=str(exc))
        except asyncio.CancelledError:
            state.move("failed", line=f"{account}: the pairing was stopped (worker shutdown)")
            with contextlib.suppress(Exception):
                await reader.unsubscribe()
            raise
        except Exception as exc:
            log.exception("pairing failed", extra={"account": account, "attempt": state.attempt})
            state.move("failed", line=f"{account}: pairing failed ({type(exc).__name__})")
        log.info(
            "pairing ended",
            extra={"account": account, "attempt": state.attempt, "phase": state.phase},
        )
        try:
            await asyncio.sleep(self.keep)  # the outcome stays readable for a while
        finally:
            with contextlib.suppress(Exception):
                await reader.unsubscribe()


def partial_reply(state: _Attempt) -> Callable[[Msg], Any]:
    """The attempt subject's handler: answer with the state as it is now."""

    async def reply(msg: Msg) -> None:
        await _answer(msg, state.view())

    return reply


async def _answer(msg: Msg, answer: msgspec.Struct) -> None:
    if msg.reply:
        with contextlib.suppress(Exception):  # the asker gave up: nothing to do
            await msg.respond(msgspec.json.encode(answer))
