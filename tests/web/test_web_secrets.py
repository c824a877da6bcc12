"""No secret reaches a log, an event or an error (issue 18 item 2): after users, tokens,
good and bad logins, API calls and a logout -- with the web process logging at DEBUG --
no password, token, token hash, session cookie (or its hash), CSRF token or password
hash appears in the process's log, the CLI's output, any stream, or an error answer."""

from __future__ import annotations

import hashlib

import pytest

from contracts.streams import STREAMS
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from services.web.identity import Identity
from tests.conftest import Processes, arun_svc, run_svc, stream_raw
from tests.web.conftest import bearer, login, post_login, start_web

pytestmark = pytest.mark.slow

PASSWORD = "s3cret-Password-7f2a"
WRONG = "wr0ng-Guess-91c4"


async def test_no_secret_in_logs_events_or_errors(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    env = processes.env(NATS_URL=nats_server.url)
    added = run_svc(
        "users", "add", "alice", "--role", "admin", "--password-stdin",
        env=env, input_=PASSWORD.encode(),
    )  # fmt: skip
    made = await arun_svc("tokens", "create", "ci", "--role", "admin", env=env)
    token = made.stdout.decode().strip()
    web = await start_web(processes, nats_server.url, SVC_LOG_LEVEL="DEBUG")
    answers: list[str] = []
    async with web.client() as client:
        answers.append((await post_login(client, "alice", WRONG)).text)
        answers.append((await post_login(client, WRONG, PASSWORD)).text)
        session = await login(web, "alice", PASSWORD)
        for headers in (bearer(token), session.headers(), bearer(token + "x")):
            for path in ("/api/v1/me", "/api/v1/users", "/api/v1/tokens", "/api/v1/nope"):
                answers.append((await client.get(path, headers=headers)).text)
        created = await client.post(
            "/api/v1/users",
            json={"name": "bob", "role": "viewer", "password": PASSWORD + "-bob"},
            headers=session.headers(),
        )
        answers.append(created.text)
        answers.append(
            (
                await client.post("/logout", data={"csrf": session.csrf}, headers=session.headers())
            ).text
        )
    removed = await arun_svc("users", "rm", "bob", env=env)
    revoked = await arun_svc("tokens", "revoke", "ci", env=env)
    stored = await Identity(bus).user("alice")
    assert stored is not None
    secret_part = token.rsplit("_", 1)[-1]
    secrets = {
        "password": PASSWORD,
        "wrong password": WRONG,
        "token": token,
        "token secret": secret_part,
        "token hash": hashlib.sha256(secret_part.encode()).hexdigest(),
        "session cookie": session.cookie,
        "session key": hashlib.sha256(session.cookie.encode()).hexdigest(),
        "csrf token": session.csrf,
        "password hash": stored.password_hash,
        "hash digest": stored.password_hash.rsplit("$", 1)[-1],
    }
    places = {
        "web log": processes.log(web.proc),
        "cli output": "".join((r.stderr or b"").decode() for r in (added, made, removed, revoked)),
        "error answers": "\n".join(a for a in answers if '"error"' in a or "error" in a),
    }
    for spec in STREAMS:
        places[f"stream {spec.name}"] = "\n".join(
            data.decode(errors="replace") + repr(headers)
            for _, data, headers in await stream_raw(bus, spec.name)
        )
    assert '"http listening"' in places["web log"]
    assert places["stream WEB"]  # the audit trail was written
    for where, text in places.items():
        for what, secret in secrets.items():
            assert secret not in text, f"{what} found in {where}"
