"""The Cloud API egress (services/whatsapp/cloud.py, ADR 0028) against a fake Graph API on
127.0.0.1, through the real egress: an AccountOwner holding a real lease on a real
nats-server sends the jobs queued on OUTBOUND.

- a job is one POST to /{version}/{phone_number_id}/messages with the bearer token; the
  body quotes the message it answers and carries the job id as biz_opaque_callback_data;
- throttling and server errors are retried in place, the chat's order kept;
- 131047 (outside the 24-hour window) sends the account's template for the same job, or
  dead-letters the job saying to configure one;
- an expired token (190) and a restricted account (368) park the account with the reason
  and keep the job (never dead-lettered), sent once the account is resumed;
- a send with no answer in time is `DeliveryUncertain`: resolved as sent by a status
  webhook's confirm mark (no second request), else resent by DELIVERY_UNCERTAIN;
- a fence past its deadline sends nothing; no request outlives the fence's deadline.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager

import pytest

from contracts import subjects
from contracts.events import (
    DeliveryDeadLettered,
    DeliveryFailed,
    DeliveryUncertain,
    LeaseAcquired,
    LeaseReleased,
    MessageSent,
    SendMessage,
    SessionBanned,
    derived_id,
    utcnow,
)
from contracts.payloads import SendRecord
from contracts.streams import OUTBOUND
from services.app import check_role, make_transport
from services.channel.dispatch import EventDispatch
from services.channel.fleet import LeaseBoard
from services.channel.ledger import SendLedger
from services.channel.owner import AccountOwner
from services.channel.port import (
    Fence,
    NotConnectedError,
    Outgoing,
    SessionEvent,
    StaleFenceError,
    UncertainSendError,
)
from services.ops.accounts import resume
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.lease import Lease, LeaseValue, read_lease
from services.runtime.settings import (
    CloudAccount,
    CloudSettings,
    Delivery,
    RateLimit,
    Secret,
    load_settings,
)
from services.whatsapp.cloud import CloudTransport
from tests.conftest import read_stream, wait_until
from tests.whatsapp.fake_graph import (
    DEFAULT_PHONE_NUMBER_ID,
    DEFAULT_TOKEN,
    FakeGraph,
    error,
    ok,
    rate_limited,
    server_error,
    slow,
)

ACCOUNT = "default"
FAST = Delivery(backoff=(0.05, 0.05, 0.05))


def cloud(
    graph: FakeGraph | None = None,
    *,
    url: str = "",
    template: str = "",
    send_timeout: float = 5.0,
    confirm_wait: float = 0.3,
) -> CloudSettings:
    number = CloudAccount(
        phone_number_id=DEFAULT_PHONE_NUMBER_ID,
        token=Secret(DEFAULT_TOKEN),
        app_secret=Secret("app-secret"),
        verify_token=Secret("verify-token"),
        template=template,
        language="en_US",
    )
    return CloudSettings(
        api_url=url or (graph.url if graph else ""),
        api_version="v21.0",
        accounts=((ACCOUNT, number),),
        send_timeout=send_timeout,
        confirm_wait=confirm_wait,
    )


def job(chat: str, n: int, *, reply_to: str | None = None, template: str = "") -> SendMessage:
    job_id = derived_id("cloud-test", chat, str(n))
    return SendMessage(
        id=job_id,
        job_id=job_id,
        account=ACCOUNT,
        chat=chat,
        text=f"{chat.split('@')[0]} #{n}",
        reply_to=reply_to,
        template=template,
    )


async def enqueue(bus: Bus, *jobs: SendMessage) -> None:
    for j in jobs:
        await bus.publish(subjects.outbound("whatsapp", ACCOUNT, j.chat), j)


@asynccontextmanager
async def owned(
    bus: Bus, transport: CloudTransport, delivery: Delivery = FAST, holder: str = "holder-1"
) -> AsyncIterator[AccountOwner]:
    """A running AccountOwner (with a lease board, so a resume wakes it) for the block."""
    async with AsyncExitStack() as stack:
        board = await stack.enter_async_context(LeaseBoard(bus))
        owner = AccountOwner(
            bus, transport, ACCOUNT, holder, lease_ttl=10, receive=False,
            board=board, delivery=delivery,
        )  # fmt: skip
        stop = asyncio.Event()
        running = asyncio.create_task(owner.run(stop))
        try:
            yield owner
        finally:
            stop.set()
            await running


async def delivery_events(bus: Bus) -> list[object]:
    return [e for _, e in await read_stream(bus, "DELIVERY")]


async def sent(bus: Bus) -> dict[str, MessageSent]:
    return {e.job_id: e for e in await delivery_events(bus) if isinstance(e, MessageSent)}


async def lease_value(bus: Bus) -> LeaseValue | None:
    found = await read_lease(await bus.js.key_value("leases"), f"whatsapp.{ACCOUNT}")
    return found[0] if found else None


async def parked(bus: Bus) -> bool:
    """The account's lease key says it is parked."""
    value = await lease_value(bus)
    return value is not None and bool(value.parked)


