"""Who is asking, and may they (ADR 0040): the one guard every web route goes through.

A request is authenticated by `Authorization: Bearer <token>` (API clients; no CSRF
token needed: a browser never adds that header on its own) or else by the session cookie
(the console). A cookie-authenticated unsafe request (POST, PUT, PATCH, DELETE) must echo
the session's CSRF token, as the `X-CSRF-Token` header or a form field `csrf`. The
minimum role of each route comes from services/web/routes.py; a route missing there is
refused (fail closed).
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Any

from litestar import Request
from litestar.connection import ASGIConnection
from litestar.datastructures import Cookie
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler

from contracts.web import allows
from services.web.identity import Identity, Principal
from services.web.routes import MISSING, min_role

SESSION_COOKIE = "svc_session"
LOGIN_CSRF_COOKIE = "svc_login_csrf"  # the login form's double-submit token (no session yet)
CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf"
UNSAFE = frozenset({"POST", "PUT", "PATCH", "DELETE"})
PRINCIPAL = "principal"  # where the guard leaves the principal in the connection's state


@dataclass(frozen=True)
class CookiePolicy:
    """How session cookies are set: `Secure` unless SVC_WEB_INSECURE_COOKIES=1."""

    secure: bool = True
    ttl: int = 8 * 3600

    def session(self, value: str) -> Cookie:
        """The session cookie: HttpOnly, SameSite=Lax, Secure (unless turned off)."""
        return Cookie(
            key=SESSION_COOKIE,
            value=value,
            max_age=self.ttl,
            path="/",
            httponly=True,
            secure=self.secure,
            samesite="lax",
        )

    def login_csrf(self, value: str) -> Cookie:
        """The login form's CSRF cookie (Strict: only this site's own form posts it)."""
        return Cookie(
            key=LOGIN_CSRF_COOKIE,
            value=value,
            max_age=3600,
            path="/login",
            httponly=True,
            secure=self.secure,
            samesite="strict",
        )

    def cleared(self, key: str, path: str = "/") -> Cookie:
        """A cookie that deletes `key` in the browser."""
        return Cookie(key=key, value="", max_age=0, path=path, httponly=True, secure=self.secure)


def client_of(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """The client's address (the peer; behind a trusted proxy, uvicorn has put the
    X-Forwarded-For address there: FORWARDED_ALLOW_IPS)."""
    client = connection.client
    return client.host if client is not None else ""


def identity_of(connection: ASGIConnection[Any, Any, Any, Any]) -> Identity:
    """The identity store the app was built with."""
    found: Identity = connection.app.state["identity"]
    return found


async def authenticate(connection: ASGIConnection[Any, Any, Any, Any]) -> Principal | None:
    """The principal behind the request, or None. A bad bearer token is None even when a
    cookie is also sent: an API client must not fall back to a browser's session."""
    identity = identity_of(connection)
    header = connection.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            return None
        return await identity.check_token(value.strip())
    cookie = connection.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    return await identity.session(cookie)


async def _csrf_sent(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    sent = connection.headers.get(CSRF_HEADER)
    if sent:
        return sent
    kind = connection.headers.get("content-type", "")
    if kind.startswith(("application/x-www-form-urlencoded", "multipart/form-data")):
        # Parsed once and cached in the connection state: the handler reads it again.
        form = await Request[Any, Any, Any](connection.scope, connection.receive).form()
        value = form.get(CSRF_FIELD)
        return value if isinstance(value, str) else ""
    return ""


async def guard(connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler) -> None:
    """Let the request through only with the route's minimum role (and, for a cookie
    session's unsafe request, its CSRF token); 401 without credentials, 403 too weak."""
    needed = min_role(handler.name)
    if needed is MISSING and connection.scope.get("method") == "OPTIONS":
        return  # Litestar's own OPTIONS answer (Allow): no data, no action
    if needed is MISSING:
        raise PermissionDeniedException(
            f"route {handler.name!r} has no role in services/web/routes.py: refused"
        )
    if needed is None:
        return
    principal = await authenticate(connection)
    if principal is None:
        raise NotAuthorizedException(
            "not logged in: log in at /login, or send 'Authorization: Bearer <token>'"
        )
    if not allows(principal.role, str(needed)):
        raise PermissionDeniedException(
            f"this needs the {needed} role; {principal.kind} {principal.name} is {principal.role}"
        )
    if principal.kind == "user" and connection.scope.get("method") in UNSAFE:
        sent = await _csrf_sent(connection)
        if not sent or not hmac.compare_digest(sent, principal.csrf):
            raise PermissionDeniedException(
                "missing or wrong CSRF token: send the session's token as X-CSRF-Token"
                " (or the form field csrf)",
                extra={"code": "csrf"},
            )
    connection.state[PRINCIPAL] = principal


def principal_of(request: Request[Any, Any, Any]) -> Principal:
    """The principal the guard let through (a dependency of every non-public handler)."""
    found: Principal | None = request.state.get(PRINCIPAL)
    if found is None:  # a public handler asked for it: a programming error
        raise NotAuthorizedException("not logged in")
    return found
