"""Console pages through a real `svc run web` (issue 18 item 1): every page shows the
navigation, the user's name and role, and a logout form carrying the session's CSRF
token; the dead letters page lists what GET /api/v1/deadletters lists."""

from __future__ import annotations

import pytest

from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes
from tests.web.conftest import add_user, login, start_web

pytestmark = pytest.mark.slow


async def test_console_pages_show_nav_user_role_and_logout(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "vera", "viewer")
    web = await start_web(processes, nats_server.url)
    session = await login(web, "vera")
    async with web.client() as client:
        for path in ("/", "/accounts", "/deadletters"):
            page = await client.get(path, headers=session.headers(csrf=False))
            assert page.status_code == 200, (path, page.text)
            assert "<strong>vera</strong> (viewer)" in page.text
            assert 'action="/logout"' in page.text
            assert 'href="/deadletters"' in page.text
            assert 'href="/accounts"' in page.text
        letters = await client.get("/deadletters", headers=session.headers(csrf=False))
        assert "No open dead letters." in letters.text
        accounts = await client.get("/accounts", headers=session.headers(csrf=False))
        assert "No accounts yet." in accounts.text
        # Without a session the page sends the browser to the login form
        anonymous = await client.get("/deadletters")
        assert anonymous.status_code == 303
        assert anonymous.headers["location"] == "/login"