async def queued(bus: Bus) -> int:
    return (await bus.js.stream_info(OUTBOUND.name)).state.messages


# --- a send -----------------------------------------------------------------------------


async def test_a_job_is_posted_to_its_number_with_the_token_quote_and_job_id(bus: Bus) -> None:
    with FakeGraph() as graph:
        transport = CloudTransport(bus, cloud(graph))
        answer = job("15550002222@s.whatsapp.net", 1, reply_to="wamid.IN1")
        async with owned(bus, transport):
            await enqueue(bus, answer)
            await wait_until(lambda: _has(bus, answer.job_id), what="the job sent")
        (request,) = graph.requests
        events = await sent(bus)
    # Then one POST to the number's messages endpoint with the bearer token
    assert request.path == f"/v21.0/{DEFAULT_PHONE_NUMBER_ID}/messages"
    assert request.headers["authorization"] == f"Bearer {DEFAULT_TOKEN}"
    # whose body is the text to the user's number, quoting the message it answers,
    # with the job id for status webhooks to echo
    assert request.body == {
        "messaging_product": "whatsapp",
        "recipient_type": "individual",
        "to": "15550002222",
        "type": "text",
        "text": {"body": answer.text},
        "biz_opaque_callback_data": answer.job_id,
        "context": {"message_id": "wamid.IN1"},
    }
    # and the send is recorded under the wamid the Graph API answered
    assert events[answer.job_id].transport_message_id == request.answer["messages"][0]["id"]
    # The shared HTTP client closed with the last session
    assert transport._client is None


async def _has(bus: Bus, job_id: str) -> bool:
    return job_id in await sent(bus)


async def test_a_template_job_sends_the_template(bus: Bus) -> None:
    with FakeGraph() as graph:
        transport = CloudTransport(bus, cloud(graph))
        templated = job("15550003333@s.whatsapp.net", 1, template="hello_world")
        async with owned(bus, transport):
            await enqueue(bus, templated)
            await wait_until(lambda: _has(bus, templated.job_id), what="the template sent")
        (request,) = graph.requests
    assert request.body["type"] == "template"
    assert request.body["template"] == {"name": "hello_world", "language": {"code": "en_US"}}
    assert request.body["biz_opaque_callback_data"] == templated.job_id
    assert "text" not in request.body


# --- retried in place -------------------------------------------------------------------


@pytest.mark.parametrize(
    "refusal",
    [rate_limited(), server_error(500), server_error(503), error(131056), error(80007)],
    ids=["130429", "500", "503", "131056", "80007"],
)
async def test_throttling_and_server_errors_are_retried_in_place_keeping_order(
    bus: Bus, refusal: object
) -> None:
    chat = "15550004444@s.whatsapp.net"
    first, second = job(chat, 1), job(chat, 2)
    with FakeGraph() as graph:
        # Given the Graph API refuses the chat's first send once
        graph.script_for("15550004444", refusal, ok())  # type: ignore[arg-type]
        transport = CloudTransport(bus, cloud(graph))
        async with owned(bus, transport):
            await enqueue(bus, first, second)
            await wait_until(lambda: _has(bus, second.job_id), what="both jobs sent")
        ops = [(r.body["biz_opaque_callback_data"], r.status) for r in graph.requests]
    events = await delivery_events(bus)
    # Then the first job is retried in place and sent before the second
    assert ops == [(first.job_id, ops[0][1]), (first.job_id, 200), (second.job_id, 200)]
    assert ops[0][1] != 200
    failed = [e for e in events if isinstance(e, DeliveryFailed)]
    assert [(e.job_id, e.attempt, e.permanent) for e in failed] == [(first.job_id, 1, False)]
    assert [e.job_id for e in events if isinstance(e, MessageSent)] == [
        first.job_id,
        second.job_id,
    ]


