"""Overview, plugins and policy, access and pending approvals, audit, users, tokens and
webhooks pages (issue 18 item 3)."""

from __future__ import annotations

from litestar.handlers import HTTPRouteHandler

ADMIN_HANDLERS: list[HTTPRouteHandler] = []
