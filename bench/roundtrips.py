"""Count the NATS round trips and one-way messages a message makes, per stage.

Runs the real system (role `all`, sim transport, echo LLM, one process, one connection)
on an embedded nats-server, sends messages one at a time (each waits for its reply, so
nothing is batched by load), and counts every client call on the wire by wrapping
nats-py's `Client.request` (a round trip: the caller waits for the answer) and
`Client.publish` (one way; a JetStream publish is a request, counted once, as a request).
Each call is put in a stage by its subject (the stream, bucket or consumer it names):

- receive: the sim receiver: SIM fetch/ack, the INBOUND publish
- core: INBOUND fetch/ack, `chats` KV, INBOUND reads, access/plugins/presence, AGENT and
  OUTBOUND publishes
- egress: OUTBOUND fetch/ack/reads, `sends` and `leases` KV, DELIVERY publishes, the sim
  network's `out`

Fetch requests (`CONSUMER.MSG.NEXT`) are counted too: with one message at a time each
fetch carries one message, so they are per message here (under load one fetch carries
many). A warm-up of a few messages runs first (bucket handles, first-contact checks).

    python bench/roundtrips.py --messages 50 --chats 5
    python bench/roundtrips.py --messages 300 --chats 10 --flood   # all sent at once
    python bench/roundtrips.py --backlog 1000 --chats 100  # the core alone, on a backlog

`--backlog N` stores N MessageReceived on INBOUND first, then one core worker (echo LLM)
takes them in batches, many chats at once: the core's round trips per turn under load.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextvars
import tempfile
from pathlib import Path
from typing import Any

from _system import sim_system
from nats.aio.client import Client

from contracts import subjects
from contracts.events import MessageReceived
from services.core.llm import EchoLLM
from services.core.worker import CoreWorker
from services.plugins.registry import discover
from services.plugins.tools import ProjectedTools
from services.runtime.bus import connect
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.runtime.settings import CoreSettings

STAGES = ("receive", "core", "egress", "other")

_requests: collections.Counter[str] = collections.Counter()
_publishes: collections.Counter[str] = collections.Counter()
_in_request = contextvars.ContextVar("_in_request", default=False)
_counting = False


def kind(subject: str) -> str:
    """The call's name in the table: the subject with its chat/account/ids cut off."""
    parts = subject.split(".")
    if subject.startswith("$JS.ACK."):
        return f"ack {parts[2]}"
    if subject.startswith("$JS.API.CONSUMER.MSG.NEXT."):
        return f"fetch {parts[5]}"
    if subject.startswith("$JS.API.DIRECT.GET."):
        return f"direct get {parts[4]}"
    if subject.startswith("$JS.API.STREAM.MSG.GET."):
        return f"stream msg get {parts[5]}"
    if subject.startswith("$JS.API."):
        return "api " + ".".join(parts[2:4])
    if subject.startswith("$KV."):
        return f"kv put {parts[1]}"
    if subject.startswith("_INBOX.") or subject.startswith("$SRV."):
        return "inbox"
    return f"{parts[0]}.{parts[-1]}" if parts[0] == "sim" else parts[0]


def stage(name: str) -> str:
    """Which stage a call belongs to."""
    if any(word in name for word in ("SIM", "inbound", "sim.in")):
        return "receive"
    if any(w in name for w in ("INBOUND", "chats", "agent", "outbound", "PLUGINS", "access")):
        return "core"
    if any(w in name for w in ("OUTBOUND", "sends", "leases", "delivery", "sim.out", "egress")):
        return "egress"
    return "other"


def _patch() -> None:
    request, publish = Client.request, Client.publish

    async def counted_request(self: Client, subject: str, *args: Any, **kwargs: Any) -> Any:
        if _counting:
            _requests[kind(subject)] += 1
        token = _in_request.set(True)
        try:
            return await request(self, subject, *args, **kwargs)
        finally:
            _in_request.reset(token)

    async def counted_publish(self: Client, subject: str, *args: Any, **kwargs: Any) -> Any:
        # A request publishes through here too: counted once, as a request. A write sent
        # with `publish_async` (an ack comes back, waited for later with others) counts as
        # a round trip of its own, marked "pipelined" (ADR 0039).
        if _counting:
            if not kwargs.get("reply", "").startswith("_INBOX."):
                _publishes[kind(subject)] += 1
            elif not _in_request.get():
                _requests[kind(subject) + " (pipelined)"] += 1
        return await publish(self, subject, *args, **kwargs)

    Client.request = counted_request  # type: ignore[method-assign]
    Client.publish = counted_publish  # type: ignore[method-assign]


