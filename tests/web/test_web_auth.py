"""Logging in and out of the console through a real `svc run web` (issue 18 items 2 and 4):
a good password gets a Secure, HttpOnly, SameSite session cookie; a bad one 401; too many
failures 429 with Retry-After (per user and per address, counted in KV so every replica
agrees); logout and `svc users rm` end a session on every replica; CSRF is required on
every form and on a cookie's unsafe API call, never on a bearer call."""

from __future__ import annotations

import pytest

from contracts.codec import decode
from contracts.web import LoggedOut, LoginFailed, LoginSucceeded, WebEvent
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, arun_svc, stream_raw
from tests.web.conftest import (
    PASSWORD,
    add_token,
    add_user,
    bearer,
    json_of,
    login,
    login_form,
    post_login,
    set_cookies,
    start_web,
)

pytestmark = pytest.mark.slow


async def _web_events(bus: Bus) -> list[WebEvent]:
    """Everything on the WEB stream, decoded."""
    return [decode(data, WebEvent) for _, data, _ in await stream_raw(bus, "WEB")]  # type: ignore[arg-type]


async def test_login_gives_a_secure_httponly_samesite_session_and_a_bad_password_gets_401(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "alice", "viewer")
    web = await start_web(processes, nats_server.url)
    async with web.client() as client:
        # A wrong password: 401, the form again, no session cookie
        wrong = await post_login(client, "alice", "not the password")
        assert wrong.status_code == 401
        assert "Wrong user name or password" in wrong.text
        assert "svc_session" not in set_cookies(wrong)
        # An unknown user: the same answer (which one was wrong is never said)
        ghost = await post_login(client, "ghost", PASSWORD)
        assert ghost.status_code == 401
        assert "Wrong user name or password" in ghost.text
        # The right one: 303 home with the session cookie, flags as DESIGN.md asks
        ok = await post_login(client, "alice", PASSWORD)
        assert ok.status_code == 303
        assert ok.headers["location"] == "/"
        cookie = set_cookies(ok)["svc_session"].lower()
        assert "; secure" in cookie
        assert "; httponly" in cookie
        assert "samesite=lax" in cookie
    session = await login(web, "alice")
    async with web.client() as client:
        home = await client.get("/", headers=session.headers(csrf=False))
        assert home.status_code == 200
        assert "alice" in home.text
        # Without a session, a page sends the browser to the login form
        anonymous = await client.get("/")
        assert anonymous.status_code == 303
        assert anonymous.headers["location"] == "/login"
    # Every attempt is on the audit trail, with no secret
    events = await _web_events(bus)
    assert [type(e) for e in events if isinstance(e, LoginFailed | LoginSucceeded)] == [
        LoginFailed,
        LoginFailed,
        LoginSucceeded,
        LoginSucceeded,
    ]


async def test_insecure_cookies_are_only_on_request(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "alice", "viewer")
    web = await start_web(processes, nats_server.url, SVC_WEB_INSECURE_COOKIES="1")
    async with web.client() as client:
        ok = await post_login(client, "alice", PASSWORD)
    cookie = set_cookies(ok)["svc_session"].lower()
    assert "; secure" not in cookie
    assert "; httponly" in cookie


async def test_too_many_failures_are_throttled_per_user_across_replicas_with_retry_after(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "alice", "admin")
    env = {"SVC_WEB_LOGIN_FAILURES": "3", "SVC_WEB_LOGIN_WINDOW": "600"}
    one = await start_web(processes, nats_server.url, **env)
    two = await start_web(processes, nats_server.url, **env)
    # Given three failures for alice, spread over two replicas
    async with one.client() as a, two.client() as b:
        for client in (a, b, a):
            assert (await post_login(client, "alice", "guess")).status_code == 401
        # Then the next attempt, on either replica -- even with the right password -- is 429
        for client in (b, a):
            refused = await post_login(client, "alice", PASSWORD)
            assert refused.status_code == 429
            assert 0 < int(refused.headers["retry-after"]) <= 600
            assert "too many failed logins" in refused.text
            assert "svc_session" not in set_cookies(refused)
    failed = [e for e in await _web_events(bus) if isinstance(e, LoginFailed)]
    assert [e.reason for e in failed] == ["bad_credentials"] * 3 + ["throttled"] * 2


