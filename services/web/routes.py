"""Every web route's minimum role, in one place (ADR 0040).

Keys are route handler names (`name=` on the handler). The guard (services/web/auth.py)
looks a handler up here on every request, and the app factory refuses to start when a
handler of the web router has no entry, so a new page or endpoint cannot be served
without a decision. `None` marks a public route. Roles nest: viewer < operator < admin.
"""

from __future__ import annotations

from typing import Final

from contracts.web import WebRole

PUBLIC: Final = None

ROUTE_ROLES: dict[str, WebRole | None] = {
    # Logging in and out (server-rendered; services/web/pages.py).
    "login.form": PUBLIC,
    "login.submit": PUBLIC,
    "logout": "viewer",
    "home": "viewer",
    "page.accounts": "viewer",
    "page.deadletters": "viewer",
    # The OpenAPI document: public, it holds no data.
    "api.openapi": PUBLIC,
    # Read: viewer.
    "api.me": "viewer",
    "api.status": "viewer",
    "api.accounts": "viewer",
    "api.messages": "viewer",
    "api.deadletters": "viewer",
    "api.deadletter": "viewer",
    "api.plugins": "viewer",
    "api.plugins.resolve": "viewer",
    "api.access": "viewer",
    "api.access.pending": "viewer",
    "api.audit": "viewer",
    "api.audit.explain": "viewer",
    # Day-to-day operation: operator.
    "api.send": "operator",
    "api.handover": "operator",
    "api.resume": "operator",
    "api.deadletter.requeue": "operator",
    "api.deadletter.drop": "operator",
    "api.access.approve": "operator",
    # Policy and identity: admin.
    "api.plugins.policy": "admin",
    "api.access.mode": "admin",
    "api.access.rule": "admin",
    "api.users": "admin",
    "api.users.add": "admin",
    "api.users.remove": "admin",
    "api.tokens": "admin",
    "api.tokens.create": "admin",
    "api.tokens.revoke": "admin",
    # --- conversations and live updates (services/web/console_live.py) ---
    "page.conversations": "viewer",
    "page.conversation": "viewer",
    "live.events": "viewer",
    "static.live": PUBLIC,  # the page's script: no data
    "api.chats": "viewer",
    "api.events": "viewer",
    # --- operator forms: handover, resume, requeue, drop, send (console_ops.py) ---
    "page.accounts.handover": "operator",
    "page.accounts.resume": "operator",
    "page.accounts.send": "operator",
    "page.deadletter": "viewer",
    "page.deadletter.requeue": "operator",
    "page.deadletter.drop": "operator",
    "page.outbound": "viewer",
    "api.outbound": "viewer",
    # --- overview, plugins, access, audit, users, tokens, webhooks (console_admin.py) ---
    "page.plugins": "viewer",
    "page.plugins.policy": "admin",
    "page.access": "viewer",
    "page.access.approve": "operator",
    "page.access.mode": "admin",
    "page.access.rule": "admin",
    "page.audit": "viewer",
    "page.audit.jobs": "viewer",
    "page.audit.job": "viewer",
    "page.users": "admin",
    "page.users.add": "admin",
    "page.users.remove": "admin",
    "page.tokens.create": "admin",
    "page.tokens.revoke": "admin",
    "page.webhooks": "admin",
    "page.webhooks.add": "admin",
    "page.webhooks.remove": "admin",
    "page.webhooks.test": "admin",
    "api.webhooks": "admin",
    "api.webhooks.add": "admin",
    "api.webhooks.remove": "admin",
    "api.webhooks.test": "admin",
    "api.webhooks.deadletters": "admin",
    # --- pairing: QR / pairing code (console_pair.py) ---
    "page.pair": "operator",
    "pair.start": "operator",
    "pair.view": "operator",
    "static.pair": PUBLIC,  # a static script, no data
    "api.pair.start": "operator",
    "api.pair.state": "operator",
}

MISSING: Final = "missing"


def min_role(name: str | None) -> WebRole | str | None:
    """The minimum role of the handler called `name`; MISSING when it has no entry."""
    if name is None or name not in ROUTE_ROLES:
        return MISSING
    return ROUTE_ROLES[name]
