"""The `cloud-window` follow-up (services/whatsapp/cloud_window.py, ADR 0028): a reply the
Graph API accepted and later reported `failed` for the 24-hour window (131047) is followed
by one job sending the account's template -- once, however often the failure is read --
and by nothing when the account has no template. Real nats-server; the failure is
published as the ingress records it (DeliveryFailed, attempt 0)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import nats.js.errors

from contracts import subjects
from contracts.events import (
    DeliveryFailed,
    DeliveryUncertain,
    MessageSent,
    SendMessage,
    derived_id,
)
from contracts.streams import DELIVERY, OUTBOUND
from services.runtime.bus import Bus
from services.runtime.settings import CloudAccount, CloudSettings, Secret
from services.whatsapp.cloud_window import DURABLE, CloudWindow
from tests.conftest import read_stream, role, wait_until
from tests.whatsapp.fake_graph import DEFAULT_PHONE_NUMBER_ID, DEFAULT_TOKEN, FakeGraph

ACCOUNT = "default"
CHAT = "15550002222@s.whatsapp.net"


def settings(template: str) -> CloudSettings:
    number = CloudAccount(
        phone_number_id=DEFAULT_PHONE_NUMBER_ID,
        token=Secret(DEFAULT_TOKEN),
        app_secret=Secret("app-secret"),
        verify_token=Secret("verify"),
        template=template,
    )
    return CloudSettings(api_url="http://127.0.0.1:9", accounts=((ACCOUNT, number),))


async def a_sent_job(bus: Bus, n: int = 1) -> str:
    """A job the egress sent (the network accepted it): its id."""
    job_id = derived_id("window-test", str(n))
    sent = MessageSent(
        id=derived_id("sent", job_id),
        job_id=job_id,
        account=ACCOUNT,
        chat=CHAT,
        holder="h",
        lease_token=1,
        transport_message_id=f"wamid.SENT{n}",
    )
    await bus.publish(subjects.delivery("whatsapp", ACCOUNT, CHAT), sent)
    return job_id


async def fail(bus: Bus, job_id: str, *, code: int = 131047, attempt: int = 0, n: str = "") -> None:
    """The ingress records a `failed` status webhook of `job_id` (one event per call)."""
    failed = DeliveryFailed(
        id=derived_id("failed", ACCOUNT, job_id, str(code), n),
        job_id=job_id,
        account=ACCOUNT,
        chat=CHAT,
        attempt=attempt,
        permanent=True,
        code=code,
        error=f"{code} Re-engagement message",
    )
    await bus.publish(subjects.delivery("whatsapp", ACCOUNT, CHAT), failed)


async def queued_jobs(bus: Bus) -> list[SendMessage]:
    return [e for _, e in await read_stream(bus, OUTBOUND.name) if isinstance(e, SendMessage)]


@asynccontextmanager
async def window(bus: Bus, template: str) -> AsyncIterator[CloudWindow]:
    consumer = CloudWindow(bus, settings(template))
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:
        yield consumer
    finally:
        stop.set()
        await task


async def read_all(bus: Bus) -> bool:
    """The window consumer has acked everything DELIVERY holds."""
    try:
        info = await bus.js.consumer_info(DELIVERY.name, DURABLE)
    except nats.js.errors.NotFoundError:
        return False  # not created yet
    stream = await bus.js.stream_info(DELIVERY.name)
    return info.ack_floor.stream_seq >= stream.state.last_seq and info.num_ack_pending == 0


async def read_everything_again(bus: Bus) -> None:
    """The window consumer starts over (deleted, then made again as after an operator's
    delete) and reads every failure DELIVERY holds once more."""
    await bus.js.delete_consumer(DELIVERY.name, DURABLE)
    async with window(bus, "we_are_back"):
        await wait_until(lambda: read_all(bus), what="everything read again")


async def test_a_window_failure_is_followed_by_one_template_job_even_when_read_again(
    bus: Bus,
) -> None:
    job_id = await a_sent_job(bus)
    await fail(bus, job_id)
    async with window(bus, "we_are_back"):
        await wait_until(lambda: _count(bus, 1), what="the template job")
        # When the same failure is recorded again (a retried webhook) and read again
        await fail(bus, job_id, n="again")
        await wait_until(lambda: read_all(bus), what="the window consumer caught up")
    # and the consumer starts over from the beginning (every failure delivered again)
    await read_everything_again(bus)
    # Then exactly one job: the template, to the same chat, caused by the failed job
    (follow_up,) = await queued_jobs(bus)
    expected = derived_id("template", job_id)
    assert (follow_up.job_id, follow_up.id) == (expected, expected)
    assert subjects.check_job_id(follow_up.job_id) == expected
    assert (follow_up.account, follow_up.chat) == (ACCOUNT, CHAT)
    assert (follow_up.template, follow_up.text) == ("we_are_back", "(template we_are_back)")
    assert follow_up.cause_id == job_id


async def _count(bus: Bus, n: int) -> bool:
    return len(await queued_jobs(bus)) == n


async def test_without_a_template_a_window_failure_makes_no_job(bus: Bus) -> None:
    job_id = await a_sent_job(bus)
    await fail(bus, job_id)
    async with window(bus, ""):
        await wait_until(lambda: read_all(bus), what="the failure read")
    assert await queued_jobs(bus) == []


async def test_other_delivery_events_make_no_job(bus: Bus) -> None:
    # A send attempt refused synchronously (attempt 1: the egress handled it), another
    # network failure (131026), an uncertain send: none is a window failure to follow up
    job_id = await a_sent_job(bus)
    await fail(bus, job_id, attempt=1)
    await fail(bus, job_id, code=131026)
    uncertain = DeliveryUncertain(
        job_id=job_id, account=ACCOUNT, chat=CHAT, holder="h", lease_token=1, resolution="resend"
    )
    await bus.publish(subjects.delivery("whatsapp", ACCOUNT, CHAT), uncertain)
    async with window(bus, "we_are_back"):
        await wait_until(lambda: read_all(bus), what="every event read")
    assert await queued_jobs(bus) == []


async def test_an_egress_role_with_cloud_sends_the_template_after_a_window_failure(
    bus: Bus,
) -> None:
    # Given the egress role with cloud and a template, against a fake Graph API
    with FakeGraph() as graph:
        env = {
            "WHATSAPP_TRANSPORT": "cloud",
            "WHATSAPP_CLOUD_API_URL": graph.url,
            "WHATSAPP_CLOUD_PHONE_NUMBER_ID": DEFAULT_PHONE_NUMBER_ID,
            "WHATSAPP_CLOUD_TOKEN": DEFAULT_TOKEN,
            "WHATSAPP_CLOUD_APP_SECRET": "app-secret",
            "WHATSAPP_CLOUD_VERIFY_TOKEN": "verify",
            "WHATSAPP_CLOUD_TEMPLATE": "we_are_back",
            "WHATSAPP_CLOUD_SEND_TIMEOUT": "1",
        }
        async with role(bus, "whatsapp-egress", **env):
            # When a reply is sent (the Graph API accepts it)
            job_id = derived_id("window-test", "reply")
            reply = SendMessage(id=job_id, job_id=job_id, account=ACCOUNT, chat=CHAT, text="hi")
            await bus.publish(subjects.outbound("whatsapp", ACCOUNT, CHAT), reply)
            await wait_until(lambda: _sent(bus, job_id), timeout=20, what="the reply sent")
            # and its status webhook then says it failed outside the window
            await fail(bus, job_id)
            follow_up = derived_id("template", job_id)
            await wait_until(lambda: _sent(bus, follow_up), timeout=20, what="the template sent")
        # Then the Graph API got the text, then the template for the follow-up job
        text, request = graph.requests
    assert text.body["biz_opaque_callback_data"] == job_id
    assert request.body["type"] == "template"
    assert request.body["template"]["name"] == "we_are_back"
    assert request.body["biz_opaque_callback_data"] == follow_up
    assert request.body["to"] == "15550002222"


async def _sent(bus: Bus, job_id: str) -> bool:
    events = [e for _, e in await read_stream(bus, DELIVERY.name)]
    return any(isinstance(e, MessageSent) and e.job_id == job_id for e in events)


async def _outlived_duplicate_window(bus: Bus, probe: SendMessage) -> bool:
    """True once OUTBOUND no longer remembers `probe`'s id (its duplicate window passed):
    what it stored before the probe it has forgotten too."""
    subject = subjects.outbound("whatsapp", probe.account, probe.chat)
    return not (await bus.publish(subject, probe)).duplicate


async def test_a_failure_read_again_after_the_duplicate_window_makes_no_second_job(
    bus: Bus,
) -> None:
    # Given a window failure followed up once
    job_id = await a_sent_job(bus)
    await fail(bus, job_id)
    async with window(bus, "we_are_back"):
        await wait_until(lambda: _count(bus, 1), what="the template job")
    # When OUTBOUND's duplicate window has passed (shortened here from its 2 minutes)
    config = (await bus.js.stream_info(OUTBOUND.name)).config
    config.duplicate_window = 0.5
    await bus.js.update_stream(config)
    probe_id = derived_id("window-test", "probe")
    probe = SendMessage(
        id=probe_id, job_id=probe_id, account="probe", chat=CHAT, text="duplicate window probe"
    )
    await bus.publish(subjects.outbound("whatsapp", "probe", CHAT), probe)
    await wait_until(
        lambda: _outlived_duplicate_window(bus, probe), what="the duplicate window passed"
    )
    # and the consumer reads every failure again (recreated, as after an operator's delete)
    await read_everything_again(bus)
    # Then still one template job for the failure: a job already enqueued is not enqueued
    # again, however late the failure is read again
    follow_ups = [j for j in await queued_jobs(bus) if j.account == ACCOUNT]
    assert [j.job_id for j in follow_ups] == [derived_id("template", job_id)]
