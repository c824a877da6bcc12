"""Overview, plugins and policy, access and pending approvals, audit, users, tokens and
webhooks pages (issue 18 item 3), and the webhook API (/api/v1/webhooks).

Every console action calls the API handler's own function (`<handler>.fn`) with the form
converted to the handler's body type: one implementation, one validation, the same
recorded actor. A POST answers 303 back to its page with a one-line result in the query
string (`ok=` or `error=`, shown escaped); the one exception is a new API token, shown
once on the answer page itself (never in a URL, a log or an event).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from html import escape
from typing import Annotated, Any, TypeVar
from urllib.parse import quote

import msgspec
from litestar import Request, Response, delete, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter
from litestar.response import Redirect

from contracts.events import CHANNEL_WHATSAPP
from contracts.hooks import HOOKABLE, WebhookDeadLettered, check_subscription_id
from contracts.web import allows
from services.web import api
from services.web.api import Cursor, Limit, Short, bus_of, ops_errors
from services.web.console import Page, page
from services.web.errors import ApiError, one_line
from services.web.identity import Principal
from services.web.pages import act, back, console_page, flash, form_of, post_form, table

B = TypeVar("B")

STATUS_DISCOVERY = {"first": 0.5, "stall": 0.2, "limit": 1.5}  # as GET /api/v1/status
AUDIT_LIMIT_S = 60.0  # the audit page gives up (one line) after this long
TEST_WAIT_S = 10.0  # how long a test delivery waits for its first attempt's record


# --- helpers ---------------------------------------------------------------------------------


def _words(value: str) -> list[str]:
    """A comma- or space-separated list."""
    return [w for w in value.replace(",", " ").split() if w]


def _opt(value: str | None) -> str | None:
    value = (value or "").strip()
    return value or None


def _body(kind: type[B], fields: dict[str, Any]) -> B:
    """`fields` as the API's body type, validated as the API validates it (422 else)."""
    try:
        return msgspec.convert(fields, kind, strict=False)
    except msgspec.ValidationError as exc:
        raise ApiError(422, f"invalid form: {exc}", "invalid") from None


async def _act(
    principal: Principal,
    path: str,
    done: Callable[[Any], str],
    action: Callable[[], Awaitable[Any]],
) -> Response[Any]:
    """Run a console action; 303 back to `path` saying how it went (`done` of its result)."""

    async def run() -> str:
        return done(await action())

    return await act(principal, path, run)


def _input(label: str, name: str, *, kind: str = "text", value: str = "", extra: str = "") -> str:
    return (
        f'<label>{escape(label)} <input name="{escape(name)}" type="{kind}"'
        f' value="{escape(value)}"{extra}></label>'
    )


def _select(label: str, name: str, options: list[str], chosen: str = "") -> str:
    shown = "".join(
        f'<option value="{escape(o)}"{" selected" if o == chosen else ""}>{escape(o)}</option>'
        for o in options
    )
    return f'<label>{escape(label)} <select name="{escape(name)}">{shown}</select></label>'


ROLES = ["viewer", "operator", "admin"]


# --- overview ----------------------------------------------------------------------------------


