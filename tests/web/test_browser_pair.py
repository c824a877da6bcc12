"""Pairing in real headless Chromium (issue 18 item 3): an operator opens an account's
pair page, starts, sees the QR (an inline SVG drawn by the server), sees it replaced by
the next code as it rotates (pair.js, same origin), then "paired as" the masked device.
The worker is a real `svc run whatsapp` with the fake pairing source, paced by the test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes
from tests.web.conftest import add_user, browser_login, needs_browser, start_web
from tests.web.fake_pairing import scan_subject
from tests.web.test_console_pair import ACCOUNT, MASKED, start_worker

pytestmark = [pytest.mark.slow, needs_browser]

WAIT_MS = 60_000  # generous: a loaded 2-core box (a poll is 1 s)


async def test_an_operator_pairs_an_account_in_a_browser(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, page: Any, tmp_path: Path
) -> None:
    await add_user(bus, "olga", "operator")
    await start_worker(processes, nats_server.url, tmp_path)
    web = await start_web(processes, nats_server.url, SVC_WEB_INSECURE_COOKIES="1")
    errors: list[str] = []
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    await browser_login(page, web, "olga")
    # When she opens the account's pair page and starts
    await page.goto(f"{web.url}/accounts/{ACCOUNT}/pair")
    await page.click("button:has-text('Start pairing')")
    await page.wait_for_url(f"{web.url}/accounts/{ACCOUNT}/pair?attempt=*")
    # Then she sees the first QR code, as an SVG
    first = page.locator("#pairing .qr[data-qr='1'] svg")
    await first.wait_for(timeout=WAIT_MS)
    drawn = await first.inner_html()
    assert "path" in drawn
    # And when it rotates, the page shows the second code in its place (no reload)
    await bus.nc.publish(scan_subject(ACCOUNT), b"")
    second = page.locator("#pairing .qr[data-qr='2'] svg")
    await second.wait_for(timeout=WAIT_MS)
    assert await second.inner_html() != drawn
    assert await page.locator("#pairing svg").count() == 1
    # And when the phone confirms, "paired as" the masked device
    await bus.nc.publish(scan_subject(ACCOUNT), b"")
    result = page.locator("#pairing .result")
    await result.wait_for(timeout=WAIT_MS)
    assert await result.inner_text() == f"{ACCOUNT}: paired as {MASKED}"
    assert await page.locator("#pairing svg").count() == 0
    # The CSP let pair.js run (it did) and refused nothing
    assert not [e for e in errors if "Content Security Policy" in e], errors
