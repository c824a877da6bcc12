"""The admin slice of the console (issue 18 item 3) through a real `svc run web` or
`svc run all` (with the sim) on a real nats-server: the overview, plugins and policy,
access, audit, users and tokens, webhooks pages render for their role and hide what a
role cannot use; each form works with the session's CSRF token, is refused (403) for a
lower role and without the token; the webhook API (/api/v1/webhooks) answers 201/404/422
as fits, and a test delivery reaches a real local receiver, signed."""

from __future__ import annotations

import json
import re
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from contracts.events import AccessModeSet, ToolPolicySet, TurnCompleted
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, read_stream, stream_raw, wait_until
from tests.e2e.conftest import consumers_ready
from tests.web.conftest import (
    Session,
    Web,
    add_token,
    add_user,
    bearer,
    json_of,
    login,
    start_web,
)
from tests.web.hooks_receiver import receiving

pytestmark = pytest.mark.slow

SECRET = "console-secret-do-not-print-0123456789"
STRANGER = "33612345678@s.whatsapp.net"


async def get(web: Web, path: str, session: Session) -> httpx.Response:
    async with web.client() as client:
        return await client.get(path, headers=session.headers(csrf=False))


async def submit(
    web: Web, path: str, session: Session, data: dict[str, str] | None = None, *, csrf: bool = True
) -> httpx.Response:
    """POST a form as the browser does: the CSRF token as the form field `csrf`."""
    fields = {**({"csrf": session.csrf} if csrf else {}), **(data or {})}
    async with web.client() as client:
        return await client.post(path, data=fields, headers=session.headers(csrf=False))


def flash(answer: httpx.Response, path: str) -> tuple[str, str]:
    """A 303 back to `path`: its (ok, error) line."""
    assert answer.status_code == 303, (answer.status_code, answer.text)
    where = urlsplit(answer.headers["location"])
    assert where.path == path, answer.headers["location"]
    query = parse_qs(where.query)
    line, kind = query.get("flash", [""])[0], query.get("kind", ["ok"])[0]
    assert query.get("sig"), "a result line not signed for the session"
    return (line, "") if kind == "ok" else ("", line)