@get("/", name="home", include_in_schema=False)
async def home(request: Request[Any, Any, Any], principal: Principal) -> Response[str]:
    """Roles online, streams, consumer lag, open dead letters, parked accounts: what
    GET /api/v1/status (and `svc status`) shows."""
    from services.ops.status import collect_status

    with ops_errors():
        status = await collect_status(bus_of(request), **STATUS_DISCOVERY)
    workers = [
        {
            "role": w["role"],
            "name": w["name"],
            "host": w["host"],
            "pid": w["pid"],
            "holder": w["holder"],
            "answered": "yes" if w["answered"] else "no",
        }
        for w in status["workers"]
    ]
    streams = [
        {"stream": s["name"], "messages": s.get("messages", 0), "bytes": s.get("bytes", 0)}
        if not s.get("missing")
        else {"stream": s["name"], "messages": "missing", "bytes": ""}
        for s in status["streams"]
    ]
    lag = [
        {
            "stream": s["name"],
            "consumer": c["name"],
            "pending": c["pending"],
            "ack_pending": c["ack_pending"],
            "redelivered": c["redelivered"],
        }
        for s in status["streams"]
        for c in s.get("consumers", [])
    ]
    parked = [
        {"account": lease["key"], "reason": lease["parked"], "until": lease["until"]}
        for lease in status["leases"]
        if lease["parked"]
    ]
    letters = int(status["dead_letters"])
    body = (
        f"<p>As of {escape(status['at'])}. "
        'API: <a href="/api/v1/openapi.json">/api/v1/openapi.json</a></p>'
        f'<h2>Roles online ({len(workers)})</h2><div id="roles">'
        f"{table(workers, 'No role answered: is any `svc run` up?')}</div>"
        f'<h2>Dead letters</h2><p id="dead-letters"><a href="/deadletters">'
        f"{letters} open dead letter{'' if letters == 1 else 's'}</a></p>"
        f'<h2>Parked accounts ({len(parked)})</h2><div id="parked">'
        f"{table(parked, 'No account is parked.')}"
        '<p><a href="/accounts">All accounts</a></p></div>'
        f'<h2>Streams</h2><div id="streams">{table(streams, "No streams.")}</div>'
        f'<h2>Consumer lag</h2><div id="lag">{table(lag, "No consumers.")}</div>'
    )
    return console_page("Overview", principal, body)


# --- plugins and policy ------------------------------------------------------------------------


@get("/plugins", name="page.plugins", include_in_schema=False)
async def plugins_page(
    request: Request[Any, Any, Any],
    principal: Principal,
    account: Annotated[str, Parameter(max_length=64)] = "default",
    channel: Annotated[str, Parameter(max_length=32)] = CHANNEL_WHATSAPP,
) -> Response[str]:
    """Available and installed plugins, tool policies, the resolved tools of one
    (channel, account) and, for an admin, the policy form (= PUT /api/v1/plugins/policy)."""
    listing = await api.plugins.fn(request)
    try:
        resolved = table(
            await api.plugins_resolve.fn(request, account=account, channel=channel),
            "No tools for this account.",
        )
    except ApiError as exc:
        resolved = f'<p class="error" role="alert">{escape(one_line(str(exc.detail)))}</p>'
    available = [
        {
            "name": p.get("name", ""),
            "version": p.get("version", ""),
            "tools": ", ".join(t.get("name", "") for t in p.get("tools", [])),
            "description": p.get("description", ""),
        }
        for p in listing["available"]
    ]
    installed = [
        {"scope": r["scope"], "name": r["name"], "state": r["state"], "version": r["version"]}
        for r in listing["installed"]
    ]
    policies = [
        {"scope": p["scope"], "allow": ", ".join(p["allow"]), "deny": ", ".join(p["deny"])}
        for p in listing["policies"]
    ]
    body = (
        flash(request, principal)
        + f"<h2>Available plugins</h2>{table(available, 'No plugins.')}"
        + f"<h2>Installed</h2>{table(installed, 'Nothing installed: the defaults apply.')}"
        + f'<h2>Tool policies</h2><div id="policies">{table(policies, "No policies.")}</div>'
        + f"<h2>Resolved for {escape(channel)} / {escape(account)}</h2>"
        + '<form method="get" action="/plugins">'
        + _input("Channel", "channel", value=channel)
        + _input("Account", "account", value=account)
        + f'<button type=submit>Resolve</button></form><div id="resolved">{resolved}</div>'
    )
    if allows(principal.role, "admin"):
        body += "<h2>Set a scope's policy</h2>" + post_form(
            principal,
            "/plugins/policy",
            "Set policy",
            inputs=_input("Channel (empty: global)", "channel")
            + _input("Account (empty: the whole channel)", "account")
            + _input("Allow (plugin.tool globs, comma-separated)", "allow")
            + _input("Deny (plugin.tool globs, comma-separated)", "deny"),
        )
    return console_page("Plugins and policy", principal, body)


