"""Outgoing webhooks as the shipped `web` NATS user (deploy/nats/auth.conf): the part
`svc run web` will run creates its consumers, makes jobs, delivers and records, with no
permission violation on the server."""

from __future__ import annotations

import asyncio

import pytest

from contracts import subjects
from contracts.events import LeaseAcquired
from contracts.hooks import WebhookDelivered
from services.ops import webhooks as ops
from services.runtime.bus import Bus, connect
from services.web.hooks import Hooks, HookSettings
from tests.conftest import read_stream, stream_raw, wait_until
from tests.e2e.test_least_privilege import SecuredServer, operator, secured  # noqa: F401
from tests.web.hooks_receiver import receiving

pytestmark = pytest.mark.slow

SETTINGS = HookSettings(allow_private=True, attempts=3, backoff=0.05)


async def test_the_webhook_part_runs_as_the_web_user(
    secured: SecuredServer,  # noqa: F811 (fixture imported above)
    operator: Bus,  # noqa: F811
) -> None:
    async with (
        receiving(lambda n: 500 if n == 0 else 200) as receiver,
        connect(secured.url, name="web", security=secured.security("web")) as web,
    ):
        hooks = Hooks(web, SETTINGS)
        stop = asyncio.Event()
        task = asyncio.create_task(hooks.run(stop))
        try:
            # Given a webhook added by an operator
            added = await ops.add(
                operator, receiver.url, ["LeaseAcquired"], "x" * 32, settings=SETTINGS
            )
            await wait_until(lambda: added.id in hooks.book.view.live, 10, "the web user's book")
            # When an event it wants is recorded
            event = LeaseAcquired(account="acct-1", holder="h", token=1)
            await operator.publish(subjects.accounts("whatsapp", "acct-1"), event)
            # Then the web user's part retries once and delivers it, and records both
            await wait_until(lambda: len(receiver.requests) == 2, 30, "the retried delivery")
            await wait_until(
                lambda: _delivered(operator), 10, "the delivery recorded by the web user"
            )
        finally:
            stop.set()
            await task
    assert not task.exception()
    assert secured.violations() == []
    assert await read_stream(operator, "ACCOUNTS")  # the event is still there to audit


async def _delivered(bus: Bus) -> bool:
    from contracts.codec import decode
    from contracts.hooks import DeliveryRecord

    raw = await stream_raw(bus, "HOOK_DELIVERIES")
    records = [decode(data, DeliveryRecord) for _, data, _ in raw]  # type: ignore[arg-type]
    return any(isinstance(r, WebhookDelivered) for r in records)