# --- the 24-hour window -----------------------------------------------------------------


async def test_outside_the_window_the_accounts_template_is_sent_for_the_same_job(
    bus: Bus,
) -> None:
    with FakeGraph() as graph:
        graph.script(error(131047))  # the text is refused, then the template goes through
        transport = CloudTransport(bus, cloud(graph, template="we_are_back"))
        late = job("15550005555@s.whatsapp.net", 1)
        async with owned(bus, transport):
            await enqueue(bus, late)
            await wait_until(lambda: _has(bus, late.job_id), what="the job sent")
        text, template = graph.requests
        events = await delivery_events(bus)
    assert (text.body["type"], text.status) == ("text", 400)
    assert template.body["type"] == "template"
    assert template.body["template"] == {"name": "we_are_back", "language": {"code": "en_US"}}
    assert template.body["biz_opaque_callback_data"] == late.job_id
    # One job, one send: the template's wamid, no failed attempt on record
    sends = [e for e in events if isinstance(e, MessageSent)]
    assert [(e.job_id, e.transport_message_id) for e in sends] == [
        (late.job_id, template.answer["messages"][0]["id"])
    ]
    assert not [e for e in events if isinstance(e, DeliveryFailed)]


@pytest.mark.parametrize(
    ("code", "says"),
    [(131047, "configure a template"), (131026, "131026")],
    ids=["window-no-template", "undeliverable"],
)
async def test_a_permanent_refusal_dead_letters_the_job_with_the_reason(
    bus: Bus, code: int, says: str
) -> None:
    with FakeGraph() as graph:
        graph.script(error(code))
        transport = CloudTransport(bus, cloud(graph))  # no template configured
        doomed = job("15550006666@s.whatsapp.net", 1)
        async with owned(bus, transport):
            await enqueue(bus, doomed)

            async def dead() -> bool:
                return any(isinstance(e, DeliveryDeadLettered) for e in await delivery_events(bus))

            await wait_until(dead, what="the job dead-lettered")
        assert len(graph.requests) == 1  # permanent: never retried
    events = await delivery_events(bus)
    (letter,) = [e for e in events if isinstance(e, DeliveryDeadLettered)]
    assert letter.job_id == doomed.job_id
    assert says in letter.reason
    (failed,) = [e for e in events if isinstance(e, DeliveryFailed)]
    assert failed.permanent
    assert says in failed.error
    assert not [e for e in events if isinstance(e, MessageSent)]


# --- account errors park the account ----------------------------------------------------


