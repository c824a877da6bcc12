"""`svc users` and `svc tokens` as DESIGN.md names them (issue 18 items 2 and 3): a token
made by the CLI works on the API until `svc tokens revoke` (then 401, on every replica);
listings never show a secret; bad input is one line and a non-zero exit."""

from __future__ import annotations

import json

import pytest

from contracts.codec import decode
from contracts.web import TokenCreated, TokenRevoked, UserAdded, UserRemoved, WebEvent
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, arun_svc, run_svc, stream_raw
from tests.web.conftest import bearer, json_of, login, start_web

pytestmark = pytest.mark.slow


async def test_a_cli_token_works_until_it_is_revoked(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    env = processes.env(NATS_URL=nats_server.url)
    web = await start_web(processes, nats_server.url)
    # Given a token made with the CLI (printed once, on stdout alone)
    made = await arun_svc("tokens", "create", "ci", "--role", "operator", env=env)
    assert made.returncode == 0, made.stderr
    token = made.stdout.decode().strip()
    assert token.startswith("sbt_")
    assert "shown once" in made.stderr.decode()
    async with web.client() as client:
        me = await client.get("/api/v1/me", headers=bearer(token))
        assert json_of(me) == {"name": "ci", "kind": "token", "role": "operator"}
        # The listing names it, with when it was last used, never its secret
        listed = await arun_svc("tokens", "ls", "--json", env=env)
        (row,) = json.loads(listed.stdout)
        assert row["name"] == "ci"
        assert row["role"] == "operator"
        assert row["last_used"]
        secret = token.rsplit("_", 1)[-1]
        assert secret not in listed.stdout.decode()
        # When it is revoked (by name; by id works too)
        revoked = await arun_svc("tokens", "revoke", "ci", env=env)
        assert revoked.returncode == 0, revoked.stderr
        assert row["id"] in revoked.stdout.decode()
        # Then the API refuses it at once
        after = await client.get("/api/v1/me", headers=bearer(token))
        assert after.status_code == 401
        assert json_of(after)["error"] == "unauthorized"
    events = [decode(d, WebEvent) for _, d, _ in await stream_raw(bus, "WEB")]  # type: ignore[arg-type]
    assert [type(e) for e in events] == [TokenCreated, TokenRevoked]


async def test_svc_users_add_ls_rm_and_a_cli_user_logs_in(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    env = processes.env(NATS_URL=nats_server.url)
    added = run_svc(
        "users", "add", "alice", "--role", "admin", "--password-stdin",
        env=env, input_=b"a long enough password\n",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr
    listed = run_svc("users", "ls", "--json", env=env)
    rows = json.loads(listed.stdout)
    assert [(r["name"], r["role"]) for r in rows] == [("alice", "admin")]
    assert "argon2" not in listed.stdout.decode()  # never the hash
    # The password as typed (the newline that ended it is not part of it)
    web = await start_web(processes, nats_server.url)
    session = await login(web, "alice", "a long enough password")
    assert session.csrf
    removed = run_svc("users", "rm", "alice", env=env)
    assert removed.returncode == 0, removed.stderr
    events = [decode(d, WebEvent) for _, d, _ in await stream_raw(bus, "WEB")]  # type: ignore[arg-type]
    kinds = [type(e) for e in events if isinstance(e, UserAdded | UserRemoved)]
    assert kinds == [UserAdded, UserRemoved]


@pytest.mark.parametrize(
    ("args", "stdin", "code", "line"),
    [
        (("users", "add", "bob", "--role", "root", "--password-stdin"), b"long password",
         2, "unknown role 'root': expected one of viewer, operator, admin"),
        (("users", "add", "bob", "--role", "viewer", "--password-stdin"), b"\n",
         2, "the password is empty"),
        (("users", "add", "bob", "--role", "viewer"), b"long password",
         2, "give the password on stdin with --password-stdin"),
        (("users", "add", "bad name", "--role", "viewer", "--password-stdin"), b"long password",
         2, "user name 'bad name' is invalid"),
        (("users", "add", "dup", "--role", "viewer", "--password-stdin"), b"long password",
         1, "user 'dup' already exists"),
        (("users", "rm", "nobody"), None, 1, "no user 'nobody'"),
        (("tokens", "create", "t", "--role", "god"), None, 2, "unknown role 'god'"),
        (("tokens", "revoke", "nope"), None, 1, "no token with id or name 'nope'"),
    ],
)  # fmt: skip
async def test_bad_input_is_one_line_and_a_non_zero_exit(
    bus: Bus,
    nats_server: EmbeddedNats,
    processes: Processes,
    args: tuple[str, ...],
    stdin: bytes | None,
    code: int,
    line: str,
) -> None:
    env = processes.env(NATS_URL=nats_server.url)
    first = run_svc(
        "users", "add", "dup", "--role", "viewer", "--password-stdin",
        env=env, input_=b"long password",
    )  # fmt: skip
    assert first.returncode == 0, first.stderr
    result = run_svc(*args, env=env, input_=stdin)
    assert result.returncode == code, result.stderr
    (shown,) = result.stderr.decode().splitlines()
    assert shown.startswith("svc: ")
    assert line in shown
