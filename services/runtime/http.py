"""The role's HTTP server (ADR 0027): Litestar on uvicorn, in the role's own event loop.

Any role may serve HTTP when SVC_HTTP_PORT is set: `GET /healthz`, `GET /readyz` and
`GET /metrics` always (ADR 0029), plus the route handlers the role brings (the Cloud API
webhooks; the console later). The socket is bound here (port 0 picks a free one, logged
as `http listening`), uvicorn runs with no logging config of its own and no access log,
never touches the process's signal handlers (the role's stop event ends it), and stops
within a bound.
Every error answer is one line of plain text; an unexpected exception is logged here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import socket
from collections.abc import AsyncIterator, Generator, Sequence
from contextlib import asynccontextmanager
from typing import Any

import uvicorn
from litestar import Litestar, MediaType, Request, Response, get
from litestar.exceptions import HTTPException
from litestar.types import ControllerRouterHandler

from services.runtime.errors import ConfigError, ServiceError
from services.runtime.health import READINESS
from services.runtime.metrics import PROMETHEUS_CONTENT_TYPE, render

log = logging.getLogger(__name__)

# Seconds in-flight requests get to finish when the role stops (then they are cancelled).
GRACEFUL_STOP = 5
_START_TIMEOUT = 10.0


class HttpServerError(ServiceError):
    """The HTTP server stopped while the role was running."""


@get("/healthz", media_type=MediaType.TEXT, sync_to_thread=False, include_in_schema=False)
def healthz() -> str:
    """The process is alive (and its event loop answers)."""
    return "ok"


@get("/readyz", media_type=MediaType.TEXT, sync_to_thread=False, include_in_schema=False)
def readyz() -> Response[str]:
    """200 when every readiness check of the process is met; else 503, one line each."""
    unmet = READINESS.unmet()
    if not unmet:
        return text(200, "ready")
    return Response(
        "".join(f"not ready: {line}\n" for line in unmet),
        status_code=503,
        media_type=MediaType.TEXT,
    )


@get("/metrics", sync_to_thread=False, include_in_schema=False)
def metrics() -> Response[str]:
    """The process's metrics as Prometheus text (collected now; no I/O)."""
    return Response(render(), media_type=PROMETHEUS_CONTENT_TYPE)


def text(status: int, line: str) -> Response[str]:
    """A one-line plain-text answer."""
    return Response(line + "\n", status_code=status, media_type=MediaType.TEXT)


def _on_error(request: Request[Any, Any, Any], exc: Exception) -> Response[str]:
    if isinstance(exc, HTTPException):
        answer = text(exc.status_code, str(exc.detail).splitlines()[0] if exc.detail else "error")
        answer.headers.update(exc.headers or {})  # e.g. Allow on a 405
        return answer
    log.error(
        "http handler failed",
        exc_info=exc,
        extra={"method": request.method, "path": request.url.path},
    )
    return text(500, "internal error: see the service's log")


def http_app(handlers: Sequence[ControllerRouterHandler] = ()) -> Litestar:
    """A Litestar app serving `/healthz`, `/readyz`, `/metrics` and `handlers`; errors as
    one plain-text line."""
    return Litestar(
        route_handlers=[healthz, readyz, metrics, *handlers],
        openapi_config=None,
        logging_config=None,
        exception_handlers={Exception: _on_error},
        debug=False,
    )


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: the role's stop event ends the server."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(
            f"SVC_HTTP_HOST={host!r} cannot be resolved ({exc.strerror}): give an address"
            " such as 127.0.0.1 or 0.0.0.0"
        ) from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
        sock.listen(128)
    except OSError as exc:
        sock.close()
        why = "it is in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(
            f"SVC_HTTP_PORT={port}: cannot listen on {host}:{port} ({why}): pick another"
            " port (0 picks a free one) or SVC_HTTP_HOST"
        ) from None
    sock.setblocking(False)
    return sock


class HttpServer:
    """A running server: its `port` and `url`; `until_failed()` raises if it stops early."""

    def __init__(self, server: _Server, task: asyncio.Task[None], url: str, port: int) -> None:
        self._server = server
        self._task = task
        self.url = url
        self.port = port

    async def until_failed(self) -> None:
        """Wait while the server runs; raise HttpServerError if it ends on its own."""
        await asyncio.wait([self._task])  # never cancels the server when we are cancelled
        if not self._server.should_exit:
            error = None if self._task.cancelled() else self._task.exception()
            why = f": {type(error).__name__}: {error}" if error is not None else ""
            raise HttpServerError(f"the HTTP server at {self.url} stopped unexpectedly{why}")


def _url(host: str, port: int) -> str:
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


@asynccontextmanager
async def serve(
    app: Litestar, host: str, port: int, *, graceful: int = GRACEFUL_STOP
) -> AsyncIterator[HttpServer]:
    """Serve `app` on `host:port` (0: a free port) on the running loop until the block
    ends; then stop accepting, give in-flight requests `graceful` s, and cancel the rest."""
    sock = _bind(host, port)
    bound = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        http="h11",
        ws="none",
        lifespan="off",
        interface="asgi3",
        log_config=None,
        log_level=logging.WARNING,  # uvicorn's own chatter ("Started server process")
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=graceful,
    )
    server = _Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]), name=f"http-{bound}")
    try:
        deadline = asyncio.get_running_loop().time() + _START_TIMEOUT
        while not server.started:
            if task.done():
                task.result()  # raises the reason; else it ended without starting
                raise HttpServerError(f"the HTTP server on {host}:{bound} did not start")
            if asyncio.get_running_loop().time() > deadline:
                raise HttpServerError(f"the HTTP server on {host}:{bound} did not start")
            await asyncio.sleep(0.01)  # uvicorn has no started event to wait on
        url = _url(host, bound)
        log.info("http listening", extra={"url": url, "host": host, "port": bound})
        yield HttpServer(server, task, url, bound)
    finally:
        server.should_exit = True
        try:
            await asyncio.wait([task], timeout=graceful + 5)
        except asyncio.CancelledError:  # a second signal: no more grace
            task.cancel()
            sock.close()
            raise
        if not task.done():
            task.cancel()
            await asyncio.wait([task])
            log.warning("http server did not stop in time; cancelled", extra={"port": bound})
        elif not task.cancelled() and task.exception() is not None:
            log.warning("http server ended with an error", extra={"error": repr(task.exception())})
        # A server task that was cancelled or failed never closed its listener: under
        # uvloop an open listener makes closing the loop hang (ADR 0036).
        for listener in server.servers:
            listener.close()
        sock.close()
        log.info("http stopped", extra={"port": bound})
