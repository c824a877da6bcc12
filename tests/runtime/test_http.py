"""The role's HTTP server: binds its own socket (port 0 = a free one, logged), answers
/healthz, turns errors into one plain-text line, refuses a busy port with one line, and
stops within its bound, leaving the port closed and the signal handlers untouched."""

from __future__ import annotations

import asyncio
import http.client
import logging
import signal
import socket

import pytest
from litestar import get

from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.http import HttpServerError, http_app, serve
from tests.conftest import role, wait_until
from tests.whatsapp.fake_graph import http_request


async def fetch(url: str, method: str = "GET") -> tuple[int, bytes]:
    answer = await asyncio.to_thread(http_request, url, method, None, None, 10)
    return answer.status, answer.body


async def test_port_0_picks_a_free_port_logs_it_and_healthz_answers_ok(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.INFO, logger="services.runtime.http"):
        async with serve(http_app(), "127.0.0.1", 0) as server:
            assert server.port > 0
            assert server.url == f"http://127.0.0.1:{server.port}"
            assert await fetch(f"{server.url}/healthz") == (200, b"ok")
    [listening] = [r for r in caplog.records if r.getMessage() == "http listening"]
    assert listening.__dict__["url"] == server.url


async def test_errors_are_one_plain_text_line_and_a_failing_handler_is_logged(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @get("/boom", sync_to_thread=False)
    def boom() -> str:
        raise RuntimeError("a bug")

    async with serve(http_app([boom]), "127.0.0.1", 0) as server:
        missing = await fetch(f"{server.url}/nothing-here")
        failed = await fetch(f"{server.url}/boom")
        wrong_method = await fetch(f"{server.url}/healthz", "DELETE")
        assert await fetch(f"{server.url}/healthz") == (200, b"ok")  # still serving
    assert missing[0] == 404
    assert missing[1].count(b"\n") == 1
    assert failed == (500, b"internal error: see the service's log\n")
    assert wrong_method[0] == 405
    assert any(r.getMessage() == "http handler failed" and r.exc_info for r in caplog.records)


async def test_a_busy_port_is_refused_with_one_line_naming_the_variable() -> None:
    async with serve(http_app(), "127.0.0.1", 0) as server:
        with pytest.raises(ConfigError, match=rf"SVC_HTTP_PORT={server.port}: .*in use"):
            async with serve(http_app(), "127.0.0.1", server.port):
                pass


async def test_on_exit_the_port_is_closed_and_the_signal_handlers_are_untouched() -> None:
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    async with serve(http_app(), "127.0.0.1", 0) as server:
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", server.port), timeout=5),
    ):
        pass


async def test_a_request_still_running_at_stop_is_given_the_graceful_bound_then_cancelled() -> None:
    entered, release = asyncio.Event(), asyncio.Event()

    @get("/slow")
    async def slow() -> str:
        entered.set()
        await release.wait()  # never set: only the stop bound ends it
        return "late"

    loop = asyncio.get_running_loop()
    async with serve(http_app([slow]), "127.0.0.1", 0, graceful=1) as server:
        pending = asyncio.ensure_future(fetch(f"{server.url}/slow"))
        await asyncio.wait_for(entered.wait(), 10)
        stopping = loop.time()
    took = loop.time() - stopping
    assert took < 8, took  # 1 s graceful (+ uvicorn's 0.1 s); measured ~1.1 s
    # The cancelled request got uvicorn's 500 (or a dropped connection), never a hang.
    try:
        status, _ = await asyncio.wait_for(pending, 10)
    except (ConnectionError, http.client.HTTPException):
        status = 0
    assert status in (0, 500)


async def test_a_server_that_ends_on_its_own_is_reported_to_the_role_but_a_stop_is_not() -> None:
    async with serve(http_app(), "127.0.0.1", 0) as server:
        watching = asyncio.ensure_future(server.until_failed())
        server._task.cancel()  # the server dies under the role (a uvicorn crash)
        with pytest.raises(HttpServerError, match="stopped unexpectedly"):
            await asyncio.wait_for(watching, 10)
    async with serve(http_app(), "127.0.0.1", 0) as server:
        watching = asyncio.ensure_future(server.until_failed())
    await asyncio.wait_for(watching, 10)  # the block's end stopped it: no error


async def test_a_role_with_svc_http_port_serves_healthz_and_webhooks_only_with_cloud(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="services.runtime.http"):
        async with role(bus, "whatsapp-ingress", SVC_HTTP_PORT="0"):  # the sim's ingress
            await wait_until(
                lambda: any(r.getMessage() == "http listening" for r in caplog.records),
                what="the role's HTTP server",
            )
            [url] = [
                r.__dict__["url"] for r in caplog.records if r.getMessage() == "http listening"
            ]
            assert await fetch(f"{url}/healthz") == (200, b"ok")
            no_webhooks = await fetch(f"{url}/webhooks/whatsapp/default")
            assert no_webhooks[0] == 404  # the sim receives over NATS, not webhooks
    with (
        pytest.raises(ConnectionRefusedError),
        socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])), timeout=5),
    ):
        pass  # stopped with the role