async def run(messages: int, chats: int, warmup: int, flood: bool) -> None:
    global _counting
    _patch()
    async with sim_system() as (_, user):
        for i in range(warmup + messages):
            if i == warmup:
                _counting = True
            await user.send(f"chat{i % chats}@s.whatsapp.net", f"message {i}")
            if flood and i >= warmup:
                continue
            if not await user.wait_replies(60):
                raise SystemExit("replies missing")
            # The egress's DELIVERY/ledger writes and acks follow the send: let
            # them land inside this message's count.
            await asyncio.sleep(0.05)
        if flood and not await user.wait_replies(600):
            raise SystemExit("replies missing")
        await asyncio.sleep(0.5)  # the last writes and acks after the last reply
        _counting = False
    table: dict[str, list[tuple[str, float, float]]] = collections.defaultdict(list)
    for name in sorted(set(_requests) | set(_publishes)):
        if name.startswith("sim.in"):
            continue  # the user's own message, not the system's
        rows = table[stage(name)]
        rows.append((name, _requests[name] / messages, _publishes[name] / messages))
    how = "all sent at once" if flood else "one at a time"
    print(f"per message, {messages} messages over {chats} chats, {how}")
    print(f"{'stage':8} {'call':28} {'round trips':>11} {'one-way':>8}")
    for st in STAGES:
        total_r = total_p = 0.0
        for name, r, p in table.get(st, []):
            print(f"{st:8} {name:28} {r:11.2f} {p:8.2f}")
            total_r += r
            total_p += p
        if st in table:
            print(f"{st:8} {'= total':28} {total_r:11.2f} {total_p:8.2f}")


async def backlog(turns: int, chats: int) -> None:
    """The core alone: `turns` stored first, then one worker; requests per turn by subject."""
    global _counting
    _patch()
    with tempfile.TemporaryDirectory() as tmp:
        async with (
            EmbeddedNats(Path(tmp) / "nats", port=0) as server,
            connect(server.url, name="roundtrips") as bus,
        ):
            await ensure_streams(bus.js)
            for i in range(turns):
                chat = f"chat{i % chats}@s.whatsapp.net"
                msg = MessageReceived(
                    account="default", chat=chat, sender=chat, message_id=f"m{i}", text=f"{i}"
                )
                await bus.publish(subjects.inbound("whatsapp", "default", chat), msg)
            settings = CoreSettings(chat_rate=None)
            tools = ProjectedTools(bus, discover(), None, timeout=settings.tool_timeout)
            worker = CoreWorker(bus, EchoLLM(), settings, tools=tools)
            stop = asyncio.Event()
            _counting = True
            running = asyncio.create_task(worker.loop.run(stop))
            # The loop counts what it handled and has no event for it: poll it.
            while worker.loop.handled < turns:  # noqa: ASYNC110
                await asyncio.sleep(0.1)
            stop.set()
            await running
            _counting = False
    print(f"core round trips per turn, {turns} turns over {chats} chats stored first")
    for name in sorted(_requests):
        print(f"  {name:28} {_requests[name] / turns:8.3f}")
    print(f"  {'= total':28} {sum(_requests.values()) / turns:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=50)
    parser.add_argument("--chats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--flood", action="store_true", help="send all, then wait")
    parser.add_argument("--backlog", type=int, default=0, help="the core alone on N turns")
    args = parser.parse_args()
    if args.backlog:
        asyncio.run(backlog(args.backlog, args.chats))
    else:
        asyncio.run(run(args.messages, args.chats, args.warmup, args.flood))


if __name__ == "__main__":
    main()
