"""`svc run whatsapp-ingress` with the Cloud API, as real processes: two replicas behind
one webhook URL receive the same deliveries concurrently (as a load balancer and Meta's
retries hand them out) and every message and status is stored once; secrets never reach
their logs; without SVC_HTTP_PORT the role refuses to start with one line."""

from __future__ import annotations

import asyncio
import json
import subprocess

import pytest

from contracts.events import DeliveryReceipt, MessageReceived
from services.runtime.bus import Bus
from tests.conftest import Processes, arun_svc, read_stream, wait_until
from tests.whatsapp.fake_graph import (
    DEFAULT_PHONE_NUMBER_ID,
    WebhookClient,
    http_request,
    message_body,
    status_body,
)

pytestmark = pytest.mark.slow

ACCOUNT = "shop"
SECRET = "app-secret-e2e-not-a-secret"
VERIFY = "verify-token-e2e-not-a-secret"
TOKEN = "EAAG-e2e-token-not-a-secret"
USER = "15550003333"


def cloud_env(url: str, **extra: str) -> dict[str, str]:
    return {
        "NATS_URL": url,
        "WHATSAPP_TRANSPORT": "cloud",
        "WHATSAPP_ACCOUNT_ID": ACCOUNT,
        "WHATSAPP_CLOUD_PHONE_NUMBER_ID": DEFAULT_PHONE_NUMBER_ID,
        "WHATSAPP_CLOUD_TOKEN": TOKEN,
        "WHATSAPP_CLOUD_APP_SECRET": SECRET,
        "WHATSAPP_CLOUD_VERIFY_TOKEN": VERIFY,
        "SVC_LOG_FORMAT": "json",
        **extra,
    }


async def listening_url(processes: Processes, proc: subprocess.Popen[bytes]) -> str:
    """The URL a process logged in its `http listening` line, once it is ready (/readyz
    200: the streams and the `webhooks` bucket exist). Before that a webhook is answered
    503 and Meta retries it, as a load balancer would not route to it yet."""
    found: list[str] = []

    def logged() -> bool:
        assert proc.poll() is None, processes.log(proc)
        for line in processes.log(proc).splitlines():
            if '"http listening"' in line:
                found.append(json.loads(line)["url"])
                return True
        return False

    await wait_until(logged, timeout=60, what="the ingress to listen")

    async def ready() -> bool:
        answer = await asyncio.to_thread(http_request, f"{found[0]}/readyz")
        return answer.status == 200

    await wait_until(ready, timeout=60, what="the ingress to be ready (/readyz 200)")
    return found[0]


async def test_two_ingress_replicas_receiving_the_same_bodies_concurrently_store_each_once(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    env = cloud_env(url, SVC_HTTP_PORT="0")
    replicas = [processes.start("run", "whatsapp-ingress", **env) for _ in range(2)]
    clients = [WebhookClient(await listening_url(processes, p), SECRET) for p in replicas]
    for client in clients:
        health = await asyncio.to_thread(http_request, f"{client.base_url}/healthz")
        assert (health.status, health.body) == (200, b"ok")
        handshake = await client.verify(ACCOUNT, "subscribe", VERIFY, "challenge-1")
        assert (handshake.status, handshake.body) == (200, b"challenge-1")

    # Given 12 user messages and the statuses of one of our sends, each delivered to both
    # replicas at once and then delivered again (Meta's retry)
    bodies = [
        message_body(DEFAULT_PHONE_NUMBER_ID, f"wamid.E2E{n}", USER, f"message {n}")
        for n in range(12)
    ]
    bodies += [
        status_body(
            DEFAULT_PHONE_NUMBER_ID, "wamid.SENT1", s, job_id="job-e2e-1", recipient_id=USER
        )
        for s in ("delivered", "sent", "read")
    ]
    for _ in range(2):
        answers = await asyncio.gather(
            *(client.post(ACCOUNT, body) for body in bodies for client in clients)
        )
        assert {a.status for a in answers} == {200}, [a.body for a in answers]

    # Then each is stored once, and before the 200s (no wait)
    inbound = [e for _, e in await read_stream(bus, "INBOUND") if isinstance(e, MessageReceived)]
    assert sorted(m.message_id for m in inbound) == sorted(f"wamid.E2E{n}" for n in range(12))
    receipts = [e for _, e in await read_stream(bus, "DELIVERY") if isinstance(e, DeliveryReceipt)]
    assert sorted(r.status for r in receipts) == ["delivered", "read", "sent"]
    assert {r.job_id for r in receipts} == {"job-e2e-1"}

    # And the replicas stop cleanly; no secret reached their logs
    for proc in replicas:
        assert processes.stop(proc) == 0
        log = processes.log(proc)
        assert '"webhook stored"' in log
        for secret in (SECRET, VERIFY, TOKEN):
            assert secret not in log


async def test_whatsapp_ingress_with_cloud_refuses_to_start_without_svc_http_port(
    processes: Processes,
) -> None:
    result = await arun_svc(
        "run", "whatsapp-ingress", env=processes.env(**cloud_env("nats://127.0.0.1:1"))
    )
    lines = result.stderr.decode().strip().splitlines()
    assert result.returncode == 2, lines
    assert len(lines) == 1, lines
    assert "set SVC_HTTP_PORT" in lines[0]
