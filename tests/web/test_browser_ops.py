"""Operator actions in real headless Chromium (issue 18, slice ops), with real `svc run`
roles and the sim: an account's holder changes on the accounts page after a kill -9
failover; a dead letter is requeued by clicking its button; a viewer sees the pages but
no operator button, and a forced POST is refused (403). Skips, saying why, without
/usr/bin/chromium or Playwright; on failure a screenshot and the HTML are kept."""

from __future__ import annotations

import os
import re
import signal
from typing import Any

import pytest

from contracts import subjects
from contracts.events import DeadLetterRequeued, DeliveryDeadLettered
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, read_stream, role, wait_until
from tests.e2e.conftest import consumers_ready, holder_of, job, lease_of, pid_of
from tests.web.conftest import add_user, browser_login, needs_browser, start_web

pytestmark = [pytest.mark.slow, needs_browser]

DOOMED = "doomed@s.whatsapp.net"  # the sim refuses every send to it, for good
TTL = "3"
OPERATOR_BUTTONS = ("Hand over", "Resume", "Send", "Requeue", "Drop")


async def _dead(bus: Bus) -> list[DeliveryDeadLettered]:
    return [e for _, e in await read_stream(bus, "DELIVERY") if isinstance(e, DeliveryDeadLettered)]


async def _account_row(page: Any, account: str) -> tuple[str, int]:
    """The holder and token the accounts page shows for `account` (reloaded)."""
    await page.reload()
    row = page.locator("table tr", has=page.locator(f"td:text-is('{account}')"))
    if await row.count() != 1:
        return "", 0
    tds = row.locator("td")
    return (await tds.nth(2).inner_text()).strip(), int((await tds.nth(3).inner_text()) or 0)


async def test_see_an_account_holder_change_after_a_failover(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, page: Any
) -> None:
    url = nats_server.url
    processes.start("run", "core", NATS_URL=url)
    owners = [
        processes.start("run", "whatsapp", NATS_URL=url, WHATSAPP_LEASE_TTL=TTL) for _ in range(2)
    ]
    await add_user(bus, "vera", "viewer")
    web = await start_web(processes, url, SVC_WEB_INSECURE_COOKIES="1")
    await wait_until(lambda: holder_of(bus, "default"), 60, "an owner of the account")
    first = await lease_of(bus, "default")
    assert first is not None
    assert pid_of(first.holder) in {p.pid for p in owners}
    # Given the accounts page showing owner A and its token
    await browser_login(page, web, "vera")
    await page.goto(f"{web.url}/accounts")
    shown: list[tuple[str, int]] = []

    async def showing(predicate: Any) -> bool:
        shown.append(await _account_row(page, "default"))
        return bool(predicate(*shown[-1]))

    await wait_until(lambda: showing(lambda h, t: h == first.holder), 30, "holder A shown")
    assert shown[-1][1] == first.token
    # When A is killed with SIGKILL (no goodbye: its lease runs out)
    os.kill(pid_of(first.holder), signal.SIGKILL)
    # Then the page, reloaded, shows owner B with a higher fencing token
    await wait_until(
        lambda: showing(lambda h, t: h not in ("", first.holder) and t > first.token),
        60,
        "holder B with a higher token shown",
    )
    holder, token = shown[-1]
    now = await lease_of(bus, "default")
    assert now is not None
    assert (holder, token) == (now.holder, now.token)
    assert pid_of(holder) in {p.pid for p in owners} - {pid_of(first.holder)}


