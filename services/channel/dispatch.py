"""How a session's events reach its handler: at least once, in order, one at a time.

Transports hand every event of a session to one `EventDispatch`, from wherever it comes
(a network callback, a NATS subscription, a durable inbound queue):

- `post(event)` never blocks (for callbacks that must only enqueue, like neonize's, which
  come from the Go side and lose order if they await); one pump task delivers posted
  events in the order posted.
- `await deliver(event)` delivers one now and raises what the handler raised, so a
  caller with its own redelivery (a JetStream queue) gets at-least-once from it.
- `await relay(message)` handles a received message at once, beside the queue: for a
  caller that keeps per-chat order itself and relays chats in parallel (the sim
  receiver, ADR 0034).

The first two go through one queue and one pump, so the handler runs for one event at a time, in
the order events were posted or delivered. A posted event whose handler fails is
retried with backoff; after the last attempt it is logged with the error and dropped,
so one poison event never stalls the session's later events.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from services.channel.port import EventHandler, Incoming, SessionEvent

log = logging.getLogger(__name__)

RETRY_DELAYS = (0.05, 0.2, 1.0, 2.0)  # a posted event gets len + 1 attempts


class EventDispatch:
    """Serialises one session's events into its handler (an async context manager)."""

    def __init__(
        self,
        handler: EventHandler,
        *,
        name: str = "session",
        retry_delays: Sequence[float] = RETRY_DELAYS,
        drain_timeout: float = 5.0,
    ) -> None:
        self.handler = handler
        self.name = name
        self.retry_delays = tuple(retry_delays)
        self.drain_timeout = drain_timeout
        self.delivered = 0
        self.dropped = 0
        # (event, the waiting deliver() call's future; None for a posted event)
        self._queue: asyncio.Queue[tuple[SessionEvent, asyncio.Future[None] | None]] = (
            asyncio.Queue()
        )
        self._pump: asyncio.Task[None] | None = None

    async def __aenter__(self) -> EventDispatch:
        self._pump = asyncio.create_task(self._run(), name=f"events-{self.name}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        """Deliver what was posted (up to `drain_timeout`), then stop the pump."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._queue.join(), self.drain_timeout)
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if not self._queue.empty():
            log.warning(
                "session events not delivered before close",
                extra={"session": self.name, "left": self._queue.qsize()},
            )
        while not self._queue.empty():  # a deliver() still waiting hears it was not
            _, waiter = self._queue.get_nowait()
            if waiter is not None and not waiter.done():
                waiter.set_exception(RuntimeError("session closed before the event was handled"))

    def post(self, event: SessionEvent) -> None:
        """Queue `event` for delivery after everything posted before it (never blocks)."""
        self._queue.put_nowait((event, None))

    async def deliver(self, event: SessionEvent) -> None:
        """Deliver `event` after everything before it; raise what the handler raised
        (the caller redelivers)."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((event, done))
        await done

    async def relay(self, event: Incoming) -> None:
        """Handle a received message now, concurrently with the queue (the caller keeps
        per-chat order); raise what the handler raised."""
        await self._handle(event)

    async def _run(self) -> None:
        while True:
            event, waiter = await self._queue.get()
            try:
                if waiter is None:
                    await self._deliver_posted(event)
                elif not waiter.done():  # its caller may have been cancelled meanwhile
                    try:
                        await self._handle(event)
                    except asyncio.CancelledError:
                        waiter.cancel()
                        raise
                    except Exception as exc:
                        waiter.set_exception(exc)
                    else:
                        waiter.set_result(None)
            finally:
                self._queue.task_done()

    async def _handle(self, event: SessionEvent) -> None:
        await self.handler(event)
        self.delivered += 1

    async def _deliver_posted(self, event: SessionEvent) -> None:
        for attempt, delay in enumerate((*self.retry_delays, None), start=1):
            try:
                await self._handle(event)
                return
            except Exception as exc:
                where = {"session": self.name, "event": type(event).__name__, "error": repr(exc)}
                if delay is None:
                    self.dropped += 1
                    log.error(
                        "session event dropped: its handler kept failing",
                        extra={**where, "attempts": attempt},
                    )
                    return
                log.warning(
                    "session event handler failed; retrying",
                    extra={**where, "attempt": attempt, "delay_s": delay},
                )
                await asyncio.sleep(delay)
