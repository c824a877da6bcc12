"""Pairing an account from the browser: a QR shown as it rotates, or a pairing code
(issue 18 item 3)."""

from __future__ import annotations

from litestar.handlers import HTTPRouteHandler

PAIR_HANDLERS: list[HTTPRouteHandler] = []