async def test_failures_from_one_address_are_throttled_whatever_the_user_name(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "alice", "admin")
    web = await start_web(processes, nats_server.url, SVC_WEB_LOGIN_FAILURES="3")
    async with web.client() as client:
        for name in ("bob", "carol", "dave"):  # a different name each time
            assert (await post_login(client, name, "guess")).status_code == 401
        refused = await post_login(client, "alice", PASSWORD)
    assert refused.status_code == 429
    assert "this address" in refused.text
    assert int(refused.headers["retry-after"]) > 0


async def test_logout_ends_the_session_on_another_replica(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "alice", "operator")
    one = await start_web(processes, nats_server.url)
    two = await start_web(processes, nats_server.url)
    # Given a session started on replica one, valid on replica two
    session = await login(one, "alice")
    async with two.client() as client:
        assert (await client.get("/api/v1/me", headers=session.headers())).status_code == 200
    # When alice logs out on replica one (the form, with its CSRF token)
    async with one.client() as client:
        out = await client.post(
            "/logout", data={"csrf": session.csrf}, headers=session.headers(csrf=False)
        )
        assert out.status_code == 303
        assert out.headers["location"] == "/login"
        assert "max-age=0" in set_cookies(out)["svc_session"].lower()
    # Then replica two refuses the cookie at once
    async with two.client() as client:
        after = await client.get("/api/v1/me", headers=session.headers())
    assert after.status_code == 401
    assert json_of(after)["error"] == "unauthorized"
    assert any(isinstance(e, LoggedOut) and e.user == "alice" for e in await _web_events(bus))


async def test_svc_users_rm_ends_the_users_sessions_everywhere(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "alice", "viewer")
    web = await start_web(processes, nats_server.url)
    session = await login(web, "alice")
    removed = await arun_svc("users", "rm", "alice", env=processes.env(NATS_URL=nats_server.url))
    assert removed.returncode == 0, removed.stderr
    assert "1 session(s) ended" in removed.stdout.decode()
    # Added again under the same name: the old session does not come back
    await add_user(bus, "alice", "admin")
    async with web.client() as client:
        after = await client.get("/api/v1/me", headers=session.headers())
    assert after.status_code == 401


async def test_csrf_is_required_on_forms_and_cookie_api_calls_but_not_bearer_calls(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "root", "admin")
    token = await add_token(bus, "ci", "admin")
    web = await start_web(processes, nats_server.url)
    session = await login(web, "root")
    body = {"mode": "open"}
    async with web.client() as client:
        # A login form posted without its CSRF cookie (a cross-site form): refused
        field, _ = await login_form(client)
        forged = await client.post(
            "/login", data={"username": "root", "password": PASSWORD, "csrf": field}
        )
        assert forged.status_code == 403
        assert "svc_session" not in set_cookies(forged)
        # Logging out without the form's token: refused, the session lives on
        no_token = await client.post("/logout", headers=session.headers(csrf=False))
        assert no_token.status_code == 403
        # A cookie-authenticated API write without X-CSRF-Token, or a wrong one: 403 csrf
        for headers in (
            session.headers(csrf=False),
            {**session.headers(csrf=False), "X-CSRF-Token": "wrong"},
        ):
            refused = await client.put("/api/v1/access/mode", json=body, headers=headers)
            assert refused.status_code == 403
            assert json_of(refused)["error"] == "csrf"
        # With the session's token it passes; a bearer call needs none
        ok = await client.put("/api/v1/access/mode", json=body, headers=session.headers())
        assert ok.status_code == 200, ok.text
        ok = await client.put("/api/v1/access/mode", json=body, headers=bearer(token))
        assert ok.status_code == 200, ok.text
        # A session read needs no token
        assert (await client.get("/api/v1/me", headers=session.headers(csrf=False))).is_success


async def test_a_bad_bearer_token_is_401_even_with_a_good_session_cookie(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "alice", "admin")
    web = await start_web(processes, nats_server.url)
    session = await login(web, "alice")
    async with web.client() as client:
        for header in ("Bearer sbt_000000000000_nope", "Basic YWxpY2U6eA==", "Bearer"):
            answer = await client.get(
                "/api/v1/me", headers={**session.headers(), "Authorization": header}
            )
            assert answer.status_code == 401, header
