"""The console in real headless Chromium (issue 18, browser tests): log in, see the
user's name and role and the pages, log out. Skips, saying why, without /usr/bin/chromium
or Playwright. On failure a screenshot and the page's HTML are kept under the test's tmp
dir (the path is printed)."""

from __future__ import annotations

from typing import Any

import pytest

from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes
from tests.web.conftest import PASSWORD, add_user, needs_browser, start_web

pytestmark = [pytest.mark.slow, needs_browser]


async def test_log_in_see_pages_and_log_out_in_a_browser(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, page: Any
) -> None:
    await add_user(bus, "olga", "operator")
    web = await start_web(processes, nats_server.url, SVC_WEB_INSECURE_COOKIES="1")
    await page.goto(f"{web.url}/accounts")
    assert page.url.endswith("/login")
    await page.fill("input[name=username]", "olga")
    await page.fill("input[name=password]", PASSWORD)
    await page.click("button[type=submit]")
    await page.wait_for_url(f"{web.url}/")
    assert "olga" in await page.inner_text("p.who")
    assert "operator" in await page.inner_text("p.who")
    await page.click("nav >> text=Dead letters")
    await page.wait_for_url(f"{web.url}/deadletters")
    assert "No open dead letters." in await page.content()
    await page.click("text=Log out")
    await page.wait_for_url(f"{web.url}/login")
    await page.goto(f"{web.url}/deadletters")
    assert page.url.endswith("/login")