@post("/plugins/policy", name="page.plugins.policy", include_in_schema=False, status_code=303)
async def plugins_policy_form(
    request: Request[Any, Any, Any], principal: Principal
) -> Response[Any]:
    """The policy form: PUT /api/v1/plugins/policy's function."""
    form = await form_of(request)

    async def action() -> Any:
        data = _body(
            api.PolicyBody,
            {
                "channel": _opt(form.get("channel")),
                "account": _opt(form.get("account")),
                "allow": _words(form.get("allow", "")),
                "deny": _words(form.get("deny", "")),
            },
        )
        return await api.plugins_policy.fn(request, data=data, principal=principal)

    return await _act(
        principal,
        "/plugins",
        lambda r: f"policy of {_scope_name(r['event']['scope'])} set (seq {r['seq']})",
        action,
    )


def _scope_name(scope: Any) -> str:
    if isinstance(scope, dict):
        return "/".join(str(v) for v in scope.values() if v) or "global"
    return str(scope or "global")


# --- access ------------------------------------------------------------------------------------


@get("/access", name="page.access", include_in_schema=False)
async def access_page(request: Request[Any, Any, Any], principal: Principal) -> Response[str]:
    """Modes, rules, approved senders and pending approvals (approve: operator; mode and
    rules: admin), as GET /api/v1/access lists them."""
    view = await api.access.fn(request)
    pending = view.get("pending", [])
    body = flash(request, principal)
    body += f'<h2>Modes</h2><div id="modes">{table(view["modes"], "No mode set: open.")}</div>'
    body += f'<h2>Rules</h2><div id="rules">{table(view["rules"], "No rules.")}</div>'
    body += f"<h2>Approved</h2>{table(view['approved'], 'Nobody approved yet.')}"
    body += f'<h2>Pending approvals ({len(pending)})</h2><div id="pending">'
    if not pending:
        body += "<p>Nobody is waiting.</p>"
    else:
        rows = ""
        for p in pending:
            button = ""
            if allows(principal.role, "operator"):
                button = post_form(
                    principal,
                    "/access/approve",
                    "Approve",
                    {"jid": p["jid"], "account": p["account"], "channel": p["channel"]},
                )
            rows += (
                f"<tr><td>{escape(p['channel'])}</td><td>{escape(p['account'])}</td>"
                f"<td>{escape(p['jid'])}</td><td>{escape(str(p['messages']))}</td>"
                f"<td>{escape(p['first_at'])}</td><td>{button}</td></tr>"
            )
        body += (
            "<table><tr><th>channel</th><th>account</th><th>jid</th><th>messages</th>"
            f"<th>first_at</th><th></th></tr>{rows}</table>"
        )
    body += "</div>"
    if allows(principal.role, "admin"):
        body += "<h2>Set a mode</h2>" + post_form(
            principal,
            "/access/mode",
            "Set mode",
            inputs=_select("Mode", "mode", ["open", "allowlist", "approval"])
            + _input("Channel (empty: whatsapp)", "channel")
            + _input("Account (empty: the whole channel)", "account"),
        )
        body += "<h2>Add a rule</h2>" + post_form(
            principal,
            "/access/rules",
            "Add rule",
            inputs=_select("Kind", "kind", ["allow", "block"])
            + _input("Pattern (a JID or a glob)", "pattern", extra=" required")
            + _input("Channel (empty: whatsapp)", "channel")
            + _input("Account (empty: the whole channel)", "account"),
        )
    return console_page("Access", principal, body)


def _scoped(form: dict[str, str], *keys: str) -> dict[str, Any]:
    found: dict[str, Any] = {k: form.get(k, "").strip() for k in keys}
    found["channel"] = _opt(form.get("channel"))
    found["account"] = _opt(form.get("account"))
    return found


@post("/access/approve", name="page.access.approve", include_in_schema=False, status_code=303)
async def access_approve_form(
    request: Request[Any, Any, Any], principal: Principal
) -> Response[Any]:
    """Approve a pending sender: POST /api/v1/access/approve's function."""
    form = await form_of(request)

    async def action() -> Any:
        data = _body(api.ApproveBody, _scoped(form, "jid"))
        return await api.access_approve.fn(request, data=data, principal=principal)

    return await _act(
        principal,
        "/access",
        lambda r: (
            f"approved {form.get('jid', '')}: {len(r['released'])} waiting message(s) released"
        ),
        action,
    )


