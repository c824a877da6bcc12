"""Server-rendered pages of the console: for now logging in and out, and a home page
(the integrator's pages are added through `web_app(extra=...)`). Every form carries a
CSRF token: the login form a double-submit cookie's, the others the session's."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Awaitable, Callable
from html import escape
from importlib import resources
from typing import Any
from urllib.parse import urlencode

from litestar import MediaType, Request, Response, get, post
from litestar.response import Redirect

from services.web.auth import (
    CSRF_FIELD,
    LOGIN_CSRF_COOKIE,
    SESSION_COOKIE,
    CookiePolicy,
    client_of,
    identity_of,
)
from services.web.errors import ApiError, one_line
from services.web.identity import BadCredentialsError, Principal, ThrottledError

_STYLE = (
    "body{font-family:system-ui,sans-serif;max-width:32rem;margin:3rem auto;padding:0 1rem}"
    "label{display:block;margin:.6rem 0}input{font:inherit;padding:.3rem;width:100%}"
    "button{font:inherit;padding:.4rem 1.2rem;margin-top:.6rem}.error{color:#a00}"
)


def script(name: str) -> Response[bytes]:
    """A script of services/web/static/, served by the role itself (the CSP allows
    scripts from the same origin only, no inline script)."""
    return Response(
        resources.files("services.web").joinpath(f"static/{name}").read_bytes(),
        media_type="text/javascript; charset=utf-8",
        headers={"Cache-Control": "no-cache", "X-Content-Type-Options": "nosniff"},
    )


def html_page(title: str, body: str, *, status: int = 200, csrf: str = "") -> Response[str]:
    """A minimal HTML page (no script, no external resource)."""
    meta = f'<meta name="csrf-token" content="{escape(csrf)}">' if csrf else ""
    document = (
        "<!doctype html><html lang=en><head><meta charset=utf-8>"
        '<meta name="viewport" content="width=device-width, initial-scale=1">'
        f"{meta}<title>{escape(title)} - Switchboard</title><style>{_STYLE}</style></head>"
        f"<body>{body}</body></html>"
    )
    return Response(
        document,
        status_code=status,
        media_type=MediaType.HTML,
        headers={
            "Cache-Control": "no-store",
            "X-Frame-Options": "DENY",
            "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'",
        },
    )


def cookies(request: Request[Any, Any, Any]) -> CookiePolicy:
    """The app's cookie policy."""
    found: CookiePolicy = request.app.state["cookies"]
    return found


def _login_form(
    request: Request[Any, Any, Any], *, error: str = "", status: int = 200
) -> Response[str]:
    token = secrets.token_urlsafe(24)
    message = f'<p class="error" role="alert">{escape(error)}</p>' if error else ""
    answer = html_page(
        "Log in",
        "<h1>Switchboard</h1>"
        f"{message}"
        '<form method="post" action="/login">'
        f'<input type="hidden" name="{CSRF_FIELD}" value="{token}">'
        '<label>User <input name="username" autocomplete="username" required autofocus></label>'
        '<label>Password <input name="password" type="password"'
        ' autocomplete="current-password" required></label>'
        "<button type=submit>Log in</button></form>",
        status=status,
    )
    answer.set_cookie(cookies(request).login_csrf(token))
    return answer


@get("/login", name="login.form", include_in_schema=False)
async def login_form(request: Request[Any, Any, Any]) -> Response[str]:
    """The login form."""
    return _login_form(request)


@post("/login", name="login.submit", include_in_schema=False, status_code=303)
async def login_submit(request: Request[Any, Any, Any]) -> Response[Any]:
    """Check the form's CSRF token and the password; start a session (cookie) and go home.
    Wrong: 401 and the form again; too many failures: 429 with Retry-After."""
    form = await request.form()
    sent = form.get(CSRF_FIELD)
    expected = request.cookies.get(LOGIN_CSRF_COOKIE, "")
    if not isinstance(sent, str) or not expected or not hmac.compare_digest(sent, expected):
        return _login_form(
            request, error="The form expired (missing CSRF token): try again.", status=403
        )
    name, password = form.get("username"), form.get("password")
    if not isinstance(name, str) or not isinstance(password, str) or not name or not password:
        return _login_form(request, error="Give a user name and a password.", status=400)
    try:
        cookie, _ = await identity_of(request).login(name.strip(), password, client_of(request))
    except ThrottledError as exc:
        answer = _login_form(request, error=str(exc), status=429)
        answer.headers["Retry-After"] = str(exc.retry_after)
        return answer
    except BadCredentialsError:
        return _login_form(request, error="Wrong user name or password.", status=401)
    policy = cookies(request)
    done: Response[Any] = Redirect("/", status_code=303)
    done.set_cookie(policy.session(cookie))
    done.set_cookie(policy.cleared(LOGIN_CSRF_COOKIE, "/login"))
    return done


