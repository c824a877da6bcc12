"""The neonize transport: real WhatsApp through neonize (whatsmeow), one socket per account.

A `NeonizeSession` lives as long as its owner holds the account's lease (ADR 0021):

- before any client exists, the account's device (the `devices` bucket) must be in the
  session store (`neonize_store.check_resumable`); else the session ends `needs_pairing`
  without ever building a client (resuming a missing device aborts the interpreter);
- a fresh `NewAClient` per connection attempt, resumed by the device's JID, its handlers
  registered before `connect()`; each handler maps its event (pure, `neonize_map`) and
  makes ONE `events.post(...)`: neonize runs handlers unawaited from the Go thread, so a
  handler that awaits would lose order, and its exceptions would vanish;
- an initial connect that fails on the network is retried inside the session with a
  fresh client and capped, jittered exponential backoff (the lease is kept: no
  release/reacquire ping-pong); any other connect error ends it `connect_failed`;
- the ending signals (StreamReplaced, LoggedOut, TemporaryBan, ClientOutdated) are posted
  and end the session; Disconnected is posted and the session lives on (whatsmeow
  reconnects by itself; a send meanwhile raises NotConnectedError and the job waits);
- every send is bounded by `send_timeout`; a timeout or an "outcome unknown" Go error is
  an `UncertainSendError`; `stop()` is bounded by `stop_timeout` and abandoned after it.

The test seam `SVC_TEST_NEONIZE_BRIDGE=module:attr` swaps the Go bridge of each freshly
built client (`install(client, account)`); only modules under `tests.` are honoured.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import importlib
import logging
import os
import random
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

from contracts.payloads import PresenceAction
from services.channel.devices import DeviceRegistry
from services.channel.port import (
    ClientOutdated,
    Connected,
    Disconnected,
    Events,
    Incoming,
    LoggedOut,
    NeedsPairing,
    NotConnectedError,
    Outgoing,
    Receipt,
    SessionEnd,
    SessionEnding,
    StaleFenceError,
    StreamReplaced,
    TemporaryBan,
    TransportError,
    UncertainSendError,
    end_of,
)
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.settings import NeonizeSettings, SessionStore
from services.whatsapp import neonize_map
from services.whatsapp.neonize_store import (
    StoreError,
    check_resumable,
    client_uuid,
    device_jid,
    mask_device,
    neonize_module,
    store_name,
)

log = logging.getLogger(__name__)

CHANNEL = "whatsapp"
BRIDGE_ENV = "SVC_TEST_NEONIZE_BRIDGE"
# (store name, device JID protobuf, client uuid) -> a NewAClient-like object
ClientFactory = Callable[[str, Any, str], Any]
# (a freshly built client, account) -> None: swaps its Go bridge (tests only)
BridgeInstaller = Callable[[Any, str], None]

# The neonize events a session subscribes to (neonize_map.session_event maps them).
_EVENT_NAMES = (
    "MessageEv",
    "ReceiptEv",
    "ConnectedEv",
    "DisconnectedEv",
    "ConnectFailureEv",
    "KeepAliveTimeoutEv",
    "KeepAliveRestoredEv",
    "StreamReplacedEv",
    "LoggedOutEv",
    "TemporaryBanEv",
    "ClientOutdatedEv",
)

# Substrings (lower case) of a failed connect that mean the network, not the client: DNS,
# refused, reset, timeouts, a dropped handshake. Anything else ends the session.
_NETWORK_ERRORS = (
    "failed to dial",
    "dial tcp",
    "no such host",
    "connection refused",
    "connection reset",
    "network is unreachable",
    "no route to host",
    "i/o timeout",
    "timeout",
    "timed out",
    "deadline exceeded",
    "eof",
    "handshake",
    "websocket",
    "broken pipe",
    "temporary failure",
)


def is_network_error(text: str) -> bool:
    """True if a failed connect's error text is a network failure (retry with backoff)."""
    lowered = text.lower()
    return any(needle in lowered for needle in _NETWORK_ERRORS)


def new_client(name: str, jid: Any, uuid: str) -> Any:
    """A real neonize client resuming the device `jid` from the store `name`."""
    module = neonize_module("neonize.aioze.client")
    return module.NewAClient(name, jid=jid, uuid=uuid)