@post("/access/mode", name="page.access.mode", include_in_schema=False, status_code=303)
async def access_mode_form(request: Request[Any, Any, Any], principal: Principal) -> Response[Any]:
    """Set a scope's mode: PUT /api/v1/access/mode's function."""
    form = await form_of(request)

    async def action() -> Any:
        data = _body(api.ModeBody, _scoped(form, "mode"))
        return await api.access_mode.fn(request, data=data, principal=principal)

    return await _act(
        principal, "/access", lambda r: f"mode set to {form.get('mode')} (seq {r['seq']})", action
    )


@post("/access/rules", name="page.access.rule", include_in_schema=False, status_code=303)
async def access_rule_form(request: Request[Any, Any, Any], principal: Principal) -> Response[Any]:
    """Add an allow/block pattern: POST /api/v1/access/rules's function."""
    form = await form_of(request)

    async def action() -> Any:
        data = _body(api.RuleBody, _scoped(form, "kind", "pattern"))
        return await api.access_rule.fn(request, data=data, principal=principal)

    return await _act(
        principal,
        "/access",
        lambda r: (
            f"{form.get('kind')} rule {form.get('pattern', '').strip()} added (seq {r['seq']})"
        ),
        action,
    )


# --- audit -------------------------------------------------------------------------------------


def _explain_form(job_id: str = "") -> str:
    return (
        "<h2>Explain a job</h2>"
        '<form method="get" action="/audit/jobs">'
        + _input("Job id", "job_id", value=job_id, extra=" required")
        + "<button type=submit>Explain</button></form>"
    )


@get("/audit", name="page.audit", include_in_schema=False)
async def audit_page(
    request: Request[Any, Any, Any],
    principal: Principal,
    run: Annotated[bool, Parameter(description="Run the audit now.")] = False,
    account: Annotated[str | None, Parameter(max_length=64)] = None,
) -> Response[str]:
    """Run the audit (GET /api/v1/audit's function, at most AUDIT_LIMIT_S) on request and
    show whether every invariant held, how long it took; explain a job."""
    account = _opt(account)
    body = (
        '<form method="get" action="/audit"><input type="hidden" name="run" value="true">'
        + _input("Account (empty: all)", "account", value=account or "")
        + "<button type=submit>Run the audit</button></form>"
    )
    if run:
        began = time.monotonic()
        try:
            async with asyncio.timeout(AUDIT_LIMIT_S):
                report = await api.audit.fn(request, account=account, grace=60.0)
        except TimeoutError:
            body += (
                f'<p class="error" role="alert">The audit took longer than {AUDIT_LIMIT_S:g} s'
                " and was stopped: run `svc audit` from a shell.</p>"
            )
        except ApiError as exc:
            body += f'<p class="error" role="alert">{escape(one_line(str(exc.detail)))}</p>'
        else:
            took = time.monotonic() - began
            body += _audit_result(report, took)
    return console_page("Audit", principal, body + _explain_form())


def _audit_result(report: dict[str, Any], took: float) -> str:
    rules = report["rules"]
    broken = {name: r for name, r in rules.items() if not r["ok"]}
    counts = ", ".join(f"{k}: {v}" for k, v in sorted(report["events"].items()))
    verdict = (
        f"Every invariant held ({len(rules)} rules)."
        if report["ok"]
        else f"{sum(len(r['violations']) for r in broken.values())} violation(s)"
        f" of {len(broken)} rule(s)."
    )
    shown = (
        f'<p id="audit-result" class="{"ok" if report["ok"] else "error"}">{escape(verdict)}'
        f" Took {took:.2f} s (audit {report['elapsed_s']:g} s).</p>"
        f"<p>Events read: {escape(counts) or 'none'}.</p>"
    )
    rows = [
        {
            "rule": name,
            "violation": v.get("message", "") or v.get("detail", "") or str(v),
            "events": ", ".join(v.get("event_ids", [])),
        }
        for name, r in sorted(broken.items())
        for v in r["violations"]
    ]
    return shown + (table(rows, "") if rows else "")


