"""The NATS connection: JetStream context, traced publishing of contract messages."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import PubAck

from contracts.codec import encode
from contracts.events import Message
from services.runtime.errors import NatsUnavailableError
from services.runtime.telemetry import publish_span

log = logging.getLogger(__name__)


class Bus:
    """A connected client: `nc` for core NATS, `js` for JetStream, and traced publishing."""

    def __init__(self, nc: Client, js: JetStreamContext) -> None:
        self.nc = nc
        self.js = js

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
        with publish_span(subject, msg_id) as trace_headers:
            all_headers = {**trace_headers, **(headers or {}), "Nats-Msg-Id": msg_id}
            ack: PubAck = await self.js.publish(subject, data, headers=all_headers, timeout=timeout)
            return ack


class _ErrorReporter:
    """Log connection trouble once per change of state, not once per retry."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.closing = False
        self.connected = False  # before the first connect, the caller reports failure once
        self._last: tuple[str, float] = ("", 0.0)

    async def error(self, exc: Exception) -> None:
        if not self.connected:
            return
        text = f"{type(exc).__name__}: {exc}".strip()
        now = time.monotonic()
        if text != self._last[0] or now - self._last[1] > 30:
            log.warning("nats connection error", extra={"client": self.name, "error": text})
            self._last = (text, now)

    async def disconnected(self) -> None:
        if self.closing:
            return
        log.warning("nats disconnected", extra={"client": self.name})

    async def reconnected(self) -> None:
        log.info("nats reconnected", extra={"client": self.name})


@asynccontextmanager
async def connect(url: str, *, name: str, timeout: float = 5.0) -> AsyncIterator[Bus]:
    """Connect with endless reconnects; give up on the *first* connect after `timeout` s."""
    reporter = _ErrorReporter(name)
    nc = Client()
    try:
        await asyncio.wait_for(
            nc.connect(
                servers=url.split(","),
                name=name,
                error_cb=reporter.error,
                disconnected_cb=reporter.disconnected,
                reconnected_cb=reporter.reconnected,
                connect_timeout=max(1, int(timeout)),
                reconnect_time_wait=0.5,  # type: ignore[arg-type]  # annotated int, sleeps float
                max_reconnect_attempts=-1,
            ),
            timeout,
        )
    except (TimeoutError, OSError, nats.errors.Error) as exc:
        reporter.closing = True
        with contextlib.suppress(Exception):
            await asyncio.wait_for(nc.close(), 2)
        shown = url if "@" not in url else "<NATS_URL with credentials>"
        raise NatsUnavailableError(
            f"cannot reach NATS at {shown} within {timeout:g}s ({type(exc).__name__}): "
            "start one with 'svc nats serve' or set NATS_URL"
        ) from None
    reporter.connected = True
    try:
        yield Bus(nc, nc.jetstream())
    finally:
        reporter.closing = True
        if not nc.is_closed:
            try:
                await asyncio.wait_for(nc.drain(), 5)
            except Exception:  # a drain that cannot finish must not hide the body's error
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(nc.close(), 2)