@functools.cache
def load_bridge(spec: str) -> BridgeInstaller:
    """The test seam's installer `module:attr`; only `tests.` modules (never importable
    from an installed wheel). ConfigError (one line) for anything else. Loaded (and
    logged) once per process: start-up checks it, then the transport uses it."""
    module_name, _, attr = spec.partition(":")
    if not module_name.startswith("tests.") or not attr:
        raise ConfigError(
            f"{BRIDGE_ENV}={spec!r} is refused: it is a test seam and takes only"
            " 'tests.<module>:<callable>'; unset it in production"
        )
    try:
        installer = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"{BRIDGE_ENV}={spec!r} cannot be loaded: {exc}") from None
    log.warning(
        "TEST SEAM ACTIVE: neonize's Go bridge is replaced, no real WhatsApp traffic",
        extra={"seam": BRIDGE_ENV, "installer": spec},
    )
    return installer  # type: ignore[no-any-return]


def bridge_from_env(env: dict[str, str] | os._Environ[str] | None = None) -> BridgeInstaller | None:
    """The installer named by SVC_TEST_NEONIZE_BRIDGE, or None when it is unset."""
    spec = (os.environ if env is None else env).get(BRIDGE_ENV, "").strip()
    return load_bridge(spec) if spec else None


def _jid(text: str) -> Any:
    """A JID protobuf from `user@server` (a chat or sender JID as the channel layer has it)."""
    user, _, server = text.partition("@")
    build: Any = neonize_module("neonize.utils.jid").build_jid
    return build(user, server or "s.whatsapp.net")


def phone_jid(device_id: str) -> str:
    """The account's own phone JID from its device JID (`1555…:7@s.whatsapp.net`)."""
    user, _, server = device_id.partition("@")
    return f"{user.partition(':')[0].partition('.')[0]}@{server}"


