"""The web role as its own NATS user (deploy/nats/auth.conf, ADR 0031/0040): logins,
sessions, the audit trail and an operator's send all stay inside the `web` user's rights."""

from __future__ import annotations

import pytest

from contracts import subjects
from contracts.codec import encode
from contracts.payloads import SimControl
from services.runtime.bus import Bus
from tests.conftest import Processes, run_svc, wait_until
from tests.e2e.conftest import SimNetwork, holder_of, lease_of
from tests.e2e.test_least_privilege import (  # the shipped config's fixtures
    SecuredServer,
    operator,  # noqa: F401
    secured,  # noqa: F401
)
from tests.web.conftest import json_of, login, start_web

pytestmark = pytest.mark.slow


async def test_the_web_role_runs_as_its_own_user(
    secured: SecuredServer,  # noqa: F811
    operator: Bus,  # noqa: F811
    processes: Processes,
) -> None:
    # Given a user added by the operator and an account owned by the whatsapp role
    added = run_svc(
        "users", "add", "olivia", "--role", "operator", "--password-stdin",
        env=secured.env(processes, "operator"), input_=b"a long enough password",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr.decode()
    owner = processes.start("run", "whatsapp", **secured.env(processes, "whatsapp"))
    await wait_until(lambda: holder_of(operator, "default"), 30, "the account's owner")
    web_env = secured.env(processes, "web")
    web = await start_web(
        processes,
        secured.url,
        NATS_USER=web_env["NATS_USER"],
        NATS_PASSWORD=web_env["NATS_PASSWORD"],
    )
    # When olivia logs in and sends a message through the console
    session = await login(web, "olivia", "a long enough password")
    async with SimNetwork(operator, "default") as net, web.client() as client:
        sent = await client.post(
            "/api/v1/accounts/default/messages",
            json={"chat": "bob@s.whatsapp.net", "text": "hello from the console"},
            headers=session.headers(),
        )
        assert sent.status_code == 202, sent.text
        job_id = json_of(sent)["job_id"]
        await net.wait(lambda: job_id in net.job_ids(), 30, "the operator's send")
        # ... and, once WhatsApp parked the account, resumes it from the console: the web
        # user may not write the lease bucket, so the account's worker clears it on request
        await operator.nc.publish(
            subjects.sim_control("default"), encode(SimControl(event="stream_replaced"))
        )
        await wait_until(lambda: _parked(operator), 30, "the parked account")
        resumed = await client.post(
            "/api/v1/accounts/default/resume",
            json={"reason": "re-linked"},
            headers=session.headers(),
        )
        assert resumed.status_code == 200, resumed.text
        assert json_of(resumed) == {"account": "default", "was_parked": "stream replaced"}
        await wait_until(lambda: holder_of(operator, "default"), 30, "the account owned again")
        out = await client.post(
            "/logout", data={"csrf": session.csrf}, headers=session.headers(csrf=False)
        )
        assert out.status_code == 303
    assert processes.stop(web.proc) == 0, processes.log(web.proc)
    assert processes.stop(owner) == 0, processes.log(owner)
    # Then nothing the web role did was outside its permissions
    assert secured.violations() == []


async def _parked(bus: Bus) -> bool:
    value = await lease_of(bus, "default")
    return value is not None and bool(value.parked)
