"""Operator forms: handover, resume, requeue, drop, send. Each posts to a page route
that calls the same function as its /api/v1/ endpoint (issue 18 item 3); the answer is a
303 back to the page with a one-line result (a flash in the query string, signed with the
session's CSRF token so a crafted link cannot put words on the page). Also the outbound
page and GET /api/v1/outbound: what is still queued, per account and chat."""

from __future__ import annotations

import json
import secrets
from html import escape
from typing import Annotated, Any
from urllib.parse import quote, urlencode

from litestar import Request, Response, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter

from contracts.web import allows
from services.ops.status import budget_line
from services.web import console
from services.web.api import Cursor, Limit, bus_of, ops_errors
from services.web.auth import client_of
from services.web.console import Page, page
from services.web.errors import ApiError
from services.web.identity import Principal
from services.web.pages import act, console_page, flash, form_of, post_form, table

OPERATOR = "operator"  # the role every action here needs (services/web/routes.py)
LIVE = ("connecting", "connected", "disconnected", "zombie")  # a holder runs it: hand over
HANDOVER_TIMEOUT = 10.0  # what POST /api/v1/accounts/{account}/handover waits by default


def cells(head: list[str], rows: list[list[str]], empty: str) -> str:
    """A table of cells already escaped (or built from escaped parts)."""
    if not rows:
        return f"<p>{escape(empty)}</p>"
    top = "".join(f"<th>{escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{top}</tr>{body}</table>"


def _next_link(path: str, found: Page, **query: str) -> str:
    if found.next_cursor is None:
        return ""
    params = urlencode({**{k: v for k, v in query.items() if v}, "cursor": found.next_cursor})
    return f'<p><a href="{escape(path)}?{escape(params)}">Next page</a></p>'


def _q(value: str) -> str:
    """`value` as one path segment."""
    return quote(value, safe="")


# --- accounts ----------------------------------------------------------------------------------


def _account_actions(principal: Principal, row: dict[str, Any]) -> str:
    account = str(row["account"])
    base = f"/accounts/{_q(account)}"
    parts = []
    if row["state"] in LIVE:
        parts.append(post_form(principal, f"{base}/handover", "Hand over"))
    elif row["state"] != "standby":  # parked: needs pairing, logged out, banned, ...
        parts.append(
            post_form(
                principal,
                f"{base}/resume",
                "Resume",
                inputs='<input name="reason" placeholder="why" maxlength="1024">',
            )
        )
    parts.append(f'<a href="{escape(base)}/pair">Pair</a>')
    parts.append(
        post_form(
            principal,
            f"{base}/send",
            "Send",
            {"key": secrets.token_urlsafe(16)},  # a resubmitted form is one job
            inputs=(
                '<input name="chat" placeholder="chat JID" required maxlength="1024">'
                '<input name="text" placeholder="message" required'
                f' maxlength="{console.MAX_TEXT_CHARS}">'
            ),
        )
    )
    return "".join(parts)


@get("/accounts", name="page.accounts", include_in_schema=False)
async def accounts_page(request: Request[Any, Any, Any], principal: Principal) -> Response[str]:
    """Every account (state, holder, token, budget, parked reason), as GET /api/v1/accounts
    lists them; an operator also gets handover, resume, pair and send."""
    from services.ops.status import collect_accounts

    with ops_errors():
        found = await collect_accounts(bus_of(request))
    operator = allows(principal.role, OPERATOR)
    head = ["account", "state", "holder", "token", "budget", "reason", "last inbound"]
    rows = []
    for row in found:
        line = [
            escape(str(row["account"])),
            escape(str(row["state"])),
            escape(str(row["holder"])),
            escape(str(row["token"])),
            escape(budget_line(row["budget"])),
            escape(str(row["reason"]) + (f" (until {row['until']})" if row["until"] else "")),
            escape(str(row["last_inbound"])),
        ]
        if operator:
            line.append(_account_actions(principal, row))
        rows.append(line)
    body = flash(request, principal) + cells(
        [*head, "actions"] if operator else head, rows, "No accounts yet."
    )
    return console_page("Accounts", principal, body)


@post("/accounts/{account:str}/handover", name="page.accounts.handover", include_in_schema=False)
async def handover_form(
    request: Request[Any, Any, Any], account: str, principal: Principal
) -> Response[Any]:
    """POST /api/v1/accounts/{account}/handover, from the accounts page."""
    from services.ops.accounts import handover

    async def run() -> str:
        name = console.check_account(account)
        with ops_errors():
            reply = await handover(bus_of(request), name, timeout=HANDOVER_TIMEOUT)
        done = "released" if reply.released else "did not release"
        return f"{name}: {reply.holder} (token {reply.token}) {done} the lease."

    return await act(principal, "/accounts", run)


@post("/accounts/{account:str}/resume", name="page.accounts.resume", include_in_schema=False)
async def resume_form(
    request: Request[Any, Any, Any], account: str, principal: Principal
) -> Response[Any]:
    """POST /api/v1/accounts/{account}/resume, from the accounts page."""
    from services.ops.accounts import resume

    form = await form_of(request)

    async def run() -> str:
        name = console.check_account(account)
        reason = form.get("reason", "")[:1024]
        with ops_errors():
            was = await resume(
                bus_of(request),
                name,
                actor=principal.name,
                reason=reason,
                client=client_of(request),
                via="web",
            )
        return f"{name} resumed (was parked: {was}); a worker takes it over."

    return await act(principal, "/accounts", run)


@post("/accounts/{account:str}/send", name="page.accounts.send", include_in_schema=False)
async def send_form(
    request: Request[Any, Any, Any], account: str, principal: Principal
) -> Response[Any]:
    """POST /api/v1/accounts/{account}/messages, from the accounts page: a proactive send
    recorded as an operator-originated turn (who, from where); the result names the job."""
    form = await form_of(request)

    async def run() -> str:
        key = form.get("key") or None
        job_id = await console.send(
            bus_of(request),
            account,
            form.get("chat", ""),
            form.get("text", ""),
            principal=principal,
            client=client_of(request),
            idempotency_key=key,
        )
        return f"Queued job {job_id} to {form.get('chat', '').strip()} from {account}."

    return await act(principal, "/accounts", run)


# --- dead letters ------------------------------------------------------------------------------


def _letter_actions(principal: Principal, seq: int, *, back_to: str) -> str:
    base = f"/deadletters/{seq}"
    return post_form(
        principal,
        f"{base}/requeue",
        "Requeue",
        {"back": back_to},
        inputs='<input name="reason" placeholder="why" maxlength="1024">',
    ) + post_form(
        principal,
        f"{base}/drop",
        "Drop",
        {"back": back_to},
        inputs='<input name="reason" placeholder="why (required)" required maxlength="1024">',
    )


@get("/deadletters", name="page.deadletters", include_in_schema=False)
async def deadletters_page(
    request: Request[Any, Any, Any],
    principal: Principal,
    which: Annotated[str, Parameter(query="state", max_length=8)] = "open",
    limit: Limit = None,
    cursor: Cursor = None,
) -> Response[str]:
    """Dead letters, as GET /api/v1/deadletters lists them (the same function), a page at
    a time; each links to its details; an operator also gets requeue and drop."""
    from services.ops.dlq import letters

    which = "all" if which == "all" else "open"
    with ops_errors():
        found = await letters(bus_of(request))
    rows = [x.summary() for x in found.values() if which == "all" or x.state == "open"]
    with ops_errors():
        shown = page(rows, limit, cursor)
    operator = allows(principal.role, OPERATOR)
    head = ["seq", "at", "state", "job", "attempts", "reason"]
    lines = []
    for row in shown.items:
        seq = int(row["seq"])
        line = [
            f'<a href="/deadletters/{seq}">{seq}</a>',
            escape(str(row["at"])),
            escape(str(row["state"])),
            escape(str(row["job_id"] or "")),
            escape(str(row["attempts"])),
            escape(str(row["reason"])),
        ]
        if operator:
            line.append(
                _letter_actions(principal, seq, back_to="list") if row["state"] == "open" else ""
            )
        lines.append(line)
    other = "open" if which == "all" else "all"
    links = (
        f'<p><a href="/deadletters?state={other}">Show {other}</a>'
        ' | <a href="/outbound">Outbound queue</a></p>'
    )
    empty = "No open dead letters." if which == "open" else "No dead letters."
    body = (
        flash(request, principal)
        + links
        + cells([*head, "actions"] if operator else head, lines, empty)
        + _next_link("/deadletters", shown, state=which if which == "all" else "")
    )
    return console_page("Dead letters", principal, body)


def _letter_body(principal: Principal, doc: dict[str, Any]) -> str:
    payload = doc.get("payload")
    job = payload if isinstance(payload, dict) else {}
    facts = [
        ("sequence", doc["seq"]),
        ("state", doc["state"]),
        ("at", doc.get("at", "")),
        ("reason", doc.get("reason", "")),
        ("source", f"{doc.get('source_stream', '')} {doc.get('source_subject', '')}"),
        ("job", doc.get("job_id") or ""),
        ("account", job.get("account", "")),
        ("chat", job.get("chat", "")),
    ]
    parts = [table([{"field": k, "value": v} for k, v in facts], "")]
    parts.append("<h2>Attempts</h2>")
    parts.append(
        table(
            [
                {"attempt": e.get("attempt"), "at": e.get("at"), "error": e.get("error")}
                for e in doc.get("errors", [])
            ],
            "No attempt recorded an error.",
        )
    )
    parts.append("<h2>What operators did</h2>")
    parts.append(
        table(
            [
                {
                    "action": a.get("type"),
                    "at": a.get("at"),
                    "by": a.get("actor"),
                    "from": " ".join(x for x in (a.get("client"), a.get("via")) if x),
                    "reason": a.get("reason"),
                    "new job": a.get("new_job_id") or "",
                }
                for a in doc.get("actions", [])
            ],
            "Nothing yet.",
        )
    )
    shown = payload if isinstance(payload, str) else json.dumps(payload, indent=2)
    parts.append(f"<h2>Payload</h2><pre>{escape(shown)}</pre>")
    if allows(principal.role, OPERATOR) and doc["state"] == "open":
        parts.append(_letter_actions(principal, int(doc["seq"]), back_to="letter"))
    return "".join(parts)


@get("/deadletters/{ref:str}", name="page.deadletter", include_in_schema=False)
async def deadletter_page(
    request: Request[Any, Any, Any], ref: str, principal: Principal
) -> Response[str]:
    """One dead letter: the job, every attempt's error, the reason, what was done with it
    (as GET /api/v1/deadletters/{ref})."""
    from services.ops.dlq import details, letters, resolve

    with ops_errors(not_found=True):
        found = await letters(bus_of(request))
        doc = details(found[resolve(found, ref)])
    body = (
        flash(request, principal)
        + '<p><a href="/deadletters">All dead letters</a></p>'
        + _letter_body(principal, doc)
    )
    return console_page(f"Dead letter {doc['seq']}", principal, body)


def _back_of(form: dict[str, str], ref: str) -> str:
    return f"/deadletters/{_q(ref)}" if form.get("back") == "letter" else "/deadletters"


@post("/deadletters/{ref:str}/requeue", name="page.deadletter.requeue", include_in_schema=False)
async def requeue_form(
    request: Request[Any, Any, Any], ref: str, principal: Principal
) -> Response[Any]:
    """POST /api/v1/deadletters/{ref}/requeue, from the dead letters pages."""
    from services.ops.dlq import letters, requeue, resolve

    form = await form_of(request)

    async def run() -> str:
        bus = bus_of(request)
        with ops_errors(not_found=True):
            seq = resolve(await letters(bus), ref)
        with ops_errors():
            target = await requeue(
                bus,
                seq,
                actor=principal.name,
                reason=form.get("reason", "")[:1024],
                client=client_of(request),
                via="web",
            )
        return f"Dead letter {seq} requeued as {target}."

    return await act(principal, _back_of(form, ref), run)


@post("/deadletters/{ref:str}/drop", name="page.deadletter.drop", include_in_schema=False)
async def drop_form(
    request: Request[Any, Any, Any], ref: str, principal: Principal
) -> Response[Any]:
    """POST /api/v1/deadletters/{ref}/drop, from the dead letters pages (a reason is
    required, recorded with who)."""
    from services.ops.dlq import drop, letters, resolve

    form = await form_of(request)

    async def run() -> str:
        reason = form.get("reason", "").strip()[:1024]
        if not reason:
            raise ApiError(422, "say why the dead letter is dropped (reason)", "invalid")
        bus = bus_of(request)
        with ops_errors(not_found=True):
            seq = resolve(await letters(bus), ref)
        with ops_errors():
            await drop(
                bus, seq, actor=principal.name, reason=reason, client=client_of(request), via="web"
            )
        return f"Dead letter {seq} dropped."

    return await act(principal, _back_of(form, ref), run)


# --- outbound ----------------------------------------------------------------------------------

Account = Annotated[str | None, Parameter(max_length=64, description="Only this account's jobs.")]


async def _outbound(request: Request[Any, Any, Any], account: str | None) -> list[dict[str, Any]]:
    from services.ops.outbound import queued_jobs

    if account:
        console.check_account(account)
    with ops_errors():
        return await queued_jobs(bus_of(request), account or None)


@get("/api/v1/outbound", name="api.outbound")
async def outbound(
    request: Request[Any, Any, Any],
    account: Account = None,
    limit: Limit = None,
    cursor: Cursor = None,
) -> Page:
    """Jobs still queued on OUTBOUND, by account, chat and send order, with each one's
    send state (`queued` until first tried, then sending/failed/...; at most 5000)."""
    return page(await _outbound(request, account), limit, cursor)


@get("/outbound", name="page.outbound", include_in_schema=False)
async def outbound_page(
    request: Request[Any, Any, Any],
    principal: Principal,
    account: Account = None,
    limit: Limit = None,
    cursor: Cursor = None,
) -> Response[str]:
    """What GET /api/v1/outbound lists: per account and chat, the jobs still queued."""
    from services.ops.outbound import per_chat

    rows = await _outbound(request, account)
    shown = page(rows, limit, cursor)
    columns = ("seq", "at", "account", "chat", "job_id", "send_state", "attempt", "holder")
    items = [
        {**{k: r[k] for k in columns}, "token": r["lease_token"], "last error": r["last_error"]}
        for r in shown.items
    ]
    body = (
        '<p><a href="/deadletters">Dead letters</a></p>'
        + "<h2>Per chat</h2>"
        + table(per_chat(rows), "Nothing is queued.")
        + "<h2>Jobs</h2>"
        + table(items, "Nothing is queued.")
        + _next_link("/outbound", shown, account=account or "")
    )
    return console_page("Outbound", principal, body)


OPS_HANDLERS: list[HTTPRouteHandler] = [
    accounts_page,
    handover_form,
    resume_form,
    send_form,
    deadletters_page,
    deadletter_page,
    requeue_form,
    drop_form,
    outbound,
    outbound_page,
]
