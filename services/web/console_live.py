"""Conversations: per account and chat, the transcript the audit uses, live by
server-sent events fed by JetStream (issue 18 item 3).

The transcript page renders `conversation_at` (services/ops/explain.py) on the server
and writes down where each stream ended; the page's script (static/live.js) opens the
events stream from there, and `ChatFollower` (services/ops/follow.py) follows the chat's
subjects from the next sequence on: nothing stored between the render and the
subscription is missed or shown twice. Every event carries the position after it as its
SSE id, so a reconnecting browser (Last-Event-ID) resumes where it left off. Without
JavaScript the page is the same transcript, current as of the last reload.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from html import escape
from typing import Annotated, Any
from urllib.parse import quote

import anyio
import nats.errors
import nats.js.errors
from litestar import Request, Response, get
from litestar.params import Parameter
from litestar.response import ServerSentEvent
from litestar.response.sse import ServerSentEventMessage

from contracts import subjects
from contracts.events import CHANNEL_WHATSAPP, DeliveryEvent, TurnCompleted, TurnFailed
from projections import transcript as tr
from services.ops.explain import Position
from services.web import console
from services.web.api import Cursor, Limit, bus_of, ops_errors
from services.web.auth import authenticate
from services.web.console import Page
from services.web.errors import ApiError
from services.web.identity import Principal
from services.web.pages import console_page, script

log = logging.getLogger(__name__)

HEARTBEAT = 15.0  # s between comments on an idle stream (proxies close silent ones)
RETRY_MS = 3000  # how soon a browser reconnects after the stream drops
CHATS_SHOWN = 50  # chats per account on the conversations page (then a "more" link)


# --- shared by the page, the events stream and the API ---------------------------------


def chat_path(account: str, chat: str) -> str:
    """The console path of a chat's transcript (the chat as its subject token: URL-safe)."""
    token = subjects.encode_chat(chat)  # only `A-Za-z0-9@-_:+=!~`: all legal in a path
    return f"/conversations/{quote(account, safe='')}/{quote(token, safe='@:+=!~')}"


def row_of(entry: tr.Entry) -> dict[str, Any]:
    """One transcript row as the page and the events stream show it: the same line
    `svc replay conversation` prints, plus what ties sends to their turn."""
    event = entry.event
    return {
        "id": f"{entry.stream}-{entry.seq}",
        "time": tr.stamp(entry.at),
        "kind": entry.kind,
        "text": tr.entry_line(entry),
        "job": event.job_id if isinstance(event, DeliveryEvent) else "",
        "replies": list(event.reply_ids) if isinstance(event, TurnCompleted | TurnFailed) else [],
    }


def _row_html(row: dict[str, Any]) -> str:
    attrs = f' id="{escape(row["id"])}" class="kind-{escape(row["kind"])}"'
    if row["job"]:
        attrs += f' data-job="{escape(row["job"])}"'
    if row["replies"]:
        attrs += f' data-replies="{escape(" ".join(row["replies"]))}"'
    cells = "".join(f"<td>{escape(str(row[k]))}</td>" for k in ("time", "kind", "text"))
    return f"<tr{attrs}>{cells}</tr>"


def _where(account: str, chat: str) -> tuple[str, str]:
    return console.check_account(account), console.check_chat(chat)


def _after(request: Request[Any, Any, Any], after: str | None) -> Position | None:
    """Where to follow from: the browser's Last-Event-ID (a reconnect), else `after`,
    else None (from now)."""
    from services.ops.follow import parse_position

    text = request.headers.get("last-event-id") or after
    if not text:
        return None
    try:
        return parse_position(text)
    except ValueError as exc:
        raise ApiError(400, str(exc), "bad_cursor") from None


async def _events(
    request: Request[Any, Any, Any], account: str, chat: str, after: Position | None
) -> AsyncIterator[ServerSentEventMessage]:
    """The SSE stream: a `row` event per new transcript entry (id: the position after it),
    a comment every HEARTBEAT s; ends when the session or token is no longer valid."""
    from services.ops.explain import current_position
    from services.ops.follow import ChatFollower, position_text

    bus = bus_of(request)
    follower: ChatFollower | None = None
    try:
        start = after if after is not None else await current_position(bus)
        follower = ChatFollower(bus, CHANNEL_WHATSAPP, account, chat, start)
        await follower.start()
        yield ServerSentEventMessage(
            event="ready", id=position_text(follower.position), data="", retry=RETRY_MS
        )
        while True:
            entry = await follower.next(HEARTBEAT)
            if entry is None:
                if await authenticate(request) is None:  # logged out, removed, revoked
                    yield ServerSentEventMessage(event="end", data="the session has ended")
                    return
                yield ServerSentEventMessage(comment="keep-alive", data=None)
                continue
            item = {"item": console.builtins(entry), "row": row_of(entry)}
            yield ServerSentEventMessage(
                event="row", id=position_text(follower.position), data=json.dumps(item)
            )
    except (nats.errors.Error, nats.js.errors.Error, TimeoutError) as exc:
        # NATS did not answer: end this stream; the browser reconnects (after RETRY_MS,
        # from its Last-Event-ID), so nothing is lost.
        why = f"NATS did not answer ({type(exc).__name__}); reconnecting"
        log.warning("live view stopped", extra={"account": account, "error": str(exc)})
        yield ServerSentEventMessage(event="unavailable", data=why)
    finally:
        if follower is not None:
            # The client went away: Litestar cancels this stream (anyio cancels every
            # await in its scope), so the consumers are deleted under a shield.
            with anyio.move_on_after(10, shield=True):
                await follower.close()


