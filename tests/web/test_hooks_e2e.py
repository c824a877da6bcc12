"""Outgoing webhooks through real processes: `svc nats serve`, `svc run all` (which runs
the webhook part, as `web` will) and the `svc webhooks` commands, with a real receiver."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from contracts import subjects
from contracts.codec import encode
from contracts.payloads import SimInbound
from services.runtime.bus import Bus
from tests.conftest import Processes, run_svc, wait_until
from tests.e2e.conftest import consumers_ready, served  # noqa: F401 (the fixture)
from tests.web.hooks_receiver import receiving

pytestmark = pytest.mark.slow

SECRET = "e2e-secret-do-not-print-0123456789"
FAST = {
    "SVC_WEBHOOKS_ALLOW_PRIVATE": "true",  # the receiver is on loopback
    "SVC_WEBHOOKS_ATTEMPTS": "3",
    "SVC_WEBHOOKS_BACKOFF": "0.05",
}


async def svc(processes: Processes, url: str, *args: str, stdin: bytes | None = None) -> Any:
    env = processes.env(NATS_URL=url, **FAST)
    return await asyncio.to_thread(run_svc, *args, env=env, timeout=60, input_=stdin)


async def test_svc_webhooks_add_ls_test_rm_and_real_traffic_delivered_signed(
    processes: Processes,
    served: tuple[str, Bus],  # noqa: F811 (the e2e fixture, imported above)
) -> None:
    url, bus = served
    role = processes.start("run", "all", NATS_URL=url, **FAST)
    await wait_until(
        lambda: consumers_ready(bus, ("INBOUND", "core"), ("HOOK_JOBS", "hooks-deliver")),
        60,
        "svc run all up",
    )
    outputs: list[str] = []
    async with receiving() as receiver:
        # Given a webhook added with the CLI, the secret piped in
        events = "MessageReceived,TurnCompleted,MessageSent"
        added = await svc(
            processes, url, "webhooks", "add", receiver.url, "--events", events,
            "--secret-stdin", "--json", stdin=SECRET.encode() + b"\n",
        )  # fmt: skip
        outputs.append(added.stdout.decode() + added.stderr.decode())
        assert added.returncode == 0, outputs[-1]
        hook = json.loads(added.stdout)
        assert hook["secret"] == "set"
        listed = await svc(processes, url, "webhooks", "ls")
        outputs.append(listed.stdout.decode() + listed.stderr.decode())
        assert listed.returncode == 0
        assert hook["id"] in outputs[-1]

        # When a user writes to the bot through the sim network
        inbound = SimInbound(chat="alice@s.whatsapp.net", sender="alice@s.whatsapp.net",
                             text="hello hooks", message_id="m-1")  # fmt: skip
        await bus.js.publish(subjects.sim_in("default"), encode(inbound))
        # Then the receiver gets the message, the turn and the send, each signed
        await wait_until(lambda: len(receiver.requests) >= 3, 60, "three deliveries")
        kinds = sorted(r.headers["x-switchboard-event"] for r in receiver.requests)
        assert kinds == ["MessageReceived", "MessageSent", "TurnCompleted"]
        assert all(r.signed_with(SECRET) for r in receiver.requests)
        sent = next(r for r in receiver.requests if r.json()["type"] == "MessageSent")
        assert sent.json()["event"]["text"] == "echo: hello hooks"

        # And `svc webhooks test` delivers a test event and says so
        tested = await svc(processes, url, "webhooks", "test", hook["id"])
        outputs.append(tested.stdout.decode() + tested.stderr.decode())
        assert tested.returncode == 0, outputs[-1]
        assert "delivered test" in outputs[-1]
        assert receiver.requests[-1].headers["x-switchboard-event"] == "WebhookTestRequested"

        # And a bad event name is refused with one line naming the valid ones
        bad = await svc(
            processes, url, "webhooks", "add", receiver.url, "--events", "MesageSent",
            "--secret-stdin", stdin=SECRET.encode(),
        )  # fmt: skip
        outputs.append(bad.stdout.decode() + bad.stderr.decode())
        assert bad.returncode != 0
        assert bad.stderr.decode().count("\n") == 1
        assert "unknown event 'MesageSent'" in outputs[-1]
        assert "MessageSent" in outputs[-1]

        # And after `svc webhooks rm` it is gone
        removed = await svc(processes, url, "webhooks", "rm", hook["id"])
        outputs.append(removed.stdout.decode() + removed.stderr.decode())
        assert removed.returncode == 0, outputs[-1]
        again = await svc(processes, url, "webhooks", "test", hook["id"])
        outputs.append(again.stdout.decode() + again.stderr.decode())
        assert again.returncode == 1
        assert f"no webhook {hook['id']}" in outputs[-1]

    assert processes.stop(role) == 0, processes.log(role)
    # The secret was printed nowhere: not by a command, not in the role's logs
    assert SECRET not in "".join(outputs)
    assert SECRET not in processes.log(role)


async def test_svc_webhooks_add_without_a_secret_or_to_loopback_is_refused(
    processes: Processes,
    served: tuple[str, Bus],  # noqa: F811 (the e2e fixture, imported above)
) -> None:
    url, _ = served
    no_secret = await svc(
        processes, url, "webhooks", "add", "http://127.0.0.1:9/", "--events", "LeaseLost"
    )
    assert no_secret.returncode == 2
    assert "--secret-stdin" in no_secret.stderr.decode()
    env = processes.env(NATS_URL=url)  # private targets not allowed
    private = await asyncio.to_thread(
        run_svc, "webhooks", "add", "http://127.0.0.1:9/", "--events", "LeaseLost",
        "--secret-stdin", env=env, input_=SECRET.encode(),
    )  # fmt: skip
    assert private.returncode == 1
    line = private.stderr.decode()
    assert line.count("\n") == 1
    assert "a private or loopback address" in line
    assert SECRET not in line + private.stdout.decode()


def test_a_bad_webhook_setting_stops_the_role_before_connecting(processes: Processes) -> None:
    # NATS_URL points nowhere: the setting is refused before any connection is tried
    env = processes.env(NATS_URL="nats://127.0.0.1:9", SVC_WEBHOOKS_ATTEMPTS="0")
    ran = run_svc("run", "all", env=env, timeout=60)
    assert ran.returncode == 2
    assert ran.stderr.decode().strip().splitlines()[-1] == (
        "svc: SVC_WEBHOOKS_ATTEMPTS='0' is invalid: expected a whole number from 1 to 100"
    )
    env = processes.env(NATS_URL="nats://127.0.0.1:9", SVC_WEBHOOKS_ALLOW_PRIVATE="maybe")
    added = run_svc(
        "webhooks", "add", "http://x.test/", "--events", "LeaseLost", "--secret-stdin",
        env=env, input_=SECRET.encode(),
    )  # fmt: skip
    assert added.returncode == 2
    assert "SVC_WEBHOOKS_ALLOW_PRIVATE='maybe' is invalid" in added.stderr.decode()
