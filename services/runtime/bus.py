"""The NATS connection: JetStream context, traced publishing of contract messages.

A connection that is gone for good -- nats-py closed it (a server `-ERR`, a refused
login on reconnect) or its read loop died -- is reported through `Bus.lost`; a role
exits on it (ADR 0012) instead of living on with nobody listening.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import ssl
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, NoReturn

import nats
import nats.protocol.parser
from nats.aio.client import PING_PROTO, Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import PubAck

from contracts.codec import encode
from contracts.events import Message
from services.runtime.errors import (
    ConfigError,
    NatsConnectionLostError,
    NatsRefusedError,
    NatsUnavailableError,
)
from services.runtime.settings import NatsSecurity
from services.runtime.telemetry import publish_span, spans_enabled, trace_context

log = logging.getLogger(__name__)

# The wire protocol separates a MSG/HMSG line's arguments by spaces and tabs only (as
# nats-server's own parser does), so a subject may hold a form feed or vertical tab that a
# raw publisher put there. nats-py's patterns split on `\s`, which includes both: such a
# subject read as "malformed MSG" made the client reconnect and the message come back,
# forever. These are nats-py's patterns with only the separators made exact.
_ARG = rb"[^ \t\r\n]+"
nats.protocol.parser.MSG_RE = re.compile(
    rb"\AMSG[ \t]+(" + _ARG + rb")[ \t]+(" + _ARG + rb")[ \t]+((" + _ARG + rb")[ \t]+)?(\d+)\r\n"
)
nats.protocol.parser.HMSG_RE = re.compile(
    rb"\AHMSG[ \t]+(" + _ARG + rb")[ \t]+(" + _ARG + rb")[ \t]+((" + _ARG + rb")[ \t]+)?"
    rb"(\d+)[ \t]+(\d+)\r\n"
)


class Bus:
    """A connected client: `nc` for core NATS, `js` for JetStream, and traced publishing."""

    def __init__(self, nc: Client, js: JetStreamContext, lost: asyncio.Event | None = None) -> None:
        self.nc = nc
        self.js = js
        self.lost = lost or asyncio.Event()  # set once the connection is closed for good
        self.lost_reason = ""
        # Set by the connection's error callback: nats-py reports a denied publish or
        # subscribe only there, and what waited on it just times out.
        self.denials: _ErrorReporter | None = None
        # Called with "disconnected", "reconnected" or "lost": an interactive command shows
        # these as one human line instead of log records.
        self.on_state: list[Callable[[str], None]] = []

    def permission_error(self, user: str = "") -> NatsPermissionError | None:
        """The error to end with when a timeout just now followed a permissions violation
        (retrying cannot help), else None."""
        reporter = self.denials
        if reporter is None or reporter.denied is None:
            return None
        if time.monotonic() - reporter.denied_at > _DENIAL_BLAMED_FOR:
            return None
        return NatsPermissionError(permission_message(reporter.denied, user or reporter.user))

    def _state(self, state: str) -> None:
        for listener in self.on_state:
            listener(state)

    async def until_lost(self) -> NoReturn:
        """Wait until the connection is closed for good, then raise NatsConnectionLostError."""
        await self.lost.wait()
        raise self.lost_error()

    def lost_error(self) -> NatsConnectionLostError:
        """The error that ends a process whose connection is closed for good."""
        return NatsConnectionLostError(
            f"NATS connection closed for good ({self.lost_reason or 'closed'}):"
            " exiting so a supervisor restarts this process"
        )

    async def publish(
        self,
        subject: str,
        message: Message,
        *,
        msg_id: str | None = None,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Store `message` on `subject`; `Nats-Msg-Id` (default: the message id) dedupes."""
        return await self.publish_bytes(
            subject, encode(message), msg_id=msg_id or message.id, headers=headers, timeout=timeout
        )

    async def publish_bytes(
        self,
        subject: str,
        data: bytes,
        *,
        msg_id: str,
        headers: dict[str, str] | None = None,
        timeout: float = 5.0,
    ) -> PubAck:
        """Store raw `data` with trace context and `Nats-Msg-Id` headers."""
        if not spans_enabled():  # the default (ADR 0036): headers only, no span, no generator
            stored = _stored(trace_context(), headers, msg_id)
            ack: PubAck = await self.js.publish(subject, data, headers=stored, timeout=timeout)
            return ack
        with publish_span(subject, msg_id) as trace_headers:
            stored = _stored(trace_headers, headers, msg_id)
            ack = await self.js.publish(subject, data, headers=stored, timeout=timeout)
            return ack

    async def publish_async(
        self, subject: str, message: Message, *, msg_id: str | None = None
    ) -> asyncio.Future[PubAck]:
        """Send `message` to be stored (trace context and `Nats-Msg-Id` headers as
        `publish`) without waiting: the future resolves to its PubAck or its error. Writes
        that go together are sent back to back and waited for once (`acked`), with no
        task per write (ADR 0039)."""
        msg_id = msg_id or message.id
        if not spans_enabled():
            stored = _stored(trace_context(), None, msg_id)
            return await self.js.publish_async(subject, encode(message), headers=stored)
        with publish_span(subject, msg_id) as trace_headers:
            stored = _stored(trace_headers, None, msg_id)
            return await self.js.publish_async(subject, encode(message), headers=stored)