class NeonizeTransport:
    """Opens neonize sessions: one fresh client per session, only under the lease."""

    name = "neonize"
    channel = CHANNEL
    inbound = None  # one socket per account: only the lease holder receives

    def __init__(
        self,
        bus: Bus,
        store: SessionStore,
        settings: NeonizeSettings | None = None,
        *,
        client_factory: ClientFactory = new_client,
        bridge: BridgeInstaller | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.bus = bus
        self.store = store
        self.settings = settings or NeonizeSettings()
        self.send_timeout = self.settings.send_timeout
        self.client_factory = client_factory
        self.bridge = bridge
        self.rng = rng or random.Random()
        self.devices = DeviceRegistry(bus, CHANNEL)
        # neonize's Go side reads NEONIZE_BOT_TAG on every 1:1 send: set it explicitly so
        # no inherited value decides whether the bot label is shown (process-wide).
        os.environ.update(neonize_map.bot_tag(self.settings.bot_tag))

    @asynccontextmanager
    async def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AsyncIterator[NeonizeSession]:
        """Attach to `account`: check its device, connect a fresh client; stop it on exit."""
        session = NeonizeSession(self, account, events, receive=receive)
        await session.start()
        try:
            yield session
        finally:
            await session.close()


class NeonizeSession(SessionEnding):
    """One account's whatsmeow socket, held while the owner holds the lease."""

    reports_receipts = True

    def __init__(
        self, transport: NeonizeTransport, account: str, events: Events, *, receive: bool
    ) -> None:
        super().__init__()
        self.transport = transport
        self.settings = transport.settings
        self.account = account
        self.events = events
        self.receive = receive
        self.send_timeout = transport.send_timeout
        self.device_id = ""
        self.account_jids: tuple[str, ...] = ()
        self.connects = 0  # connection attempts (clients built)
        self._client: Any = None
        self._connecting: asyncio.Task[Any] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closing = False
        self._ending = False  # an ending signal arrived; the end itself may follow a write
        self._delay = self.settings.backoff_initial
        self._where = {"account": account, "channel": CHANNEL}
        self._heard: float | None = None  # monotonic time the network last said anything

    # -- lifecycle -------------------------------------------------------------------

    async def start(self) -> None:
        """Open the first client (or end the session); the retries run in the background."""
        # neonize posts callbacks to a module-global loop it sets only once: this one.
        events_module: Any = neonize_module("neonize.aioze.events")
        events_module.event_global_loop = asyncio.get_running_loop()
        try:
            await self._open()
        except StoreError as exc:
            self._failed_attempt(str(exc))
        self._runner = asyncio.create_task(self._run(), name=f"neonize-{self.account}")

    async def close(self) -> None:
        """Stop the client (bounded by stop_timeout) and the retry loop; never blocks the
        owner's exit on a Go call that hangs."""
        self._closing = True
        if self._runner is not None:
            self._runner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._runner
        for task in list(self._tasks):
            with contextlib.suppress(Exception):
                await asyncio.wait_for(task, self.settings.stop_timeout)
        client, self._client = self._client, None
        if client is not None:
            await self._stop(client)

    async def _open(self) -> None:
        """Check the device is resumable, then build, wire and connect a fresh client."""
        record = await self.transport.devices.get(self.account)
        self.device_id = record.device_id if record else ""
        why = await check_resumable(self.transport.store, self.device_id or None)
        if why is not None:
            reason = why.removeprefix("needs_pairing: ")
            log.error("account needs pairing", extra={**self._where, "reason": reason})
            self.events.post(NeedsPairing(reason=reason))
            self.end(SessionEnd("needs_pairing", f"needs pairing: {reason}"))
            return
        self.account_jids = (phone_jid(self.device_id),)
        client = self.transport.client_factory(
            store_name(self.transport.store),
            device_jid(self.device_id),
            client_uuid(self.account),
        )
        if self.transport.bridge is not None:
            self.transport.bridge(client, self.account)  # before handlers and connect
        events_module = neonize_module("neonize.aioze.events")
        for name in _EVENT_NAMES:
            client.event(getattr(events_module, name))(self._handler(client))
        self.connects += 1
        self._client = client
        log.info(
            "neonize connecting",
            extra={**self._where, "device": mask_device(self.device_id), "attempt": self.connects},
        )
        self._connecting = await client.connect()

    async def _run(self) -> None:
        """Watch the client's connect task; on a network failure retry with a fresh client."""
        while not self._closing and not self._ending and self._end is None:
            task = self._connecting
            if task is None:  # the last attempt failed before a client was built
                await self._backoff()
                with contextlib.suppress(StoreError):
                    await self._open()
                continue
            try:
                # Shielded: cancelling neonize's connect task makes it call the real Go
                # Stop() synchronously on the loop (it blocks while a dial is in flight).
                await asyncio.shield(task)
                reason = "the client stopped"
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                reason = str(exc) or type(exc).__name__
            if self._closing or self._ending or self._end is not None:
                return
            self._connecting = None
            client, self._client = self._client, None
            if client is not None:
                await self._stop(client)
            if not is_network_error(reason) and reason != "the client stopped":
                log.error("neonize connect failed", extra={**self._where, "reason": reason})
                self.end(SessionEnd("connect_failed", f"connect failed: {reason}"))
                return
            self._failed_attempt(reason)
            await self._backoff()
            try:
                await self._open()
            except StoreError as exc:
                self._failed_attempt(str(exc))

    def _failed_attempt(self, reason: str) -> None:
        log.warning(
            "neonize connect failed; retrying with backoff",
            extra={**self._where, "reason": reason, "next_in_s": round(self._delay, 2)},
        )
        self.events.post(Disconnected(reason=f"connect failed: {reason}"))

    async def _backoff(self) -> None:
        wait = self._delay * self.transport.rng.uniform(0.5, 1.0)
        self._delay = min(self._delay * 2, self.settings.backoff_max)
        await asyncio.sleep(wait)

    async def _stop(self, client: Any) -> None:
        try:
            await asyncio.wait_for(client.stop(), self.settings.stop_timeout)
        except TimeoutError:
            log.warning(
                "neonize stop did not return in time; abandoned",
                extra={**self._where, "timeout_s": self.settings.stop_timeout},
            )
        except Exception as exc:
            log.warning("neonize stop failed", extra={**self._where, "error": repr(exc)})

    # -- events ----------------------------------------------------------------------

    def _handler(self, client: Any) -> Callable[[Any, Any], Any]:
        async def handle(_: Any, ev: Any) -> None:
            # Nothing awaited: neonize schedules handlers in the order whatsmeow emitted
            # the events, so posting at once keeps that order.
            if client is self._client and not self._closing:
                self._on_event(ev)

        return handle

    def _on_event(self, ev: Any) -> None:
        mapped = neonize_map.session_event(self.account_jids, ev)
        if not isinstance(mapped, Disconnected):
            # Anything the network sent (a message, a receipt, presence, a restored
            # keepalive...) proves the socket is alive; a Disconnected is our own verdict.
            self._heard = time.monotonic()
        match mapped:
            case neonize_map.Dropped(reason=reason):
                log.debug("neonize event dropped", extra={**self._where, "why": reason})
            case Incoming():
                if self.receive:
                    self.events.post(mapped)
            case Receipt() | Disconnected():
                self.events.post(mapped)
            case Connected():
                self._delay = self.settings.backoff_initial
                self.events.post(mapped)
            case LoggedOut():
                self._ending = True  # whatsmeow may return from Neonize(): no retry
                self.events.post(mapped)
                task = asyncio.create_task(self._logged_out(mapped))
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            case StreamReplaced() | ClientOutdated() | TemporaryBan() | NeedsPairing():
                self.events.post(mapped)
                end = end_of(mapped)
                assert end is not None
                self.end(end)

    async def _logged_out(self, event: LoggedOut) -> None:
        """whatsmeow deleted the device: forget it, so nobody resumes it (that aborts)."""
        try:
            await self.transport.devices.forget(self.account)
        except Exception as exc:
            log.error("could not forget the device", extra={**self._where, "error": repr(exc)})
        end = end_of(event)
        assert end is not None
        self.end(end)

    # -- sending ---------------------------------------------------------------------

    async def send(self, out: Outgoing) -> str:
        """Send `out` as a plain or quoting text message; the id WhatsApp gave it."""
        client = self._client
        if client is None or self._end is not None:
            raise NotConnectedError("neonize: not connected (reconnecting)")
        message = neonize_map.outgoing_message(out)
        send_error = neonize_module("neonize.exc").SendMessageError
        # The last check: nothing is awaited between it and the call into Go.
        if time.monotonic() >= out.fence.deadline:
            raise StaleFenceError(
                f"neonize: send refused, past its lease deadline (token {out.fence.token})"
            )
        try:
            response = await asyncio.wait_for(
                client.send_message(out.chat, message), self.send_timeout
            )
        except TimeoutError:
            raise UncertainSendError(
                f"neonize: no answer within {self.send_timeout:g} s: the message may have been sent"
            ) from None
        except send_error as exc:
            raise self._send_failed(str(exc)) from None
        self._heard = time.monotonic()  # the server acknowledged it
        return str(response.ID)

    # -- optional capabilities (ADR 0025) --------------------------------------------

    def last_heard(self) -> float | None:
        """When the network last said anything to this session (None: nothing yet).
        whatsmeow's successful keepalives raise no event, so on a quiet number this is
        the last event or acknowledged send (see ADR 0025 on false positives)."""
        return self._heard

    async def presence(
        self, chat: str, action: PresenceAction, message_ids: tuple[str, ...], sender: str = ""
    ) -> None:
        """Mark messages read, or show/clear "typing..." in `chat`: bounded by the send
        timeout; a failure is logged, never raised (presence is best effort)."""
        client = self._client
        if client is None or self._end is not None:
            return
        enums: Any = neonize_module("neonize.utils.enum")
        try:
            if action == "read":
                if not message_ids:
                    return
                call = client.mark_read(
                    *message_ids,
                    chat=_jid(chat),
                    sender=_jid(sender or chat),
                    receipt=enums.ReceiptType.READ,
                )
            else:
                state = (
                    enums.ChatPresence.CHAT_PRESENCE_COMPOSING
                    if action == "typing"
                    else enums.ChatPresence.CHAT_PRESENCE_PAUSED
                )
                call = client.send_chat_presence(
                    _jid(chat), state, enums.ChatPresenceMedia.CHAT_PRESENCE_MEDIA_TEXT
                )
            await asyncio.wait_for(call, self.send_timeout)
        except Exception as exc:
            log.info(
                "neonize presence not shown",
                extra={**self._where, "action": action, "error": repr(exc)},
            )

    def _send_failed(self, error: str) -> TransportError:
        kind = neonize_map.classify_send_error(error)
        text = f"neonize: {error}"
        match kind:
            case "unknown":
                return UncertainSendError(text)
            case "permanent":
                return TransportError(text, permanent=True)
            case "transient":
                return TransportError(text, permanent=False)
            case "offline":
                return NotConnectedError(text)
            case "account":
                reason = f"barred from messaging new contacts ({error})"
                log.error("account barred by WhatsApp", extra={**self._where, "reason": reason})
                self.events.post(TemporaryBan(reason=reason))
                # No `until`: an operator resumes it. The job waits for the next owner.
                self.end(SessionEnd("banned", f"banned: {reason}"))
                return TransportError(text, permanent=False)
