"""Errors of the web side (ADR 0041): under /api/ every error is JSON
`{"error": "<short_code>", "detail": "<one line>"}` with the right status -- Litestar's own
404/405/validation errors included; elsewhere one plain-text line (pages: a browser that
is not logged in is sent to /login instead)."""

from __future__ import annotations

import logging
from typing import Any

import nats.errors
from litestar import MediaType, Request, Response
from litestar.exceptions import HTTPException, NotAuthorizedException, ValidationException
from litestar.response import Redirect

from services.runtime.http import text

log = logging.getLogger(__name__)

API_PREFIX = "/api/"

CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid",
    429: "throttled",
    500: "internal",
    503: "unavailable",
}


class ApiError(HTTPException):
    """An error answer with its own short code (`detail`: one line, never a secret)."""

    def __init__(
        self, status: int, detail: str, code: str = "", headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail=detail, status_code=status, headers=headers)
        self.code = code or CODES.get(status, "error")


def one_line(value: str, limit: int = 300) -> str:
    """`value` on one line, cut to `limit` characters."""
    line = " ".join(str(value).split())
    return line if len(line) <= limit else line[: limit - 3] + "..."


def _validation_detail(exc: ValidationException) -> str:
    extra = exc.extra
    if isinstance(extra, list) and extra:
        first = extra[0]
        if isinstance(first, dict):
            key = first.get("key")
            message = first.get("message", "")
            source = first.get("source", "body")
            source = str(getattr(source, "value", source))
            where = f"{source} {key}".strip() if key else source
            return one_line(f"invalid request ({where}): {message}")
    return one_line(f"invalid request: {exc.detail}")


def error_body(status: int, code: str, detail: str) -> dict[str, str]:
    """The JSON error document."""
    return {"error": code or CODES.get(status, "error"), "detail": one_line(detail)}


def on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    """The web app's one exception handler."""
    api = request.url.path.startswith(API_PREFIX)
    if isinstance(exc, HTTPException):
        status = exc.status_code
        code = getattr(exc, "code", "") or ""
        if isinstance(exc, ValidationException):
            detail = _validation_detail(exc)
        else:
            detail = str(exc.detail) if exc.detail else CODES.get(status, "error")
        if isinstance(exc.extra, dict) and isinstance(exc.extra.get("code"), str):
            code = exc.extra["code"]
        headers = dict(exc.headers or {})
    elif isinstance(exc, nats.errors.Error | TimeoutError):
        # NATS did not store or answer (down, a cluster electing, a denied permission):
        # the request may be retried; the log says which.
        log.warning(
            "http handler: NATS did not answer",
            extra={"path": request.url.path, "error": f"{type(exc).__name__}: {exc}"},
        )
        status, code, headers = 503, "unavailable", {"Retry-After": "5"}
        detail = f"NATS did not answer ({type(exc).__name__}): retry shortly"
    else:
        log.error(
            "http handler failed",
            exc_info=exc,
            extra={"method": request.method, "path": request.url.path},
        )
        status, code, detail, headers = 500, "internal", "internal error: see the service's log", {}
    if api:
        return Response(
            error_body(status, code, detail),
            status_code=status,
            media_type=MediaType.JSON,
            headers=headers,
        )
    if isinstance(exc, NotAuthorizedException) and request.method == "GET":
        return Redirect("/login", status_code=303)
    answer = text(status, one_line(detail))
    answer.headers.update(headers)
    return answer