def _stored(
    trace_headers: dict[str, str], headers: dict[str, str] | None, msg_id: str
) -> dict[str, str]:
    """The headers a stored message carries: trace context, the caller's, `Nats-Msg-Id`."""
    if headers:
        trace_headers.update(headers)
    trace_headers["Nats-Msg-Id"] = msg_id
    return trace_headers


async def acked(*writes: asyncio.Future[PubAck], timeout: float = 5.0) -> list[PubAck]:
    """Wait for writes sent with `publish_async` (as `js.publish` would, up to `timeout`):
    their acks in order, or the first error; nats.errors.TimeoutError if one never came."""
    try:
        return list(await asyncio.wait_for(asyncio.gather(*writes), timeout))
    except TimeoutError as exc:
        if isinstance(exc, nats.errors.TimeoutError):  # a write's own error
            raise
        raise nats.errors.TimeoutError from None  # as js.publish says it (the writes cancelled)


def take_pending(sub: Any) -> Msg | None:
    """The next message already in a callback-less subscription's queue, without waiting
    (nats-py 2.16 internals, as its own `next_msg` and `fetch` read them), or None. Keeps
    nats-py's byte count right: a count that only grows ends in dropped messages."""
    queue = sub._pending_queue
    if queue.empty():
        return None
    msg: Msg = queue.get_nowait()
    sub._pending_size -= len(msg.data)
    queue.task_done()  # as next_msg does: a drain on close waits for the queue to be done
    return msg


_AUTH_WORDS = ("authorization", "authentication")
# nats-py reports a denied publish or subscribe (lower-cased) through error_cb only: the
# connection stays up and a request to the denied subject just times out.
_DENIED_RE = re.compile(r'permissions violation for (publish|subscription) to "([^"]*)"', re.I)
# A timeout this long after a denial is not blamed on it (requests time out after 5 s).
_DENIAL_BLAMED_FOR = 30.0


class NatsPermissionError(ConfigError):
    """The server denied this NATS user a publish or subscribe the process needed: like a
    refused login, retrying cannot help until the user or its permissions change."""


def denial(exc: BaseException) -> tuple[str, str] | None:
    """(`publish` | `subscription`, subject) when `exc` is a permissions violation."""
    found = _DENIED_RE.search(str(exc))
    return (found.group(1).lower(), found.group(2)) if found else None


def permission_message(denied: tuple[str, str], user: str) -> str:
    """One line: what was denied to whom, and what to do about it."""
    op, subject = denied
    who = f"NATS user {user!r}" if user else "this NATS user"
    action = "publish to" if op == "publish" else "subscribe to"
    if subject.startswith(("$js.api.stream.create.", "$js.api.stream.update.")):
        fix = (
            "a role's user does not create streams (ADR 0031): run 'svc streams ensure'"
            " as the operator user first"
        )
    else:
        fix = (
            "the process needs it: grant it to this user in the server's permissions"
            " (deploy/nats/auth.conf), or run the process as the user of its role"
        )
    return f"NATS denied {who} permission to {action} {subject!r}: {fix}"


def refusal(exc: BaseException) -> str | None:
    """What kind of refusal `exc` is ("authorization" or "TLS"), or None for other trouble
    (an unreachable server is worth retrying; a refused login or handshake is not)."""
    if isinstance(exc, nats.errors.AuthorizationError):
        return "authorization"
    if isinstance(exc, ssl.SSLError | ssl.CertificateError):
        return "TLS"
    text = str(exc).lower()
    if any(word in text for word in _AUTH_WORDS):
        return "authorization"
    if "tls" in text or "ssl" in text or "certificate" in text:
        return "TLS"
    return None


# How long one cancellation of a task that swallowed the last is given before the next.
_RECANCEL_AFTER = 0.05


async def cancel_until_done(task: asyncio.Task[Any]) -> None:
    """Cancel `task` and wait for it to end, cancelling again while it goes on. nats-py's
    first connect retries forever, and a cancellation that lands as a connect attempt
    fails is lost (Python 3.11's `wait_for` returns the attempt's error instead, which the
    retry loop catches): one cancel() could leave it retrying, and its caller hanging."""
    while not task.done():
        task.cancel()
        await asyncio.wait([task], timeout=_RECANCEL_AFTER)
    if not task.cancelled():
        task.exception()  # retrieved: an error at the very end is not "never retrieved"