@post("/logout", name="logout", include_in_schema=False, status_code=303)
async def logout(request: Request[Any, Any, Any], principal: Principal) -> Response[Any]:
    """End this session on every replica (the guard checked the form's CSRF token)."""
    cookie = request.cookies.get(SESSION_COOKIE)
    if cookie:
        await identity_of(request).logout(cookie, client_of(request))
    done: Response[Any] = Redirect("/login", status_code=303)
    done.set_cookie(cookies(request).cleared(SESSION_COOKIE))
    return done


NAV = (
    ("/", "Overview"),
    ("/accounts", "Accounts"),
    ("/conversations", "Conversations"),
    ("/deadletters", "Dead letters"),
    ("/plugins", "Plugins"),
    ("/access", "Access"),
    ("/audit", "Audit"),
    ("/webhooks", "Webhooks"),
    ("/users", "Users"),
)


def console_page(title: str, principal: Principal, body: str) -> Response[str]:
    """A console page: the navigation, who is logged in (name and role) and the way out on
    every page, then `body` (already escaped by the caller)."""
    links = " | ".join(f'<a href="{href}">{escape(label)}</a>' for href, label in NAV)
    header = (
        f"<nav>{links}</nav>"
        f'<p class="who">Logged in as <strong>{escape(principal.name)}</strong>'
        f" ({escape(principal.role)}).</p>"
        '<form method="post" action="/logout">'
        f'<input type="hidden" name="{CSRF_FIELD}" value="{escape(principal.csrf)}">'
        "<button type=submit>Log out</button></form>"
    )
    return html_page(title, f"{header}<h1>{escape(title)}</h1>{body}", csrf=principal.csrf)


def table(rows: list[dict[str, Any]], empty: str) -> str:
    """Rows of plain data as an escaped HTML table (`empty` when there is none)."""
    if not rows:
        return f"<p>{escape(empty)}</p>"
    keys = list(rows[0])
    head = "".join(f"<th>{escape(str(k))}</th>" for k in keys)
    body = "".join(
        "<tr>" + "".join(f"<td>{escape(str(row.get(k, '')))}</td>" for k in keys) + "</tr>"
        for row in rows
    )
    return f"<table><tr>{head}</tr>{body}</table>"


def post_form(
    principal: Principal,
    action: str,
    button: str,
    fields: dict[str, str] | None = None,
    *,
    inputs: str = "",
) -> str:
    """A POST form to `action` carrying the session's CSRF token (the guard checks it),
    hidden `fields`, optional visible `inputs` (already escaped HTML) and one button."""
    hidden = "".join(
        f'<input type="hidden" name="{escape(k)}" value="{escape(v)}">'
        for k, v in {CSRF_FIELD: principal.csrf, **(fields or {})}.items()
    )
    return (
        f'<form method="post" action="{escape(action)}">{hidden}{inputs}'
        f"<button type=submit>{escape(button)}</button></form>"
    )


# --- the one-line result after a POST (every console form) --------------------------------------


def _sign(principal: Principal, kind: str, text: str) -> str:
    key = principal.csrf.encode()
    return hmac.new(key, f"{kind}\n{text}".encode(), hashlib.sha256).hexdigest()[:32]


def back(principal: Principal, path: str, text: str, *, error: bool = False) -> Response[Any]:
    """303 to `path` with a one-line result (`error`: shown as an error)."""
    kind = "error" if error else "ok"
    line = one_line(text)
    query = urlencode({"flash": line, "kind": kind, "sig": _sign(principal, kind, line)})
    done: Response[Any] = Redirect(f"{path}?{query}", status_code=303)
    return done


def flash(request: Request[Any, Any, Any], principal: Principal) -> str:
    """The result line a redirect carried (escaped), if this session signed it."""
    text = request.query_params.get("flash") or ""
    kind = request.query_params.get("kind") or "ok"
    sig = request.query_params.get("sig") or ""
    if not text or kind not in ("ok", "error") or not principal.csrf:
        return ""
    if not hmac.compare_digest(sig, _sign(principal, kind, text)):
        return ""
    css = "error" if kind == "error" else "ok"
    role = "alert" if kind == "error" else "status"
    return f'<p class="flash {css}" role="{role}">{escape(text)}</p>'


async def act(
    principal: Principal, path: str, action: Callable[[], Awaitable[str]]
) -> Response[Any]:
    """Run a form's action; 303 back to `path` with its result or its error (one line)."""
    try:
        result = await action()
    except ApiError as exc:
        return back(principal, path, str(exc.detail), error=True)
    return back(principal, path, result)


async def form_of(request: Request[Any, Any, Any]) -> dict[str, str]:
    """The posted form's text fields (the guard has already checked its CSRF token)."""
    form = await request.form()
    return {k: v for k, v in form.items() if isinstance(v, str)}


PAGE_HANDLERS = [login_form, login_submit, logout]