async def test_pages_render_for_their_role_and_hide_what_a_role_cannot_use(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin")):
        await add_user(bus, name, role)
    web = await start_web(processes, nats_server.url)
    vera, otto, ada = [await login(web, n) for n in ("vera", "otto", "ada")]

    # The overview: the web role itself is online (micro discovery), streams and counts
    home = await get(web, "/", vera)
    assert home.status_code == 200, home.text
    roles = re.search(r'<div id="roles">(.*?)</div>', home.text, re.S)
    assert roles is not None, home.text
    assert "<td>web</td>" in roles.group(1), home.text
    assert '<a href="/deadletters">0 open dead letters</a>' in home.text
    assert "No account is parked." in home.text
    assert 'href="/accounts"' in home.text
    assert "<td>INBOUND</td>" in home.text

    # Every page renders for a viewer, without one admin form or operator button
    for path in ("/", "/plugins", "/access", "/audit"):
        shown = await get(web, path, vera)
        assert shown.status_code == 200, (path, shown.text)
        for action in ("/plugins/policy", "/access/mode", "/access/rules", "/users", "/tokens"):
            assert f'action="{action}"' not in shown.text, (path, action)
    # The admin pages refuse a viewer and an operator (403), and serve an admin
    for path in ("/users", "/webhooks"):
        for session in (vera, otto):
            refused = await get(web, path, session)
            assert refused.status_code == 403, (path, refused.text)
        assert (await get(web, path, ada)).status_code == 200
    # An admin sees the policy, mode and rule forms
    plugins = await get(web, "/plugins", ada)
    assert 'action="/plugins/policy"' in plugins.text
    access = await get(web, "/access", ada)
    assert 'action="/access/mode"' in access.text
    assert 'action="/access/rules"' in access.text

    # The resolved view of one account; a bad account is one line on the page
    resolved = await get(web, "/plugins?account=default&channel=whatsapp", vera)
    assert "Resolved for whatsapp / default" in resolved.text
    bad = await get(web, "/plugins?account=no%20such", vera)
    assert bad.status_code == 200
    assert 'class="error"' in bad.text

    # Audit: run on request, say whether the invariants held and how long it took
    audited = await get(web, "/audit?run=true", vera)
    assert audited.status_code == 200, audited.text
    assert re.search(r"Every invariant held \(\d+ rules\)\. Took \d+\.\d\d s", audited.text)
    # Explain a job: the form goes to /audit/jobs/{id}; an unknown job is one line
    async with web.client() as client:
        go = await client.get("/audit/jobs?job_id=abc123", headers=vera.headers(csrf=False))
    assert go.status_code == 303
    assert go.headers["location"] == "/audit/jobs/abc123"
    unknown = await get(web, "/audit/jobs/abc123", vera)
    assert unknown.status_code == 200
    assert 'class="error" role="alert"' in unknown.text
    bad_job = await get(web, "/audit/jobs/..%20x", vera)
    assert bad_job.status_code == 200
    assert 'class="error" role="alert"' in bad_job.text


async def test_policy_access_and_user_forms_work_for_their_role_only_and_need_csrf(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin")):
        await add_user(bus, name, role)
    web = await start_web(processes, nats_server.url)
    vera, otto, ada = [await login(web, n) for n in ("vera", "otto", "ada")]

    # Plugins policy: refused for an operator and without the CSRF token; done by admin
    policy = {"channel": "whatsapp", "account": "default", "allow": "", "deny": "clock.*"}
    assert (await submit(web, "/plugins/policy", otto, policy)).status_code == 403
    assert (await submit(web, "/plugins/policy", ada, policy, csrf=False)).status_code == 403
    ok, error = flash(await submit(web, "/plugins/policy", ada, policy), "/plugins")
    assert (ok[:30], error) == ("policy of whatsapp/default set", ""), (ok, error)
    (set_,) = [e for _, e in await read_stream(bus, "PLUGINS") if isinstance(e, ToolPolicySet)]
    assert (set_.deny, set_.actor) == (["clock.*"], "ada")
    assert "clock.*" in (await get(web, "/plugins", vera)).text
    # Bad input: one line back on the page, nothing recorded
    ok, error = flash(
        await submit(web, "/plugins/policy", ada, {"account": "no such!"}), "/plugins"
    )
    assert error
    assert not ok

    # Access mode and rule: admin only, CSRF needed, recorded with who
    mode = {"mode": "approval", "account": "default"}
    assert (await submit(web, "/access/mode", otto, mode)).status_code == 403
    assert (await submit(web, "/access/mode", ada, mode, csrf=False)).status_code == 403
    ok, _ = flash(await submit(web, "/access/mode", ada, mode), "/access")
    assert ok.startswith("mode set to approval"), ok
    rule = {"kind": "block", "pattern": "4477*"}
    assert (await submit(web, "/access/rules", otto, rule)).status_code == 403
    ok, _ = flash(await submit(web, "/access/rules", ada, rule), "/access")
    assert ok.startswith("block rule 4477* added"), ok
    _, error = flash(await submit(web, "/access/mode", ada, {"mode": "sometimes"}), "/access")
    assert "mode" in error, error
    (moded,) = [e for _, e in await read_stream(bus, "ACCESS") if isinstance(e, AccessModeSet)]
    assert (moded.mode, moded.account, moded.actor) == ("approval", "default", "ada")
    access = await get(web, "/access", vera)
    assert "approval" in access.text
    assert "4477*" in access.text
    # Approve: a viewer is refused; an operator's approval of nobody pending is one line
    approve = {"jid": STRANGER, "account": "default"}
    assert (await submit(web, "/access/approve", vera, approve)).status_code == 403
    assert (await submit(web, "/access/approve", otto, approve, csrf=False)).status_code == 403

    # Users: add and remove (admin only; CSRF; the password never echoed)
    user = {"name": "newbie", "role": "operator", "password": "a long enough password 1"}
    assert (await submit(web, "/users", otto, user)).status_code == 403
    assert (await submit(web, "/users", ada, user, csrf=False)).status_code == 403
    added = await submit(web, "/users", ada, user)
    ok, _ = flash(added, "/users")
    assert ok == "added user newbie (operator)"
    assert user["password"] not in added.headers["location"]
    listed = await get(web, "/users", ada)
    assert "<td>newbie</td><td>operator</td>" in listed.text
    assert "argon2" not in listed.text
    _, error = flash(await submit(web, "/users", ada, {**user, "name": "no spaces"}), "/users")
    assert error.startswith("invalid form"), error
    assert (await submit(web, "/users/newbie/remove", otto)).status_code == 403
    assert (await submit(web, "/users/newbie/remove", ada, csrf=False)).status_code == 403
    ok, _ = flash(await submit(web, "/users/newbie/remove", ada), "/users")
    assert ok.startswith("removed user newbie"), ok
    _, error = flash(await submit(web, "/users/newbie/remove", ada), "/users")
    assert "newbie" in error, error

    # Tokens: created by an admin, shown once on the answer page (not in a URL), usable,
    # then revoked
    assert (await submit(web, "/tokens", otto, {"name": "ci", "role": "viewer"})).status_code == 403
    assert (
        await submit(web, "/tokens", ada, {"name": "ci", "role": "viewer"}, csrf=False)
    ).status_code == 403
    made = await submit(web, "/tokens", ada, {"name": "ci", "role": "viewer"})
    assert made.status_code == 200, made.text
    assert "location" not in made.headers
    found = re.search(r'<code id="new-token">([^<]+)</code>', made.text)
    assert found is not None, made.text
    token = found.group(1)
    assert "not shown again" in made.text
    async with web.client() as client:
        me = await client.get("/api/v1/me", headers=bearer(token))
    assert json_of(me)["name"] == "ci"
    again = await get(web, "/users", ada)
    assert token not in again.text
    assert "<td>ci</td><td>viewer</td>" in again.text
    token_id = re.search(r"<td>([0-9a-f]+)</td><td>ci</td>", again.text)
    assert token_id is not None, again.text
    assert (await submit(web, f"/tokens/{token_id.group(1)}/revoke", otto)).status_code == 403
    revoke = f"/tokens/{token_id.group(1)}/revoke"
    assert (await submit(web, revoke, ada, csrf=False)).status_code == 403
    ok, _ = flash(await submit(web, f"/tokens/{token_id.group(1)}/revoke", ada), "/users")
    assert ok.startswith("revoked token ci"), ok
    async with web.client() as client:
        assert (await client.get("/api/v1/me", headers=bearer(token))).status_code == 401
    # The token and the password never reached the web process's log
    log = processes.log(web.proc)
    assert token not in log
    assert user["password"] not in log


async def test_webhook_api_and_console_add_test_delivery_signed_and_remove(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "ada", "admin")
    await add_user(bus, "otto", "operator")
    admin, operator = await add_token(bus, "root", "admin"), await add_token(bus, "ops", "operator")
    web = await start_web(
        processes, nats_server.url, SVC_WEBHOOKS_ALLOW_PRIVATE="true", SVC_WEBHOOKS_BACKOFF="0.05"
    )
    ada, otto = await login(web, "ada"), await login(web, "otto")
    async with receiving() as receiver, web.client() as client:
        body = {"url": receiver.url, "events": ["MessageSent"], "secret": SECRET}
        # The API: admin only; 422 for a bad event or a short secret, one line
        refused = await client.post("/api/v1/webhooks", json=body, headers=bearer(operator))
        assert refused.status_code == 403, refused.text
        for bad, word in (({"events": ["MesageSent"]}, "MesageSent"), ({"secret": "short"}, "16")):
            answer = await client.post(
                "/api/v1/webhooks", json={**body, **bad}, headers=bearer(admin)
            )
            assert answer.status_code == 422, answer.text
            assert json_of(answer)["error"] == "invalid"
            assert word in json_of(answer)["detail"]
        added = await client.post("/api/v1/webhooks", json=body, headers=bearer(admin))
        assert added.status_code == 201, added.text
        hook = json_of(added)
        assert hook["secret"] == "set"
        assert SECRET not in added.text
        listed = await client.get("/api/v1/webhooks", headers=bearer(admin))
        assert [h["id"] for h in json_of(listed)["items"]] == [hook["id"]]
        assert (await client.get("/api/v1/webhooks", headers=bearer(operator))).status_code == 403
        # Test delivery through the API: delivered, signed, to the real receiver
        tested = await client.post(f"/api/v1/webhooks/{hook['id']}/test", headers=bearer(admin))
        assert tested.status_code == 200, tested.text
        assert json_of(tested)["outcome"] == "delivered"
        assert json_of(tested)["status"] == 200
        assert receiver.requests[-1].headers["x-switchboard-event"] == "WebhookTestRequested"
        assert receiver.requests[-1].signed_with(SECRET)

        # The console: the page lists it (never the secret), the test button delivers
        shown = await get(web, "/webhooks", ada)
        assert hook["id"] in shown.text
        assert SECRET not in shown.text
        assert f'action="/webhooks/{hook["id"]}/test"' in shown.text
        before = len(receiver.requests)
        assert (
            await submit(web, f"/webhooks/{hook['id']}/test", ada, csrf=False)
        ).status_code == 403
        ok, error = flash(await submit(web, f"/webhooks/{hook['id']}/test", ada), "/webhooks")
        assert re.match(r"test \w+ delivered: HTTP 200 in [\d.]+ ms", ok), (ok, error)
        assert len(receiver.requests) == before + 1
        assert receiver.requests[-1].signed_with(SECRET)
        # Adding through the form; a bad one is one line back, nothing recorded
        form = {"url": receiver.url, "events": "MessageSent, TurnCompleted", "secret": SECRET}
        ok, _ = flash(await submit(web, "/webhooks", ada, form), "/webhooks")
        assert ok.startswith("added webhook"), ok
        assert "TurnCompleted" in ok, ok
        _, error = flash(await submit(web, "/webhooks", ada, {**form, "secret": "x"}), "/webhooks")
        assert "the secret must have 16 to 512 characters" in error, error
        second = ok.split()[2].rstrip(":")

        # Every webhook form is refused for an operator, and without the CSRF token
        for path in ("/webhooks", f"/webhooks/{second}/test", f"/webhooks/{second}/remove"):
            assert (await submit(web, path, otto, form)).status_code == 403, path
            assert (await submit(web, path, ada, form, csrf=False)).status_code == 403, path

        # Remove: 404 for an unknown id, 422 for a malformed one; the form removes too
        gone = await client.delete(f"/api/v1/webhooks/{hook['id']}", headers=bearer(admin))
        assert gone.status_code == 200, gone.text
        again = await client.delete(f"/api/v1/webhooks/{hook['id']}", headers=bearer(admin))
        assert again.status_code == 404
        assert json_of(again)["error"] == "not_found"
        malformed = await client.delete("/api/v1/webhooks/NOT-AN-ID", headers=bearer(admin))
        assert malformed.status_code == 422, malformed.text
        missing = await client.post(f"/api/v1/webhooks/{hook['id']}/test", headers=bearer(admin))
        assert missing.status_code == 404, missing.text
        ok, _ = flash(await submit(web, f"/webhooks/{second}/remove", ada), "/webhooks")
        assert ok.startswith(f"removed webhook {second}"), ok
        listed = await client.get("/api/v1/webhooks", headers=bearer(admin))
        assert json_of(listed)["items"] == []
        letters = await client.get("/api/v1/webhooks/deadletters", headers=bearer(admin))
        assert letters.status_code == 200
        assert json_of(letters)["items"] == []
    # Recorded with who; the secret is in no log line of the web process
    hooks = [json.loads(data) for _, data, _ in await stream_raw(bus, "HOOKS")]
    assert {e["actor"] for e in hooks if e["type"] == "WebhookSubscribed"} == {"root", "ada"}
    assert {e["actor"] for e in hooks if e["type"] == "WebhookTestRequested"} == {"root", "ada"}
    assert SECRET not in processes.log(web.proc)


async def test_a_loopback_webhook_is_refused_unless_the_web_role_allows_it(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    admin = await add_token(bus, "root", "admin")
    web = await start_web(processes, nats_server.url)
    body = {"url": "http://127.0.0.1:9/hook", "events": ["MessageSent"], "secret": SECRET}
    async with web.client() as client:
        refused = await client.post("/api/v1/webhooks", json=body, headers=bearer(admin))
    assert refused.status_code == 422, refused.text
    assert "SVC_WEBHOOKS_ALLOW_PRIVATE=true" in json_of(refused)["detail"]
    assert not await stream_raw(bus, "HOOKS")


async def test_an_operator_approves_a_pending_sender_from_the_access_page(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin")):
        await add_user(bus, name, role)
    web = await start_web(processes, nats_server.url, "all")
    await wait_until(lambda: consumers_ready(bus), 60, "svc run all up")
    vera, otto, ada = [await login(web, n) for n in ("vera", "otto", "ada")]
    ok, _ = flash(
        await submit(web, "/access/mode", ada, {"mode": "approval", "account": "default"}),
        "/access",
    )
    assert ok.startswith("mode set to approval"), ok
    async with SimUser(bus, "default") as user:
        await user.send(STRANGER, "let me in")

        async def pending() -> bool:
            return STRANGER in (await get(web, "/access", vera)).text

        await wait_until(pending, 30, "the stranger pending on /access")
        # The viewer sees who waits but no approve button; the operator sees it
        assert 'action="/access/approve"' not in (await get(web, "/access", vera)).text
        assert 'action="/access/approve"' in (await get(web, "/access", otto)).text
        approve = {"jid": STRANGER, "account": "default", "channel": "whatsapp"}
        assert (await submit(web, "/access/approve", vera, approve)).status_code == 403
        ok, error = flash(await submit(web, "/access/approve", otto, approve), "/access")
        assert ok == f"approved {STRANGER}: 1 waiting message(s) released", (ok, error)

        async def settled() -> bool:
            shown = (await get(web, "/access", vera)).text
            return "Pending approvals (0)" in shown and STRANGER in shown  # now approved

        await wait_until(settled, 30, "the stranger approved, nobody pending")

    # The released message's reply, explained on the audit page (one step a line)
    async def answered() -> list[TurnCompleted]:
        found = await read_stream(bus, "AGENT")
        return [e for _, e in found if isinstance(e, TurnCompleted) and e.chat == STRANGER]

    await wait_until(answered, 30, "the released message answered")
    (turn,) = await answered()
    job_id = turn.reply_ids[0]
    explained = await get(web, f"/audit/jobs/{job_id}", vera)
    assert explained.status_code == 200, explained.text
    assert f'<pre id="chain">job {job_id}  whatsapp/default' in explained.text
    assert "TurnCompleted" in explained.text