async def test_an_expired_token_parks_the_account_and_the_job_waits_for_the_resume(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    chat = "15550007777@s.whatsapp.net"
    waiting = job(chat, 1)
    with FakeGraph() as graph:
        graph.script(error(190))  # the token expired (401, code 190)
        transport = CloudTransport(bus, cloud(graph))
        async with owned(bus, transport):
            await enqueue(bus, waiting)

            await wait_until(lambda: parked(bus), what="the account parked")
            value = await lease_value(bus)
            assert value is not None
            # Then the account is parked connect_failed, saying what to do
            assert value.state == "connect_failed"
            assert "renew WHATSAPP_CLOUD_TOKEN then svc accounts resume default" in value.parked
            assert "190" in value.parked
            # and the job is kept in its place: no attempt failed, nothing dead-lettered
            assert await queued(bus) == 1
            events = await delivery_events(bus)
            assert not [e for e in events if isinstance(e, DeliveryDeadLettered | DeliveryFailed)]
            # When the operator renews the token and resumes the account
            await resume(bus, ACCOUNT, actor="test", reason="token renewed")
            await wait_until(lambda: _has(bus, waiting.job_id), what="the job sent after resume")
        assert [r.status for r in graph.requests] == [401, 200]
    # The token never reached a log line, the park reason or an event
    assert DEFAULT_TOKEN not in caplog.text
    assert DEFAULT_TOKEN not in value.parked
    for _, event in await read_stream(bus, "ACCOUNTS"):
        assert DEFAULT_TOKEN not in repr(event)


async def test_a_restricted_account_is_parked_banned_with_the_reason(bus: Bus) -> None:
    with FakeGraph() as graph:
        graph.script(error(368))
        transport = CloudTransport(bus, cloud(graph))
        async with owned(bus, transport):
            await enqueue(bus, job("15550008888@s.whatsapp.net", 1))

            await wait_until(lambda: parked(bus), what="the account parked")
        value = await lease_value(bus)
    assert value is not None
    assert value.state == "banned"
    assert "restricted" in value.parked
    assert "368" in value.parked
    assert value.until == ""  # restricted until an operator resumes it
    assert await queued(bus) == 1  # the job waits, never dead-lettered
    banned = [e for _, e in await read_stream(bus, "ACCOUNTS") if isinstance(e, SessionBanned)]
    assert len(banned) == 1
    assert "368" in banned[0].reason


# --- uncertain sends ----------------------------------------------------------------------


async def test_a_send_with_no_answer_in_time_is_resolved_by_its_status_webhook(bus: Bus) -> None:
    chat = "15550009999@s.whatsapp.net"
    unsure = job(chat, 1)
    with FakeGraph() as graph:
        graph.script(slow(4.0))  # accepted, but the answer comes after the send timeout
        transport = CloudTransport(bus, cloud(graph, send_timeout=1.0, confirm_wait=5.0))
        async with owned(bus, transport):
            await enqueue(bus, unsure)
            await wait_until(lambda: graph.requests, what="the request at the Graph API")
            # Meanwhile a status webhook echoed the job id: the ingress confirms it
            await SendLedger(bus, ACCOUNT).confirm(unsure.job_id, "wamid.CONFIRMED")
            await wait_until(lambda: _has(bus, unsure.job_id), what="the job recorded sent")
            record = await SendLedger(bus, ACCOUNT).get(unsure.job_id)
        assert len(graph.requests) == 1  # never sent again
    events = await delivery_events(bus)
    uncertain = [e for e in events if isinstance(e, DeliveryUncertain)]
    assert [(e.job_id, e.resolution) for e in uncertain] == [(unsure.job_id, "confirmed")]
    (done,) = [e for e in events if isinstance(e, MessageSent)]
    assert (done.transport_message_id, done.attempt, done.holder) == (
        "wamid.CONFIRMED",
        1,
        "holder-1",
    )
    assert done.sent_at is not None
    assert done.sent_at <= uncertain[0].at
    assert record is not None
    assert (record.state, record.transport_message_id) == (
        "sent",
        "wamid.CONFIRMED",
    )


async def test_a_send_with_no_answer_and_no_confirmation_is_resent_by_policy(bus: Bus) -> None:
    unsure = job("15550001010@s.whatsapp.net", 1)
    with FakeGraph() as graph:
        graph.script(slow(4.0))
        transport = CloudTransport(bus, cloud(graph, send_timeout=1.0, confirm_wait=0.2))
        async with owned(bus, transport):
            await enqueue(bus, unsure)
            await wait_until(lambda: _has(bus, unsure.job_id), what="the job resent")
        assert len(graph.requests) == 2
        resent = graph.requests[1]
    events = await delivery_events(bus)
    kinds = [
        (type(e).__name__, getattr(e, "resolution", getattr(e, "attempt", None))) for e in events
    ]
    assert kinds == [("DeliveryUncertain", "resend"), ("MessageSent", 2)]
    assert (
        next(e for e in events if isinstance(e, MessageSent)).transport_message_id
        == (resent.answer["messages"][0]["id"])
    )


async def test_a_job_left_mid_send_by_a_previous_owner_is_settled_by_its_confirmation(
    bus: Bus,
) -> None:
    # Given a previous owner that began sending a job and stopped before recording it
    chat = "15550001212@s.whatsapp.net"
    left = job(chat, 1)
    old = Lease(bus, "whatsapp", ACCOUNT, "old-holder", 10)
    assert await old.try_acquire()
    accounts = subjects.accounts("whatsapp", ACCOUNT)
    acquired = LeaseAcquired(
        id=derived_id("LeaseAcquired", ACCOUNT, str(old.token)),
        account=ACCOUNT, holder="old-holder", token=old.token,
    )  # fmt: skip
    await bus.publish(accounts, acquired)
    ack = await bus.publish(subjects.outbound("whatsapp", ACCOUNT, chat), left)
    ledger = SendLedger(bus, ACCOUNT)
    began = utcnow()
    await ledger.put(
        SendRecord(
            job_id=left.job_id, state="sending", attempt=1, holder="old-holder",
            lease_token=old.token, sent_at=began,
        )
    )  # fmt: skip
    await ledger.raise_boundary(ack.seq)  # its consumer had been handed the job
    token = old.token
    assert await old.release()
    released = LeaseReleased(
        id=derived_id("LeaseReleased", ACCOUNT, str(token)),
        account=ACCOUNT, holder="old-holder", token=token, reason="crash",
    )  # fmt: skip
    await bus.publish(accounts, released)
    # and a status webhook that confirmed it went out
    await ledger.confirm(left.job_id, "wamid.LEFT")
    with FakeGraph() as graph:
        async with owned(bus, CloudTransport(bus, cloud(graph))):
            await wait_until(lambda: _has(bus, left.job_id), what="the job settled")
        # Then the new owner records it sent as the old owner did it, and sends nothing
        assert graph.requests == []
    done = (await sent(bus))[left.job_id]
    assert (done.holder, done.lease_token, done.transport_message_id) == (
        "old-holder",
        token,
        "wamid.LEFT",
    )
    assert done.sent_at == began


# --- the session on its own ---------------------------------------------------------------


class _Events:
    def __init__(self) -> None:
        self.seen: list[SessionEvent] = []

    async def __call__(self, event: SessionEvent) -> None:
        self.seen.append(event)


async def test_a_stale_fence_sends_nothing_and_no_request_outlives_the_deadline(
    bus: Bus,
) -> None:
    chat = "15550001313@s.whatsapp.net"
    with FakeGraph() as graph:
        graph.script(slow(3.0))
        transport = CloudTransport(bus, cloud(graph, send_timeout=30.0))
        async with (
            EventDispatch(_Events(), name="t") as events,
            transport.session(ACCOUNT, events, receive=False) as session,
        ):
            # A fence already past its deadline: refused before any I/O
            past = Fence("h", 1, deadline=time.monotonic() - 0.01)
            with pytest.raises(StaleFenceError):
                await session.send(Outgoing(chat, "late", "job-late", past))
            assert graph.requests == []
            # A fence with 0.5 s left bounds the request (not the 30 s send timeout)
            started = time.monotonic()
            soon = Fence("h", 1, deadline=started + 0.5)
            with pytest.raises(UncertainSendError):
                await session.send(Outgoing(chat, "slow", "job-slow", soon))
            took = time.monotonic() - started
    # Measured ~0.5 s; the bound is generous for a loaded 2-core box, far under the 3 s
    # the fake takes to answer and the 30 s send timeout.
    assert took < 2.5
    assert len(graph.requests) == 1


async def test_an_unreachable_graph_api_is_not_connected_nothing_sent(bus: Bus) -> None:
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    transport = CloudTransport(bus, cloud(url=f"http://127.0.0.1:{port}"))
    async with (
        EventDispatch(_Events(), name="t") as events,
        transport.session(ACCOUNT, events, receive=False) as session,
    ):
        fence = Fence("h", 1, deadline=time.monotonic() + 10)
        with pytest.raises(NotConnectedError, match="nothing sent"):
            await session.send(Outgoing("15550001414@s.whatsapp.net", "hi", "job-x", fence))


async def test_sessions_share_one_client_closed_with_the_last(bus: Bus) -> None:
    with FakeGraph() as graph:
        transport = CloudTransport(bus, cloud(graph))
        fence = Fence("h", 1, deadline=time.monotonic() + 10)
        async with EventDispatch(_Events(), name="t") as events:
            async with transport.session(ACCOUNT, events, receive=False) as one:
                async with transport.session(ACCOUNT, events, receive=False) as two:
                    await one.send(Outgoing("15550001515@s.whatsapp.net", "a", "job-a", fence))
                    client = transport._client
                    await two.send(Outgoing("15550001515@s.whatsapp.net", "b", "job-b", fence))
                    assert transport._client is client
                    assert client is not None
                assert transport._client is client  # one session still open
            assert transport._client is None
            assert client.is_closed
            # a later session opens a new one
            async with transport.session(ACCOUNT, events, receive=False) as three:
                await three.send(Outgoing("15550001515@s.whatsapp.net", "c", "job-c", fence))
        assert transport._client is None
        assert len(graph.sends()) == 3


# --- configuration ----------------------------------------------------------------------


def _env(**extra: str) -> dict[str, str]:
    return {
        "WHATSAPP_TRANSPORT": "cloud",
        "WHATSAPP_CLOUD_PHONE_NUMBER_ID": DEFAULT_PHONE_NUMBER_ID,
        "WHATSAPP_CLOUD_TOKEN": DEFAULT_TOKEN,
        "WHATSAPP_CLOUD_APP_SECRET": "app-secret",
        "WHATSAPP_CLOUD_VERIFY_TOKEN": "verify",
        **extra,
    }


def test_cloud_defaults_budget_to_the_numbers_throughput_and_covers_its_send_timeout() -> None:
    settings = load_settings(_env())
    assert settings.delivery.rate_limit == RateLimit(per_minute=4800, burst=80)
    assert settings.cloud is not None
    assert (settings.cloud.send_timeout, settings.cloud.confirm_wait) == (10.0, 5.0)
    assert settings.lease_ttl == 30
    check_role(settings, "whatsapp-egress")  # the defaults fit together
    tuned = load_settings(
        _env(WHATSAPP_CLOUD_SEND_TIMEOUT="2.5", WHATSAPP_CLOUD_CONFIRM_WAIT="0",
             WHATSAPP_RATE_LIMIT="600:10")
    )  # fmt: skip
    assert tuned.cloud is not None
    assert (tuned.cloud.send_timeout, tuned.cloud.confirm_wait) == (2.5, 0.0)
    assert tuned.delivery.rate_limit == RateLimit(per_minute=600, burst=10)


def test_a_lease_ttl_that_cannot_cover_the_cloud_send_timeout_is_refused() -> None:
    settings = load_settings(_env(WHATSAPP_LEASE_TTL="10"))
    with pytest.raises(ConfigError, match="cloud transport's send timeout"):
        check_role(settings, "whatsapp")


def test_a_bad_cloud_send_timeout_is_one_clear_line() -> None:
    with pytest.raises(ConfigError, match="WHATSAPP_CLOUD_SEND_TIMEOUT"):
        load_settings(_env(WHATSAPP_CLOUD_SEND_TIMEOUT="soon"))


async def test_the_cloud_transport_is_chosen_by_the_setting(bus: Bus) -> None:
    transport = make_transport(load_settings(_env()), bus)
    assert isinstance(transport, CloudTransport)
    assert (transport.name, transport.channel, transport.send_timeout) == ("cloud", "whatsapp", 10)
    # A receive path that waits on nothing: webhooks come over HTTP
    assert transport.inbound is not None
    async with (
        EventDispatch(_Events(), name="t") as events,
        transport.inbound.receiver(ACCOUNT, events),
    ):
        pass