@get("/audit/jobs", name="page.audit.jobs", include_in_schema=False, status_code=303)
async def audit_jobs_go(
    principal: Principal, job_id: Annotated[str, Parameter(max_length=200)] = ""
) -> Response[Any]:
    """The explain form's target: on to /audit/jobs/{job_id}."""
    job_id = job_id.strip()
    if not job_id:
        return back(principal, "/audit", error=True, text="give a job id to explain")
    return Redirect(f"/audit/jobs/{quote(job_id, safe='')}", status_code=303)


@get("/audit/jobs/{job_id:str}", name="page.audit.job", include_in_schema=False)
async def audit_job_page(
    request: Request[Any, Any, Any], principal: Principal, job_id: str
) -> Response[str]:
    """Why a job was sent: GET /api/v1/audit/jobs/{job_id}'s function, one step a line."""
    from projections.transcript import Chain, chain_lines

    try:
        chain = await api.audit_explain.fn(request, job_id=job_id)
    except ApiError as exc:
        shown = f'<p class="error" role="alert">{escape(one_line(str(exc.detail)))}</p>'
    else:
        try:
            lines = chain_lines(msgspec.convert(chain, Chain, strict=False))
            shown = f'<pre id="chain">{escape(chr(10).join(lines))}</pre>'
        except (msgspec.ValidationError, TypeError, ValueError):
            raw = msgspec.json.format(msgspec.json.encode(chain)).decode()
            shown = f'<pre id="chain">{escape(raw)}</pre>'
    return console_page(f"Job {job_id}", principal, shown + _explain_form(job_id))


# --- users and tokens (admin) ------------------------------------------------------------------


def _users_body(
    request: Request[Any, Any, Any],
    principal: Principal,
    users: list[dict[str, Any]],
    tokens: list[dict[str, Any]],
    shown: str = "",
) -> str:
    rows = ""
    for u in users:
        remove = post_form(principal, f"/users/{quote(u['name'], safe='')}/remove", "Remove")
        rows += (
            f"<tr><td>{escape(u['name'])}</td><td>{escape(u['role'])}</td>"
            f"<td>{escape(u['created_at'])}</td><td>{remove}</td></tr>"
        )
    user_table = (
        f"<table><tr><th>name</th><th>role</th><th>created_at</th><th></th></tr>{rows}</table>"
        if users
        else "<p>No users.</p>"
    )
    rows = ""
    for t in tokens:
        revoke = post_form(principal, f"/tokens/{quote(t['id'], safe='')}/revoke", "Revoke")
        rows += (
            f"<tr><td>{escape(t['id'])}</td><td>{escape(t['name'])}</td>"
            f"<td>{escape(t['role'])}</td><td>{escape(t['created_at'])}</td>"
            f"<td>{escape(t['last_used'])}</td><td>{revoke}</td></tr>"
        )
    token_table = (
        "<table><tr><th>id</th><th>name</th><th>role</th><th>created_at</th>"
        f"<th>last_used</th><th></th></tr>{rows}</table>"
        if tokens
        else "<p>No API tokens.</p>"
    )
    return (
        shown
        + flash(request, principal)
        + f'<h2>Users</h2><div id="users">{user_table}</div>'
        + "<h2>Add a user</h2>"
        + post_form(
            principal,
            "/users",
            "Add user",
            inputs=_input("Name", "name", extra=' required autocomplete="off"')
            + _select("Role", "role", ROLES)
            + _input("Password", "password", kind="password", extra=' autocomplete="new-password"'),
        )
        + f'<h2>API tokens</h2><div id="tokens">{token_table}</div>'
        + "<h2>Create a token</h2>"
        + post_form(
            principal,
            "/tokens",
            "Create token",
            inputs=_input("Name", "name", extra=' required autocomplete="off"')
            + _select("Role", "role", ROLES),
        )
    )


async def _people(request: Request[Any, Any, Any]) -> tuple[list[Any], list[Any]]:
    from services.ops.users import list_tokens, list_users

    with ops_errors():
        return await list_users(bus_of(request)), await list_tokens(bus_of(request))


@get("/users", name="page.users", include_in_schema=False)
async def users_page(request: Request[Any, Any, Any], principal: Principal) -> Response[str]:
    """Users (name, role, created; never a hash) and API tokens (never a secret), with
    add, remove, create and revoke (= /api/v1/users and /api/v1/tokens)."""
    users, tokens = await _people(request)
    return console_page(
        "Users and tokens", principal, _users_body(request, principal, users, tokens)
    )