_BACKGROUND: set[asyncio.Task[None]] = set()


def _background(work: Coroutine[Any, Any, None]) -> None:
    """Run `work` on its own task, keeping a reference until it is done."""
    task = asyncio.get_running_loop().create_task(work)
    _BACKGROUND.add(task)
    task.add_done_callback(_BACKGROUND.discard)


class WatchedClient(Client):
    """nats-py's client, plus a watchdog on its read loop: the stock loop logs and ends on
    an unexpected exception while the client still reports itself connected, so nothing
    is ever read again. Here such an end closes the client, which reports it lost."""

    dead_read_loop: str = ""

    async def _send_ping(self, future: asyncio.Future[Any] | None = None) -> None:
        """Queue the PING behind what is already pending. nats-py writes it straight to the
        socket, ahead of commands still waiting for the flusher (a SUB just made, a
        publish), so `flush()` could return before the server had them: a message
        published right after `subscribe(); flush()` missed the new subscription."""
        self._pongs.append(future if future is not None else asyncio.Future())
        await self._send_command(PING_PROTO)
        await self._flush_pending()

    async def _read_loop(self) -> None:
        await super()._read_loop()
        task = asyncio.current_task()
        ended_by_us = self.is_closed or self.is_reconnecting or not self.is_connected
        if ended_by_us or (task is not None and task.cancelling()):
            return
        # The stock loop swallowed an exception (logged by nats-py) and stopped reading.
        self.dead_read_loop = "the NATS read loop died on data it could not parse"
        _background(self._close(Client.CLOSED, True))


class TolerantClient(WatchedClient):
    """Decodes a subject or reply that is not UTF-8 (a raw publisher can store one) with
    `surrogateescape` instead of dying: the message reaches its handler, whose subject
    check dead-letters it, and `subject.encode("utf-8", "surrogateescape")` gives back
    the exact bytes."""

    def _build_message(
        self,
        sid: int,
        subject: bytes,
        reply: bytes,
        data: bytes,
        headers: dict[str, str] | None,
    ) -> Msg:
        return self.msg_class(
            subject=subject.decode("utf-8", "surrogateescape"),
            reply=reply.decode("utf-8", "surrogateescape"),
            data=data,
            headers=headers,
            _client=self,
            _sid=sid,
        )


def undecodable(subject: str) -> bool:
    """True when `subject` carries bytes that were not UTF-8 (see TolerantClient)."""
    try:
        subject.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


class _ErrorReporter:
    """Log connection trouble once per change of state, not once per retry; notice a
    refusal at the first connect and a connection that is closed for good later."""

    def __init__(self, name: str, nc: WatchedClient, lost: asyncio.Event) -> None:
        self.name = name
        self.nc = nc
        self.lost = lost
        self.lost_reason = ""
        self.closing = False
        self.connected = False  # before the first connect, the caller reports failure once
        self.refused: tuple[str, BaseException] | None = None
        self.refused_event = asyncio.Event()
        self.bus: Bus | None = None
        self.denied: tuple[str, str] | None = None  # the last permissions violation
        self.denied_at = 0.0
        self.user = ""  # the NATS user named in a permissions error
        self._last: tuple[str, float] = ("", 0.0)

    async def error(self, exc: Exception) -> None:
        if (denied := denial(exc)) is not None:
            # Not a connection problem: the server keeps the connection and drops the
            # message; what waited for an answer times out and is reported with this.
            repeated = denied == self.denied and time.monotonic() - self.denied_at < 30
            self.denied, self.denied_at = denied, time.monotonic()
            if not repeated:
                log.error(
                    "nats permission denied",
                    extra={"client": self.name, "operation": denied[0], "subject": denied[1]},
                )
            return
        kind = refusal(exc)
        if not self.connected:
            if kind is not None and self.refused is None:
                self.refused = (kind, exc)
                self.refused_event.set()
            return
        text = f"{type(exc).__name__}: {exc}".strip()
        if kind == "authorization" and not self.closing:
            # Refused on reconnect (credentials revoked or changed): retrying forever
            # would leave a process that looks alive and does nothing.
            self.lost_reason = f"{kind} refused on reconnect: {text}"
            _background(self.nc.close())  # not awaited here: close() cancels our caller
        now = time.monotonic()
        if text != self._last[0] or now - self._last[1] > 30:
            log.warning("nats connection error", extra={"client": self.name, "error": text})
            self._last = (text, now)

    async def disconnected(self) -> None:
        if self.closing:
            return
        log.warning("nats disconnected", extra={"client": self.name})
        if self.bus is not None:
            self.bus._state("disconnected")

    async def reconnected(self) -> None:
        log.info("nats reconnected", extra={"client": self.name})
        if self.bus is not None:
            self.bus._state("reconnected")

    async def closed(self) -> None:
        if self.closing or not self.connected:
            return
        if not self.lost_reason:
            last = self.nc.last_error
            self.lost_reason = self.nc.dead_read_loop or (
                f"{type(last).__name__}: {last}" if last is not None else "closed by the client"
            )
        log.error(
            "nats connection closed for good",
            extra={"client": self.name, "reason": self.lost_reason},
        )
        if self.bus is not None:
            self.bus.lost_reason = self.lost_reason
            self.bus._state("lost")
        self.lost.set()


