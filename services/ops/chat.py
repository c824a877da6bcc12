"""`svc chat`: talk to the running system as a simulated WhatsApp user."""

from __future__ import annotations

import asyncio
import sys

import typer

from services.ops.simclient import SimUser
from services.runtime.bus import Bus


async def run_chat(bus: Bus, account: str, chat: str, *, wait: float) -> int:
    """Read lines from stdin, send each, print replies; return how many replies are missing."""
    interactive = sys.stdin.isatty()
    if interactive:
        typer.echo(f"chatting with account {account!r} as {chat} (Ctrl-D to quit)")
    async with SimUser(bus, account) as user:
        printed: set[str] = set()

        def show_replies() -> None:
            for job_id, e in user.exchanges.items():
                if e.reply and job_id not in printed:
                    printed.add(job_id)
                    typer.echo(f"bot> {e.reply.text}")
            for out in user.others:
                if out.chat == chat and out.job_id not in printed:
                    printed.add(out.job_id)
                    typer.echo(f"bot> {out.text}")

        loop = asyncio.get_running_loop()
        while True:
            if interactive:
                typer.echo("you> ", nl=False)
            line = await loop.run_in_executor(None, sys.stdin.readline)
            if not line:
                break
            text = line.rstrip("\n")
            if not text.strip():
                continue
            await user.send(chat, text)
            if interactive:
                await user.wait_replies(wait)
            show_replies()
        await user.wait_replies(wait)
        show_replies()
        missing = user.pending()
        for e in missing:
            typer.echo(f"no reply within {wait:g}s to: {e.text!r}", err=True)
        return len(missing)