@post("/users", name="page.users.add", include_in_schema=False, status_code=303)
async def users_add_form(request: Request[Any, Any, Any], principal: Principal) -> Response[Any]:
    """Add a user: POST /api/v1/users's function (the password is never echoed)."""
    form = await form_of(request)

    async def action() -> Any:
        data = _body(
            api.UserBody,
            {
                "name": form.get("name", "").strip(),
                "role": form.get("role", ""),
                "password": form.get("password", ""),
            },
        )
        return await api.users_add.fn(request, data=data, principal=principal)

    return await _act(
        principal, "/users", lambda r: f"added user {r['name']} ({r['role']})", action
    )


@post(
    "/users/{name:str}/remove", name="page.users.remove", include_in_schema=False, status_code=303
)
async def users_remove_form(
    request: Request[Any, Any, Any], principal: Principal, name: str
) -> Response[Any]:
    """Remove a user: DELETE /api/v1/users/{name}'s function."""

    async def action() -> Any:
        return await api.users_remove.fn(request, name=name, principal=principal)

    return await _act(
        principal,
        "/users",
        lambda r: f"removed user {r['name']} ({r['sessions_ended']} session(s) ended)",
        action,
    )


@post("/tokens", name="page.tokens.create", include_in_schema=False, status_code=200)
async def tokens_create_form(
    request: Request[Any, Any, Any], principal: Principal
) -> Response[Any]:
    """Create a token: POST /api/v1/tokens's function. The token is shown on this answer
    only (no redirect: it must never be in a URL); errors go back as one line."""
    form = await form_of(request)
    try:
        data = _body(
            api.TokenBody, {"name": form.get("name", "").strip(), "role": form.get("role", "")}
        )
        made = await api.tokens_create.fn(request, data=data, principal=principal)
    except ApiError as exc:
        return back(principal, "/users", error=True, text=str(exc.detail))
    users, tokens = await _people(request)
    shown = (
        f'<div class="ok" role="status"><p>Created token {escape(made["name"])}'
        f" ({escape(made['role'])}, id {escape(made['id'])}). Copy it now: it is not shown"
        f' again.</p><p><code id="new-token">{escape(made["token"])}</code></p></div>'
    )
    return console_page(
        "Users and tokens", principal, _users_body(request, principal, users, tokens, shown)
    )


@post(
    "/tokens/{ref:str}/revoke", name="page.tokens.revoke", include_in_schema=False, status_code=303
)
async def tokens_revoke_form(
    request: Request[Any, Any, Any], principal: Principal, ref: str
) -> Response[Any]:
    """Revoke a token: DELETE /api/v1/tokens/{ref}'s function."""

    async def action() -> Any:
        return await api.tokens_revoke.fn(request, ref=ref, principal=principal)

    return await _act(
        principal, "/users", lambda r: f"revoked token {r['name']} ({r['id']})", action
    )


# --- webhooks: the API (admin) -------------------------------------------------------------------


class WebhookBody(msgspec.Struct, frozen=True, kw_only=True):
    """A new webhook: where, which events (see GET /api/v1/webhooks' valid list) and the
    signing secret (16-512 characters; stored, never shown again)."""

    url: Annotated[str, msgspec.Meta(min_length=1, max_length=2048)]
    events: Annotated[list[Short], msgspec.Meta(min_length=1, max_length=100)]
    secret: Annotated[str, msgspec.Meta(max_length=512)]
    description: Short = ""


def _hook_id(webhook: str) -> str:
    with ops_errors():
        return check_subscription_id(webhook)


def _letter_row(x: WebhookDeadLettered) -> dict[str, Any]:
    return {
        "subscription": x.subscription,
        "delivery": x.delivery,
        "event_type": x.event_type,
        "event_id": x.event_id,
        "reason": x.reason,
        "attempts": len(x.errors),
    }


@get("/api/v1/webhooks", name="api.webhooks")
async def webhooks(
    request: Request[Any, Any, Any], limit: Limit = None, cursor: Cursor = None
) -> Page:
    """Live webhook subscriptions, oldest first (`secret` is "set"/"none", never a value)."""
    from services.ops.webhooks import ls

    with ops_errors():
        found = await ls(bus_of(request))
    return page([msgspec.to_builtins(x) for x in found], limit, cursor)