async def _stream(
    request: Request[Any, Any, Any], account: str, chat: str, after: str | None
) -> ServerSentEvent:
    account, jid = _where(account, chat)
    position = _after(request, after)
    with ops_errors():
        await console.known_account(bus_of(request), account)
    return ServerSentEvent(_events(request, account, jid, position))


After = Annotated[
    str | None,
    Parameter(
        max_length=200,
        description="Follow from after this position (the page's, or an event's id);"
        " a Last-Event-ID header wins; none: from now.",
    ),
]


# --- pages -------------------------------------------------------------------------------


@get("/conversations", name="page.conversations", include_in_schema=False)
async def conversations_page(
    request: Request[Any, Any, Any],
    principal: Principal,
    account: Annotated[str | None, Parameter(max_length=64)] = None,
    cursor: Annotated[str | None, Parameter(max_length=200)] = None,
) -> Response[str]:
    """Per account, its chats, most recent first, each linking to its transcript."""
    from services.ops.explain import chats

    if account is not None:
        account = console.check_account(account)
    with ops_errors():
        found = await chats(bus_of(request), CHANNEL_WHATSAPP, account)
    by_account: dict[str, list[Any]] = {}
    for row in found:
        by_account.setdefault(row.account, []).append(row)
    parts = []
    for name in sorted(by_account):
        shown = console.page(by_account[name], CHATS_SHOWN, cursor if account else None)
        rows = "".join(
            f'<tr><td><a href="{escape(chat_path(name, c.chat))}">{escape(c.chat)}</a></td>'
            f"<td>{escape(tr.stamp(c.last_at))}</td></tr>"
            for c in shown.items
        )
        more = (
            f'<p><a href="/conversations?account={quote(name)}&amp;cursor='
            f'{quote(shown.next_cursor)}">More chats of {escape(name)}</a></p>'
            if shown.next_cursor
            else ""
        )
        parts.append(
            f"<h2>{escape(name)}</h2><table class=chats><tr><th>Chat</th>"
            f"<th>Last activity</th></tr>{rows}</table>{more}"
        )
    body = "".join(parts) or "<p>No conversations yet.</p>"
    return console_page("Conversations", principal, body)


@get("/conversations/{account:str}/{chat:str}", name="page.conversation", include_in_schema=False)
async def conversation_page(
    request: Request[Any, Any, Any], principal: Principal, account: str, chat: str
) -> Response[str]:
    """One chat's transcript, as GET /api/v1/.../messages gives it, updated live."""
    from services.ops.explain import conversation_at
    from services.ops.follow import position_text

    account, jid = _where(account, chat)
    with ops_errors():
        entries, position = await conversation_at(bus_of(request), CHANNEL_WHATSAPP, account, jid)
    events = f"{chat_path(account, jid)}/events?after={position_text(position)}"
    rows = "".join(_row_html(row_of(e)) for e in entries)
    empty = "" if entries else '<p id="transcript-empty">No messages in this chat yet.</p>'
    body = (
        f'<p><a href="/conversations">All conversations</a> | account <strong>'
        f"{escape(account)}</strong>, chat <strong>{escape(jid)}</strong></p>"
        '<p id="live-status">Reload the page to see new messages'
        " (live updates need JavaScript).</p>"
        f'<table id="transcript" data-events="{escape(events)}"><thead><tr>'
        "<th>Time (UTC)</th><th>What</th><th>Detail</th></tr></thead>"
        f"<tbody>{rows}</tbody></table>{empty}"
        '<script src="/static/live.js" defer></script>'
    )
    return console_page(f"Chat {jid}", principal, body)


@get(
    "/conversations/{account:str}/{chat:str}/events",
    name="live.events",
    include_in_schema=False,
)
async def conversation_events(
    request: Request[Any, Any, Any], account: str, chat: str, after: After = None
) -> ServerSentEvent:
    """The chat's new transcript rows as server-sent events (the page's live view)."""
    return await _stream(request, account, chat, after)


@get("/static/live.js", name="static.live", include_in_schema=False)
async def live_script() -> Response[bytes]:
    """The transcript page's script: EventSource, rows appended as they come."""
    return script("live.js")


# --- API ---------------------------------------------------------------------------------


@get("/api/v1/accounts/{account:str}/chats", name="api.chats")
async def chats_api(
    request: Request[Any, Any, Any], account: str, limit: Limit = None, cursor: Cursor = None
) -> Page:
    """The account's chats, most recent activity first (`last_at`: UTC, RFC 3339)."""
    from services.ops.explain import chats

    account = console.check_account(account)
    with ops_errors():
        found = await chats(bus_of(request), CHANNEL_WHATSAPP, account)
    return console.page([console.builtins(c) for c in found], limit, cursor)


@get(
    "/api/v1/accounts/{account:str}/chats/{chat:str}/events",
    name="api.events",
    media_type="text/event-stream",
)
async def events_api(
    request: Request[Any, Any, Any], account: str, chat: str, after: After = None
) -> ServerSentEvent:
    """Server-sent events: `ready` (id: the position now), then `row` per new transcript
    entry (data: {item: as in .../messages, row}; id: the position after it), comments
    as heartbeats; 404 for an account no worker ever registered."""
    return await _stream(request, account, chat, after)


LIVE_HANDLERS = [
    conversations_page,
    conversation_page,
    conversation_events,
    live_script,
    chats_api,
    events_api,
]