def _tls_context(security: NatsSecurity) -> ssl.SSLContext | None:
    if not (security.tls_ca or security.tls_cert):
        return None
    context = ssl.create_default_context(cafile=str(security.tls_ca) if security.tls_ca else None)
    if security.tls_cert and security.tls_key:
        context.load_cert_chain(str(security.tls_cert), str(security.tls_key))
    return context


def _auth_options(security: NatsSecurity) -> dict[str, object]:
    options: dict[str, object] = {}
    if security.creds:
        options["user_credentials"] = str(security.creds)
    if security.nkey_seed:
        options["nkeys_seed"] = str(security.nkey_seed)
    if security.token:
        options["token"] = security.token.value
    if security.user:
        options["user"] = security.user
        options["password"] = security.password.value
    tls = _tls_context(security)
    if tls is not None:
        options["tls"] = tls
    return options


def _shown(url: str) -> str:
    return url if "@" not in url else "<NATS_URL with credentials>"


@asynccontextmanager
async def connect(
    url: str,
    *,
    name: str,
    timeout: float = 5.0,
    security: NatsSecurity | None = None,
    client_class: type[WatchedClient] = TolerantClient,
) -> AsyncIterator[Bus]:
    """Connect with endless reconnects; give up on the *first* connect after `timeout` s,
    at once when the server refuses the login or the TLS handshake."""
    nc = client_class()
    lost = asyncio.Event()
    reporter = _ErrorReporter(name, nc, lost)
    try:
        options = _auth_options(security or NatsSecurity())
    except (OSError, ssl.SSLError) as exc:  # unreadable or mismatched cert/key files
        raise NatsRefusedError(
            f"NATS TLS settings are unusable: {type(exc).__name__}: {exc}"
        ) from None
    connecting = asyncio.create_task(
        nc.connect(
            # The settings accept "a, b" (spaces around the commas): nats-py does not.
            servers=[server.strip() for server in url.split(",") if server.strip()],
            name=name,
            error_cb=reporter.error,
            disconnected_cb=reporter.disconnected,
            reconnected_cb=reporter.reconnected,
            closed_cb=reporter.closed,
            connect_timeout=max(1, int(timeout)),
            reconnect_time_wait=0.5,  # type: ignore[arg-type]  # annotated int, sleeps float
            max_reconnect_attempts=-1,
            **options,  # type: ignore[arg-type]
        ),
        name=f"nats-connect-{name}",
    )
    refused = asyncio.create_task(reporter.refused_event.wait())
    try:
        await asyncio.wait(
            [connecting, refused], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
    finally:
        refused.cancel()
    failure: BaseException | None = None
    if not connecting.done():
        await cancel_until_done(connecting)
        failure = reporter.refused[1] if reporter.refused else TimeoutError()
    elif connecting.exception() is not None:
        failure = connecting.exception()
    if failure is not None:
        reporter.closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)
        kind = reporter.refused[0] if reporter.refused else refusal(failure)
        if kind is not None:
            detail = str(failure).strip() or type(failure).__name__
            fix = (
                "check NATS_USER/NATS_PASSWORD, NATS_TOKEN, NATS_CREDS or NATS_NKEY_SEED"
                if kind == "authorization"
                else "check NATS_TLS_CA/NATS_TLS_CERT/NATS_TLS_KEY and the URL scheme"
            )
            raise NatsRefusedError(
                f"NATS at {_shown(url)} refused the connection: {kind} failed ({detail}): {fix}"
            ) from None
        raise NatsUnavailableError(
            f"cannot reach NATS at {_shown(url)} within {timeout:g}s ({type(failure).__name__}): "
            "start one with 'svc nats serve' or set NATS_URL"
        ) from None
    reporter.connected = True
    bus = reporter.bus = Bus(nc, nc.jetstream(), lost)
    bus.denials = reporter
    reporter.user = security.user if security else ""
    try:
        yield bus
    except TimeoutError:  # nats-py's timeouts too: what waited may have been denied
        if (denied := bus.permission_error()) is None:
            raise
        raise denied from None
    finally:
        reporter.closing = True
        if not nc.is_closed and not nc.is_connected:
            # Disconnected (the server is gone): a drain would wait for a reconnect.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(nc.close(), 2)
        elif not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 5)
            except Exception:  # a drain that cannot finish must not hide the body's error
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2)