@post("/api/v1/webhooks", name="api.webhooks.add", status_code=201)
async def webhooks_add(
    request: Request[Any, Any, Any], data: WebhookBody, principal: Principal
) -> dict[str, Any]:
    """Subscribe `url` to `events`, signed with `secret` (HMAC-SHA256). Refused (422) for
    an unknown event, a short secret, or a private/loopback target unless the web role has
    SVC_WEBHOOKS_ALLOW_PRIVATE=true -- the rule `svc webhooks add` applies."""
    from services.ops.webhooks import WebhookError, add
    from services.web.hooks import load_hook_settings

    with ops_errors():
        try:
            added = await add(
                bus_of(request),
                data.url,
                list(data.events),
                data.secret,
                settings=load_hook_settings(),
                actor=principal.name,
                description=data.description,
            )
        except WebhookError as exc:  # a bad event, secret or target: the request's fault
            raise ApiError(422, str(exc), "invalid") from None
    found: dict[str, Any] = msgspec.to_builtins(added)
    return found


@delete("/api/v1/webhooks/{webhook:str}", name="api.webhooks.remove", status_code=200)
async def webhooks_remove(
    request: Request[Any, Any, Any], webhook: str, principal: Principal
) -> dict[str, Any]:
    """Remove a subscription: nothing more is delivered to it (404 when there is none)."""
    from services.ops.webhooks import rm

    sub_id = _hook_id(webhook)
    with ops_errors(not_found=True):
        removed = await rm(bus_of(request), sub_id, actor=principal.name)
    found: dict[str, Any] = msgspec.to_builtins(removed)
    return found


@post("/api/v1/webhooks/{webhook:str}/test", name="api.webhooks.test", status_code=200)
async def webhooks_test(
    request: Request[Any, Any, Any], webhook: str, principal: Principal
) -> dict[str, Any]:
    """Send a test delivery (WebhookTestRequested) and say how its first attempt went:
    outcome delivered, failed, dead-lettered or pending (no attempt within 10 s)."""
    from services.ops.webhooks import send_test

    sub_id = _hook_id(webhook)
    with ops_errors(not_found=True):
        result = await send_test(bus_of(request), sub_id, actor=principal.name, wait=TEST_WAIT_S)
    found: dict[str, Any] = msgspec.to_builtins(result)
    return found


@get("/api/v1/webhooks/deadletters", name="api.webhooks.deadletters")
async def webhooks_deadletters(
    request: Request[Any, Any, Any], limit: Limit = None, cursor: Cursor = None
) -> Page:
    """Deliveries given up after every attempt, oldest first."""
    from services.ops.webhooks import dead_letters

    with ops_errors():
        found = await dead_letters(bus_of(request))
    return page([_letter_row(x) for x in found], limit, cursor)


# --- webhooks: the page (admin) ------------------------------------------------------------------


@get("/webhooks", name="page.webhooks", include_in_schema=False)
async def webhooks_page(request: Request[Any, Any, Any], principal: Principal) -> Response[str]:
    """Webhooks (never a secret) with remove and test delivery, the add form, and the
    webhook dead letters."""
    from services.ops.webhooks import dead_letters, ls

    with ops_errors():
        found = await ls(bus_of(request))
        letters = await dead_letters(bus_of(request))
    rows = ""
    for h in found:
        actions = post_form(
            principal, f"/webhooks/{quote(h.id, safe='')}/test", "Test delivery"
        ) + post_form(principal, f"/webhooks/{quote(h.id, safe='')}/remove", "Remove")
        rows += (
            f"<tr><td>{escape(h.id)}</td><td>{escape(h.url)}</td>"
            f"<td>{escape(', '.join(h.events))}</td><td>{escape(h.secret)}</td>"
            f"<td>{escape(h.since.isoformat(timespec='seconds'))}</td>"
            f"<td>{escape(h.actor)}</td><td>{escape(h.description)}</td><td>{actions}</td></tr>"
        )
    hooks = (
        "<table><tr><th>id</th><th>url</th><th>events</th><th>secret</th><th>since</th>"
        f"<th>by</th><th>description</th><th></th></tr>{rows}</table>"
        if found
        else "<p>No webhooks.</p>"
    )
    body = (
        flash(request, principal)
        + f'<div id="webhooks">{hooks}</div>'
        + "<h2>Add a webhook</h2>"
        + post_form(
            principal,
            "/webhooks",
            "Add webhook",
            inputs=_input("URL", "url", extra=" required")
            + _input("Events (comma-separated)", "events", extra=" required")
            + f"<p>Valid events: {escape(', '.join(sorted(HOOKABLE)))}.</p>"
            + _input(
                "Signing secret (16-512 characters; not shown again)",
                "secret",
                kind="password",
                extra=' required autocomplete="off"',
            )
            + _input("Description", "description"),
        )
        + "<h2>Dead letters</h2>"
        + f'<div id="hook-deadletters">'
        f"{table([_letter_row(x) for x in letters], 'No webhook dead letters.')}</div>"
    )
    return console_page("Webhooks", principal, body)