async def test_requeue_a_dead_letter_in_the_browser(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, page: Any
) -> None:
    url = nats_server.url
    processes.start("run", "all", NATS_URL=url, SIM_FAILING_CHATS=DOOMED)
    await add_user(bus, "olga", "operator")
    web = await start_web(processes, url, SVC_WEB_INSECURE_COOKIES="1")
    await wait_until(lambda: consumers_ready(bus), 60, "svc run all's owner and core")
    # Given a reply the network refuses for good, dead-lettered
    async with SimUser(bus, "default") as user:
        await user.send(DOOMED, "nobody will get this")
    await wait_until(lambda: _dead(bus), 60, "the refused reply dead-lettered")
    (dead,) = await _dead(bus)
    # The dead letters page shows it, with its requeue button
    await browser_login(page, web, "olga")
    await page.goto(f"{web.url}/deadletters")
    row = page.locator("table tr", has_text=dead.job_id)
    assert await row.count() == 1
    assert "is not on WhatsApp" in await row.inner_text()
    # When the operator clicks requeue, with a reason
    await row.locator("input[name=reason]").first.fill("try once more")
    await row.locator("button", has_text="Requeue").click()
    await page.wait_for_url(re.compile(r"/deadletters\?flash="))
    # Then the page says it was requeued, as a new job
    flash = await page.locator("p.flash").inner_text()
    assert re.fullmatch(r"Dead letter \d+ requeued as job \S+ \(from job \S+\)\.", flash), flash
    assert await page.locator("table tr", has_text=dead.job_id).count() == 0  # no longer open
    seq = int(flash.split()[2])
    await page.goto(f"{web.url}/deadletters/{seq}")
    details = await page.inner_text("body")
    assert "requeued" in details
    assert "try once more" in details
    assert "olga" in details
    (requeued,) = [
        e for _, e in await read_stream(bus, "DEADLETTER") if isinstance(e, DeadLetterRequeued)
    ]
    assert requeued.actor == "olga"
    assert requeued.new_job_id is not None

    # The chat still refuses: the new job ends dead-lettered too (the audit explains both)
    async def both_dead() -> bool:
        return len(await _dead(bus)) == 2

    await wait_until(both_dead, 60, "the requeued job's outcome")


async def test_a_viewer_sees_no_operator_buttons_and_a_forced_post_is_refused(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, page: Any
) -> None:
    await add_user(bus, "vera", "viewer")
    web = await start_web(processes, nats_server.url, SVC_WEB_INSECURE_COOKIES="1")
    async with role(bus, "whatsapp", SIM_FAILING_CHATS=DOOMED):
        await wait_until(lambda: holder_of(bus, "default"), 30, "the account's owner")
        # Given an account with an owner and a dead letter
        await bus.publish(
            subjects.outbound("whatsapp", "default", DOOMED), job("default", DOOMED, 1)
        )
        await wait_until(lambda: _dead(bus), 30, "the dead letter")
        await browser_login(page, web, "vera")
        # When a viewer looks at every page of the slice: the data, no operator button
        for path, data in (
            ("/accounts", "default"),
            ("/deadletters", "is not on WhatsApp"),
            ("/outbound", "Nothing is queued."),
        ):
            await page.goto(f"{web.url}{path}")
            assert data in await page.inner_text("body"), path
            for button in OPERATOR_BUTTONS:
                assert await page.locator("button", has_text=button).count() == 0, (path, button)
        await page.goto(f"{web.url}/deadletters")
        link = page.locator("a[href^='/deadletters/']").first
        seq = int((await link.inner_text()).strip())
        await link.click()
        await page.wait_for_url(f"{web.url}/deadletters/{seq}")
        assert "is not on WhatsApp" in await page.inner_text("body")
        assert await page.locator("form[action$='/requeue']").count() == 0
        assert await page.locator("a[href$='/pair']").count() == 0
        # Then a forced POST, with the session's own CSRF token from the page, is refused
        csrf = await page.get_attribute("meta[name=csrf-token]", "content")
        assert csrf
        for action in (
            f"/deadletters/{seq}/requeue",
            f"/deadletters/{seq}/drop",
            "/accounts/default/handover",
            "/accounts/default/send",
        ):
            answer = await page.request.post(
                f"{web.url}{action}",
                form={"csrf": csrf, "reason": "forced", "chat": DOOMED, "text": "x"},
                max_redirects=0,
            )
            assert answer.status == 403, action
            assert "this needs the operator role" in await answer.text()
    letters = [e for _, e in await read_stream(bus, "DEADLETTER") if hasattr(e, "actor")]
    assert letters == []  # nothing was requeued or dropped
