"""Conversations: per account and chat, the transcript the audit uses, live by
server-sent events fed by JetStream (issue 18 item 3)."""

from __future__ import annotations

from litestar.handlers import HTTPRouteHandler

LIVE_HANDLERS: list[HTTPRouteHandler] = []
