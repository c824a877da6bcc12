"""`svc chat`: talk to the running system as a simulated WhatsApp user."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import typer

from services.ops.simclient import Exchange, SimUser
from services.runtime.bus import Bus

_STATE_LINES = {
    "disconnected": "(lost the connection to NATS; reconnecting...)",
    "reconnected": "(reconnected to NATS)",
    "lost": "(the connection to NATS is closed for good; quit and start svc chat again)",
}


async def run_chat(bus: Bus, account: str, chat: str, *, wait: float) -> int:
    """Read lines from stdin, send each, print replies; return how many replies are missing.

    On a terminal a reply that does not come within `wait` seconds gets one line saying
    so; if it comes later it is printed as `bot (late)> ...` on its own line, and the
    prompt is shown again under it."""
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with account {account!r} as {chat} (Ctrl-D to quit)")
    prompt_shown = False
    awaiting = False  # a message's own wait is running: its reply is not late

    def say(text: str, *, err: bool = False) -> None:
        nonlocal prompt_shown
        if prompt_shown:
            typer.echo("", err=err)  # leave the prompt's line instead of writing after it
        typer.echo(text, err=err)
        if prompt_shown:
            typer.echo("you> ", nl=False)
            sys.stdout.flush()

    bus.on_state.append(lambda state: say(_STATE_LINES[state], err=True))
    async with SimUser(bus, account) as user:
        printed: set[str] = set()

        def show_replies(current: Exchange | None = None, *, late: bool = False) -> None:
            label = "bot (late)>" if late else "bot>"
            for job_id, e in user.exchanges.items():
                if e.reply and job_id not in printed:
                    printed.add(job_id)
                    own = current is None or e is current  # else an earlier message's reply
                    say(f"{label if own else 'bot (late)>'} {e.reply.text}")
            for out in user.others:
                if out.chat == chat and out.job_id not in printed:
                    printed.add(out.job_id)
                    say(f"{label} {out.text}")

        async def late_replies() -> None:
            while True:
                await user.changed()
                if not awaiting:
                    show_replies(late=True)

        watcher = asyncio.create_task(late_replies()) if interactive else None
        loop = asyncio.get_running_loop()
        try:
            while True:
                if interactive:
                    typer.echo("you> ", nl=False)
                    sys.stdout.flush()
                    prompt_shown = True
                try:
                    line = await loop.run_in_executor(None, sys.stdin.readline)
                except OSError:  # the terminal hung up: like Ctrl-D
                    line = ""
                prompt_shown = False
                if not line:
                    break
                text = line.rstrip("\n")
                if not text.strip():
                    continue
                awaiting = True
                try:
                    exchange = await user.send(chat, text)
                    if interactive and not await user.wait_replies(wait, exchange=exchange):
                        show_replies(exchange)
                        typer.echo(
                            f"(no reply yet after {wait:g}s; it may still come and will be"
                            " shown as 'bot (late)>')"
                        )
                    show_replies(exchange if interactive else None)
                finally:
                    awaiting = False
            awaiting = True
            await user.wait_replies(wait)
            show_replies()
        finally:
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher
        missing = user.pending()
        for e in missing:
            typer.echo(f"no reply within {wait:g}s to: {e.text!r}", err=True)
        return len(missing)
