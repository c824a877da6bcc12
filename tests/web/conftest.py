"""The web side under test: real `svc run web` processes on a real nats-server, spoken to
over real HTTP. Cookies are carried by hand (the session cookie is `Secure`, so an HTTP
client would rightly not send it back over plain http)."""

from __future__ import annotations

import json
import os
import re
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from argon2 import PasswordHasher

from services.runtime.bus import Bus
from services.web.identity import Identity
from tests.conftest import Processes, wait_until

# Cheap argon2id parameters for users the tests create directly (the hash carries its
# parameters, so the web process verifies with these); `svc users add` uses the defaults.
FAST_HASHER = PasswordHasher(time_cost=1, memory_cost=8192, parallelism=1)
PASSWORD = "correct horse battery staple"


@dataclass
class Web:
    """A running `svc run web` process and its base URL."""

    proc: subprocess.Popen[bytes]
    url: str

    def client(self) -> httpx.AsyncClient:
        """An HTTP client on this process (no cookie jar use: cookies are passed by hand)."""
        return httpx.AsyncClient(base_url=self.url, timeout=30, follow_redirects=False)


@dataclass
class Session:
    """A logged-in browser: its session cookie and CSRF token."""

    cookie: str
    csrf: str

    def headers(self, *, csrf: bool = True) -> dict[str, str]:
        """The headers a browser's script sends (cookie, and the CSRF token)."""
        found = {"Cookie": f"svc_session={self.cookie}"}
        if csrf:
            found["X-CSRF-Token"] = self.csrf
        return found


def http_url(processes: Processes, proc: subprocess.Popen[bytes]) -> str | None:
    """The URL a process logged as `http listening` (None until it did)."""
    for line in processes.log(proc).splitlines():
        if '"http listening"' in line:
            return str(json.loads(line)["url"])
    return None


async def start_web(processes: Processes, nats_url: str, *args: str, **env: str) -> Web:
    """Start `svc run web` (or `svc run ARGS`) on a free port; wait until it is ready."""
    proc = processes.start(
        "run",
        *(args or ("web",)),
        NATS_URL=nats_url,
        SVC_HTTP_PORT="0",
        SVC_LOG_FORMAT="json",
        **env,
    )

    def listening() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"svc run web exited {proc.returncode}: {processes.log(proc)[-2000:]}")
        return http_url(processes, proc) is not None

    await wait_until(listening, 60, "svc run web listening")
    url = http_url(processes, proc)
    assert url is not None
    web = Web(proc, url)

    async def ready() -> bool:
        async with web.client() as client:
            return (await client.get("/readyz")).status_code == 200

    await wait_until(ready, 60, "svc run web ready")
    return web


async def add_user(bus: Bus, name: str, role: str, password: str = PASSWORD) -> None:
    """A console user, stored as `svc users add` stores one (cheaper hash parameters)."""
    await Identity(bus, hasher=FAST_HASHER).add_user(name, role, password, actor="test")


async def add_token(bus: Bus, name: str, role: str) -> str:
    """An API token; the bearer string."""
    _, secret = await Identity(bus).create_token(name, role, actor="test")
    return secret


def bearer(token: str) -> dict[str, str]:
    """The Authorization header of a token."""
    return {"Authorization": f"Bearer {token}"}


def set_cookies(response: httpx.Response) -> dict[str, str]:
    """The raw Set-Cookie headers of a response, by cookie name."""
    found = {}
    for header in response.headers.get_list("set-cookie"):
        name = header.split("=", 1)[0].strip()
        found[name] = header
    return found


def cookie_value(header: str) -> str:
    """The value of one Set-Cookie header."""
    return header.split(";", 1)[0].split("=", 1)[1]


async def login_form(client: httpx.AsyncClient) -> tuple[str, str]:
    """GET /login: (the form's CSRF field, the login CSRF cookie's value)."""
    page = await client.get("/login")
    assert page.status_code == 200, page.text
    field = re.search(r'name="csrf" value="([^"]+)"', page.text)
    assert field is not None, page.text
    return field.group(1), cookie_value(set_cookies(page)["svc_login_csrf"])


async def post_login(
    client: httpx.AsyncClient, name: str, password: str, **extra: str
) -> httpx.Response:
    """Submit the login form as a browser does (with the form's CSRF token and cookie)."""
    field, cookie = await login_form(client)
    return await client.post(
        "/login",
        data={"username": name, "password": password, "csrf": field},
        headers={"Cookie": f"svc_login_csrf={cookie}", **extra},
    )


async def login(web: Web, name: str, password: str = PASSWORD) -> Session:
    """Log in through the form; the session's cookie and CSRF token."""
    async with web.client() as client:
        answer = await post_login(client, name, password)
        assert answer.status_code == 303, answer.text
        cookie = cookie_value(set_cookies(answer)["svc_session"])
        me = await client.get("/api/v1/me", headers={"Cookie": f"svc_session={cookie}"})
        assert me.status_code == 200, me.text
        return Session(cookie=cookie, csrf=me.json()["csrf"])


def json_of(response: httpx.Response) -> Any:
    """The JSON body (failing the test with the body when it is not JSON)."""
    try:
        return response.json()
    except ValueError:
        pytest.fail(f"not JSON ({response.status_code}): {response.text[:500]}")


# --- real headless Chromium (Playwright, the system browser) ----------------------------

CHROMIUM = "/usr/bin/chromium"
# Mark a browser test module with `pytestmark = [pytest.mark.slow, needs_browser]`.
needs_browser = pytest.mark.skipif(
    not os.access(CHROMIUM, os.X_OK),
    reason=f"no browser at {CHROMIUM} (apt-get install -y chromium; .ci/run does it)",
)


@pytest.fixture
async def page(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """A Chromium page; on a failed test its screenshot and HTML are kept in tmp_path (the
    path is printed). Skips, saying why, without Playwright."""
    playwright_api = pytest.importorskip(
        "playwright.async_api", reason="Playwright is not installed (pip install -e '.[dev]')"
    )
    async with playwright_api.async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        tab = await browser.new_page()
        try:
            yield tab
        finally:
            report = getattr(request.node, "rep_call", None)
            if report is None or report.failed:
                shot = tmp_path / "failure.png"
                await tab.screenshot(path=str(shot), full_page=True)
                (tmp_path / "failure.html").write_text(await tab.content())
                print(f"browser artifacts: {shot} and {tmp_path / 'failure.html'}")
            await browser.close()


async def browser_login(page: Any, web: Web, name: str, password: str = PASSWORD) -> None:
    """Log `name` in through the login form and wait for the overview."""
    await page.goto(f"{web.url}/login")
    await page.fill("input[name=username]", name)
    await page.fill("input[name=password]", password)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{web.url}/")
