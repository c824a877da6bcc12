"""The admin pages in real headless Chromium (issue 18 item 3) against `svc run all` with
the sim: an admin sees the roles online on the overview, adds a webhook to a loopback
receiver (allowed by SVC_WEBHOOKS_ALLOW_PRIVATE), presses "Test delivery" and sees it
delivered, creates an API token and sees it once; a viewer sees no admin form and gets
403 on /users. Skips, saying why, without /usr/bin/chromium or Playwright."""

from __future__ import annotations

import re
from typing import Any

import pytest

from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, wait_until
from tests.e2e.conftest import consumers_ready
from tests.web.conftest import add_user, browser_login, needs_browser, start_web
from tests.web.hooks_receiver import receiving

pytestmark = [pytest.mark.slow, needs_browser]

SECRET = "browser-secret-do-not-print-0123456789"
WAIT_MS = 30_000


async def test_an_admin_adds_and_tests_a_webhook_and_makes_a_token_a_viewer_cannot(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, page: Any
) -> None:
    from playwright.async_api import expect

    await add_user(bus, "ada", "admin")
    await add_user(bus, "vera", "viewer")
    web = await start_web(
        processes,
        nats_server.url,
        "all",
        SVC_WEB_INSECURE_COOKIES="1",
        SVC_WEBHOOKS_ALLOW_PRIVATE="true",  # the receiver is on loopback
    )
    await wait_until(lambda: consumers_ready(bus), 60, "svc run all up")

    # The admin logs in and sees the role online on the overview
    await browser_login(page, web, "ada")
    await expect(page.locator("#roles")).to_contain_text("all", timeout=WAIT_MS)
    await expect(page.locator("#dead-letters")).to_contain_text("0 open dead letters")

    async with receiving() as receiver:
        # Adds a webhook to the receiver, then presses "Test delivery"
        await page.click("nav >> text=Webhooks")
        await page.wait_for_url(f"{web.url}/webhooks")
        await page.fill("input[name=url]", receiver.url)
        await page.fill("input[name=events]", "MessageSent")
        await page.fill("input[name=secret]", SECRET)
        await page.click("button:has-text('Add webhook')")
        await expect(page.locator("p.ok")).to_contain_text("added webhook", timeout=WAIT_MS)
        await expect(page.locator("#webhooks")).to_contain_text(receiver.url)
        assert SECRET not in await page.content()
        await page.click("button:has-text('Test delivery')")
        await expect(page.locator("p.ok")).to_contain_text(
            re.compile(r"delivered: HTTP 200 in [\d.]+ ms"), timeout=WAIT_MS
        )
        assert len(receiver.requests) == 1
        assert receiver.requests[0].signed_with(SECRET)
        assert SECRET not in page.url

    # Creates an API token: shown once, on the answer page only
    await page.click("nav >> text=Users")
    await page.wait_for_url(f"{web.url}/users")
    await page.fill("form[action='/tokens'] input[name=name]", "ci")
    await page.select_option("form[action='/tokens'] select[name=role]", "viewer")
    await page.click("button:has-text('Create token')")
    token = (await page.locator("#new-token").inner_text(timeout=WAIT_MS)).strip()
    assert len(token) > 20
    assert token not in page.url
    await page.goto(f"{web.url}/users")
    await expect(page.locator("#tokens")).to_contain_text("ci")
    assert token not in await page.content()
    await page.click("text=Log out")
    await page.wait_for_url(f"{web.url}/login")

    # A viewer sees the pages without any admin form and is refused /users
    await browser_login(page, web, "vera")
    for path in ("/plugins", "/access"):
        await page.goto(f"{web.url}{path}")
        await expect(page.locator("h1")).to_be_visible()
        assert await page.locator("form[action='/plugins/policy']").count() == 0
        assert await page.locator("form[action='/access/mode']").count() == 0
        assert await page.locator("form[action='/access/rules']").count() == 0
    refused = await page.goto(f"{web.url}/users")
    assert refused is not None
    assert refused.status == 403
    assert SECRET not in processes.log(web.proc)
    assert token not in processes.log(web.proc)
