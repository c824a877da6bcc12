"""`svc demo`: the whole system in one process, a handful of sim chats, a transcript."""

from __future__ import annotations

import asyncio
import statistics
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import typer
from nats.aio.msg import Msg

from contracts.codec import decode_any
from contracts.errors import DecodeError
from contracts.events import MessageSent
from services.app import system
from services.ops.simclient import SimUser
from services.runtime.settings import Settings

CHATS = ("alice@s.whatsapp.net", "bob@s.whatsapp.net", "carol@s.whatsapp.net")
LINES = ("hi there!", "what can you do?", "thanks, bye")


async def run_demo(settings: Settings, *, chats: int, messages: int, timeout: float) -> bool:
    """Send `messages` per chat over `chats` chats; True if every reply arrived and was recorded."""
    with tempfile.TemporaryDirectory(prefix="svc-demo-") as tmp:
        if not settings.nats_url:
            settings = replace(settings, data_dir=Path(tmp))
        account = settings.accounts[0]
        started = time.perf_counter()
        async with system(settings, "all", embedded_port=0, client_name="svc-demo") as (
            bus,
            _,
            task,
        ):
            where = settings.nats_url or "an embedded nats-server (temporary store)"
            typer.echo(f"switchboard demo: account {account!r} on {where}")
            records = SentRecords()
            sub = await bus.nc.subscribe(f"delivery.whatsapp.{account}.*", cb=records.on_msg)
            async with SimUser(bus, account) as user:
                chat_ids = [
                    CHATS[i % len(CHATS)].replace("@", f"{i // len(CHATS) or ''}@", 1)
                    for i in range(chats)
                ]
                for n in range(messages):
                    for chat in chat_ids:
                        await user.send(chat, f"{LINES[n % len(LINES)]} (#{n + 1})")
                ok = await user.wait_replies(timeout)
                if task.done() and task.exception():
                    raise task.exception()  # type: ignore[misc]
            await records.wait_for(len(user.exchanges), timeout=5)
            await sub.unsubscribe()
        _print_transcript(user, chat_ids)
        latencies = [e.latency_ms for e in user.exchanges.values() if e.reply]
        total = time.perf_counter() - started
        if latencies:
            typer.echo(
                f"\n{len(latencies)}/{len(user.exchanges)} replies, "
                f"{len(records.sent)} MessageSent recorded; "
                f"reply latency p50 {statistics.median(latencies):.1f} ms, "
                f"max {max(latencies):.1f} ms; "
                f"total {total:.2f} s (including start-up)"
            )
        missing = user.pending()
        for e in missing:
            typer.echo(f"MISSING reply to {e.chat}: {e.text!r}", err=True)
        return ok and not missing and len(records.sent) >= len(user.exchanges)


class SentRecords:
    """Counts MessageSent events recorded on DELIVERY for one account."""

    def __init__(self) -> None:
        self.sent: list[MessageSent] = []
        self._changed = asyncio.Event()

    async def on_msg(self, msg: Msg) -> None:
        """Subscription callback."""
        try:
            event = decode_any(msg.data)
        except DecodeError:
            return
        if isinstance(event, MessageSent):
            self.sent.append(event)
            self._changed.set()

    async def wait_for(self, count: int, timeout: float) -> bool:
        """Wait until `count` sends are recorded; False on timeout."""
        deadline = time.monotonic() + timeout
        while len(self.sent) < count:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), max(0.0, deadline - time.monotonic()))
            except TimeoutError:
                return len(self.sent) >= count
        return True


def _print_transcript(user: SimUser, chats: list[str]) -> None:
    for chat in chats:
        typer.echo(f"\n{chat}")
        for e in user.exchanges.values():
            if e.chat != chat:
                continue
            typer.echo(f"  user > {e.text}")
            if e.reply:
                r = e.reply
                typer.echo(
                    f"  bot  < {r.text}   [{e.latency_ms:.1f} ms,"
                    f" holder {r.holder}, token {r.lease_token}]"
                )
            else:
                typer.echo("  bot  < (no reply)")
