"""Operator forms: handover, resume, requeue, drop, send. Each posts to a page route
that calls the same function as its /api/v1/ endpoint (issue 18 item 3)."""

from __future__ import annotations

from litestar.handlers import HTTPRouteHandler

OPS_HANDLERS: list[HTTPRouteHandler] = []