@post("/webhooks", name="page.webhooks.add", include_in_schema=False, status_code=303)
async def webhooks_add_form(request: Request[Any, Any, Any], principal: Principal) -> Response[Any]:
    """Add a webhook: POST /api/v1/webhooks's function (the secret is never echoed)."""
    form = await form_of(request)

    async def action() -> Any:
        data = _body(
            WebhookBody,
            {
                "url": form.get("url", "").strip(),
                "events": _words(form.get("events", "")),
                "secret": form.get("secret", ""),
                "description": form.get("description", "").strip(),
            },
        )
        return await webhooks_add.fn(request, data=data, principal=principal)

    return await _act(
        principal,
        "/webhooks",
        lambda r: f"added webhook {r['id']}: {r['url']} <- {', '.join(r['events'])}",
        action,
    )


@post(
    "/webhooks/{webhook:str}/remove",
    name="page.webhooks.remove",
    include_in_schema=False,
    status_code=303,
)
async def webhooks_remove_form(
    request: Request[Any, Any, Any], principal: Principal, webhook: str
) -> Response[Any]:
    """Remove a webhook: DELETE /api/v1/webhooks/{id}'s function."""

    async def action() -> Any:
        return await webhooks_remove.fn(request, webhook=webhook, principal=principal)

    return await _act(
        principal, "/webhooks", lambda r: f"removed webhook {r['id']} ({r['url']})", action
    )


def _tested(r: dict[str, Any]) -> str:
    if r["outcome"] == "delivered":
        return (
            f"test {r['delivery']} delivered: HTTP {r['status']} in {r['latency_ms']:g} ms"
            f" (attempt {r['attempt']})"
        )
    return f"test {r['delivery']} {r['outcome']}: {r['error']}"


@post(
    "/webhooks/{webhook:str}/test",
    name="page.webhooks.test",
    include_in_schema=False,
    status_code=303,
)
async def webhooks_test_form(
    request: Request[Any, Any, Any], principal: Principal, webhook: str
) -> Response[Any]:
    """Test delivery: POST /api/v1/webhooks/{id}/test's function; the outcome as one line
    (an error line unless delivered)."""
    try:
        result = await webhooks_test.fn(request, webhook=webhook, principal=principal)
    except ApiError as exc:
        return back(principal, "/webhooks", error=True, text=str(exc.detail))
    if result["outcome"] == "delivered":
        return back(principal, "/webhooks", text=_tested(result))
    return back(principal, "/webhooks", error=True, text=_tested(result))


ADMIN_HANDLERS: list[HTTPRouteHandler] = [
    home,
    plugins_page,
    plugins_policy_form,
    access_page,
    access_approve_form,
    access_mode_form,
    access_rule_form,
    audit_page,
    audit_jobs_go,
    audit_job_page,
    users_page,
    users_add_form,
    users_remove_form,
    tokens_create_form,
    tokens_revoke_form,
    webhooks,
    webhooks_add,
    webhooks_remove,
    webhooks_test,
    webhooks_deadletters,
    webhooks_page,
    webhooks_add_form,
    webhooks_remove_form,
    webhooks_test_form,
]
