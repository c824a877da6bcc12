"""Outgoing webhooks (issue 18 item 5, ADR 0042) against a real nats-server and a real
HTTP receiver on 127.0.0.1: signed deliveries, retries, dead letters, no duplicates,
replicas, unsubscribing, private targets, test deliveries, secrets kept out of sight."""

from __future__ import annotations

import asyncio
import logging
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from pathlib import Path

import pytest

from contracts import subjects
from contracts.codec import decode
from contracts.events import AccountRegistered, LeaseAcquired
from contracts.hooks import (
    DeliveryRecord,
    WebhookDeadLettered,
    WebhookDelivered,
    WebhookDeliveryFailed,
    delivery_id,
)
from contracts.streams import HOOK_JOBS
from services.ops import webhooks as ops
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats
from services.web.hooks import DELIVER_DURABLE, Hooks, HookSettings, fanout_durable
from tests.conftest import stream_raw, wait_until
from tests.web.hooks_receiver import Receiver, receiving

SECRET = "s3cr3t-hook-key-0123456789abcdef"
# Loopback receivers need private targets allowed: the same opt-in the http_get tests
# use (allow_private), here SVC_WEBHOOKS_ALLOW_PRIVATE. Fast retries for the tests.
FAST = HookSettings(allow_private=True, timeout=5.0, attempts=3, backoff=0.05, backoff_max=0.2)


@asynccontextmanager
async def hooks_running(
    bus: Bus, settings: HookSettings = FAST, **kw: object
) -> AsyncIterator[Hooks]:
    """The webhook part of a `web`/`all` role, in this process, for the block."""
    hooks = Hooks(bus, settings, **kw)  # type: ignore[arg-type]
    stop = asyncio.Event()
    task = asyncio.create_task(hooks.run(stop))
    try:
        yield hooks
    finally:
        stop.set()
        await task


async def registered(bus: Bus, account: str = "acct-1", **kw: object) -> AccountRegistered:
    """A public event on ACCOUNTS (one that needs no outcome in the audit)."""
    event = AccountRegistered(account=account, transport="sim", **kw)  # type: ignore[arg-type]
    await bus.publish(subjects.accounts("whatsapp", account), event)
    return event


async def records(bus: Bus, sub: str = "*") -> list[DeliveryRecord]:
    raw = await stream_raw(bus, "HOOK_DELIVERIES", f"hooks.deliveries.{sub}.*")
    return [decode(data, DeliveryRecord) for _, data, _ in raw]  # type: ignore[arg-type]


async def queue_drained(bus: Bus) -> bool:
    """Every job made so far was settled (nothing queued, nothing in hand)."""
    try:
        info = await bus.js.consumer_info(HOOK_JOBS.name, DELIVER_DURABLE)
    except Exception:  # not created yet
        return False
    return info.num_pending == 0 and info.num_ack_pending == 0


async def fanned_out(bus: Bus, stream: str, seq: int) -> bool:
    """The stream's fan-out consumer has settled everything up to `seq`."""
    try:
        info = await bus.js.consumer_info(stream, fanout_durable(stream))
    except Exception:
        return False
    return info.ack_floor.stream_seq >= seq and info.num_ack_pending == 0


async def subscribe(bus: Bus, receiver: Receiver, *events: str) -> str:
    added = await ops.add(
        bus, receiver.url, list(events or ["AccountRegistered"]), SECRET, settings=FAST
    )
    return added.id


# --- signing and the body -----------------------------------------------------------------


async def test_a_delivery_is_signed_and_the_receiver_verifies_the_hmac(bus: Bus) -> None:
    async with receiving() as receiver, hooks_running(bus):
        # Given a subscription to AccountRegistered
        sub = await subscribe(bus, receiver)
        # When such an event is recorded
        event = await registered(bus)
        await wait_until(lambda: receiver.requests, 20, "the delivery")
        # Then the receiver can verify the signature over the raw body with the secret
        request = receiver.requests[0]
        assert request.method == "POST"
        assert request.signed_with(SECRET)
        assert not request.signed_with("another-secret-0123456789")
        # And the headers and the envelope say what it is; the event rides verbatim
        assert request.headers["x-switchboard-event"] == "AccountRegistered"
        assert request.headers["x-switchboard-delivery"] == delivery_id(sub, event.id)
        body = request.json()
        assert body["subscription"] == sub
        assert body["delivery"] == delivery_id(sub, event.id)
        assert body["attempt"] == 1
        assert body["type"] == "AccountRegistered"
        assert body["event"]["id"] == event.id
        assert body["event"]["account"] == "acct-1"
        assert body["stream"] == "ACCOUNTS"
        assert body["seq"] >= 1
        datetime.fromisoformat(body["sent_at"])
        # And the delivery is on record
        await wait_until(lambda: _has(bus, WebhookDelivered), 10, "the record")


async def _has(bus: Bus, kind: type) -> bool:
    return any(isinstance(r, kind) for r in await records(bus))


# --- retries, dead letters ----------------------------------------------------------------


async def test_a_500_then_200_is_retried_and_delivered_once(bus: Bus) -> None:
    async with receiving(lambda n: 500 if n == 0 else 200) as receiver, hooks_running(bus):
        sub = await subscribe(bus, receiver)
        event = await registered(bus)
        await wait_until(lambda: _has(bus, WebhookDelivered), 20, "the delivery after a retry")
        await wait_until(lambda: queue_drained(bus), 10, "the job settled")
        # Then two attempts of the same delivery reached the receiver, the second accepted
        assert [r.json()["attempt"] for r in receiver.requests] == [1, 2]
        assert receiver.deliveries == {delivery_id(sub, event.id)}
        assert all(r.signed_with(SECRET) for r in receiver.requests)
        # And the records say: failed once (HTTP 500), then delivered once
        found = await records(bus, sub)
        assert [type(r) for r in found] == [WebhookDeliveryFailed, WebhookDelivered]
        assert isinstance(found[0], WebhookDeliveryFailed)
        assert "HTTP 500" in found[0].error
        assert found[0].retry_in > 0


async def test_an_always_failing_receiver_is_dead_lettered_after_the_last_attempt(
    bus: Bus,
) -> None:
    async with receiving(lambda _n: 500) as receiver, hooks_running(bus):
        sub = await subscribe(bus, receiver)
        await registered(bus)
        await wait_until(lambda: _has(bus, WebhookDeadLettered), 20, "the dead letter")
        await wait_until(lambda: queue_drained(bus), 10, "the job settled")
        # Then exactly the configured attempts were made, and no more
        assert len(receiver.requests) == FAST.attempts
        letters = await ops.dead_letters(bus, sub)
        assert len(letters) == 1
        letter = letters[0]
        # With every attempt's error, the cause, and the event to look at
        assert [e.attempt for e in letter.errors] == [1, 2, 3]
        assert all("HTTP 500" in e.error for e in letter.errors)
        assert "gave up after 3 attempts" in letter.reason
        assert letter.event_type == "AccountRegistered"
        assert b'"account":"acct-1"' in bytes(letter.event)


async def test_a_410_is_dead_lettered_at_once(bus: Bus) -> None:
    async with receiving(lambda _n: 410) as receiver, hooks_running(bus):
        sub = await subscribe(bus, receiver)
        await registered(bus)
        await wait_until(lambda: _has(bus, WebhookDeadLettered), 20, "the dead letter")
        assert len(receiver.requests) == 1
        (letter,) = await ops.dead_letters(bus, sub)
        assert "HTTP 410" in letter.reason


async def test_a_slow_receiver_times_out_and_is_retried(bus: Bus) -> None:
    settings = HookSettings(allow_private=True, timeout=0.3, attempts=2, backoff=0.05)
    async with receiving(pause=1.0) as receiver, hooks_running(bus, settings):
        sub = await ops.add(bus, receiver.url, ["AccountRegistered"], SECRET, settings=settings)
        await registered(bus)
        await wait_until(lambda: _has(bus, WebhookDeadLettered), 20, "the dead letter")
        (letter,) = await ops.dead_letters(bus, sub.id)
        assert [e.error for e in letter.errors] == ["no answer within 0.3 s"] * 2


# --- no duplicates, replicas --------------------------------------------------------------


async def test_a_redelivered_source_event_makes_no_second_delivery(bus: Bus) -> None:
    async with receiving() as receiver, hooks_running(bus):
        sub = await subscribe(bus, receiver)
        event = await registered(bus)
        await wait_until(lambda: receiver.requests, 20, "the first delivery")
        # When the same event is stored again (a re-recorded or replayed write: its own
        # Nats-Msg-Id, the same event id) and read by the fan-out
        ack = await bus.publish(
            subjects.accounts("whatsapp", "acct-1"), event, msg_id=f"{event.id}-again"
        )
        assert not ack.duplicate
        await wait_until(lambda: fanned_out(bus, "ACCOUNTS", ack.seq), 20, "the fan-out")
        # And its job is made again past the jobs' duplicate window (a fresh Nats-Msg-Id)
        from contracts.hooks import DeliverWebhook, job_subject

        again = DeliverWebhook(
            id=delivery_id(sub, event.id),
            subscription=sub,
            event_type="AccountRegistered",
            event_id=event.id,
        )
        await bus.publish(job_subject(sub, again.id), again, msg_id="past-the-window")
        await wait_until(lambda: queue_drained(bus), 10, "the jobs settled")
        # Then the receiver got it once, and it is recorded delivered once
        assert len(receiver.requests) == 1
        assert [type(r) for r in await records(bus, sub)] == [WebhookDelivered]


async def test_two_replicas_deliver_each_event_once(bus: Bus, nats_server: EmbeddedNats) -> None:
    async with (
        receiving() as receiver,
        connect(nats_server.url, name="replica-2") as other,
        hooks_running(bus) as one,
        hooks_running(other) as two,
    ):
        sub = await subscribe(bus, receiver)
        await wait_until(
            lambda: sub in one.book.view.live and sub in two.book.view.live, 10, "both books"
        )
        # When 30 events are recorded while both replicas run
        events = [await registered(bus, f"acct-{n}") for n in range(30)]
        await wait_until(lambda: len(receiver.deliveries) >= 30, 30, "30 deliveries")
        await wait_until(lambda: queue_drained(bus), 10, "the jobs settled")
        # Then each was delivered exactly once between them
        assert len(receiver.requests) == 30
        assert receiver.deliveries == {delivery_id(sub, e.id) for e in events}
        assert one.deliverer.delivered + two.deliverer.delivered == 30
        fanned = sum(f.fanout.jobs for h in (one, two) for f in h.fanouts.values())
        assert fanned == 30


# --- unsubscribing ------------------------------------------------------------------------


async def test_an_unsubscribed_webhook_gets_no_more_deliveries(bus: Bus) -> None:
    async with receiving() as kept, receiving() as gone, hooks_running(bus) as hooks:
        keep = await subscribe(bus, kept)
        drop = await subscribe(bus, gone)
        await registered(bus, "before")
        await wait_until(lambda: kept.requests and gone.requests, 20, "both delivered")
        # When one subscription is removed
        removed = await ops.rm(bus, drop, actor="test", reason="done")
        assert removed.id == drop
        await wait_until(lambda: drop not in hooks.book.view.live, 10, "the removal seen")
        # Then an event recorded afterwards reaches only the other
        await registered(bus, "after")
        await wait_until(lambda: len(kept.requests) == 2, 20, "the kept one's delivery")
        await wait_until(lambda: queue_drained(bus), 10, "the jobs settled")
        assert len(gone.requests) == 1
        assert [s.id for s in await ops.ls(bus)] == [keep]
        with pytest.raises(ops.WebhookError, match=f"no webhook {drop}"):
            await ops.rm(bus, drop)


async def test_queued_jobs_of_a_removed_webhook_are_dropped(bus: Bus) -> None:
    async with receiving() as receiver:
        # Given jobs made while no replica delivers (the fan-out alone)
        sub = await subscribe(bus, receiver)
        hooks = Hooks(bus, FAST)
        await hooks.book.catch_up()
        stop = asyncio.Event()
        from services.web.hooks import Fanout

        fanout = Fanout(bus, "ACCOUNTS", hooks.book)
        task = asyncio.create_task(fanout.loop.run(stop))
        await registered(bus)
        await wait_until(lambda: fanout.jobs == 1, 20, "the job made")
        stop.set()
        await task
        await hooks.sender.aclose()
        # When the subscription is removed, then delivery starts
        await ops.rm(bus, sub)
        async with hooks_running(bus):
            await wait_until(lambda: queue_drained(bus), 20, "the job settled")
        # Then nothing was sent
        assert receiver.requests == []


# --- private targets ----------------------------------------------------------------------


async def test_a_private_target_is_refused_at_add_with_one_line(bus: Bus) -> None:
    async with receiving() as receiver:
        with pytest.raises(ops.WebhookError) as refused:
            await ops.add(bus, receiver.url, ["AccountRegistered"], SECRET, settings=HookSettings())
        message = str(refused.value)
        assert "\n" not in message
        assert "127.0.0.1, a private or loopback address" in message
        assert "SVC_WEBHOOKS_ALLOW_PRIVATE=true" in message
        assert await ops.ls(bus) == []


async def test_a_target_that_resolves_private_at_delivery_is_refused_and_never_reached(
    bus: Bus,
) -> None:
    async with receiving() as receiver:
        port = receiver.url.split(":")[2].split("/")[0]
        url = f"http://hooks.example.test:{port}/hook"

        async def public(host: str, port: int) -> list[str]:
            return ["93.184.216.34"]  # what DNS said when it was added

        async def rebound(host: str, port: int) -> list[str]:
            return ["127.0.0.1"]  # and what it says now

        # Given a subscription added while its host resolved to a public address
        sub = await ops.add(
            bus, url, ["AccountRegistered"], SECRET, settings=HookSettings(), resolve=public
        )
        # When its host resolves to loopback at delivery time (private targets not allowed)
        async with hooks_running(bus, HookSettings(attempts=3), resolve=rebound):
            await registered(bus)
            await wait_until(lambda: _has(bus, WebhookDeadLettered), 20, "the refusal")
        # Then it is dead-lettered at once with the reason, and the receiver never called
        (letter,) = await ops.dead_letters(bus, sub.id)
        assert "resolves to 127.0.0.1, a private or loopback address" in letter.reason
        assert len(letter.errors) == 1
        assert receiver.requests == []


async def test_metadata_addresses_are_refused_even_with_private_targets_allowed(bus: Bus) -> None:
    async def metadata(host: str, port: int) -> list[str]:
        return ["169.254.169.254"]

    with pytest.raises(ops.WebhookError, match="a cloud metadata address"):
        await ops.add(
            bus, "http://meta.test/", ["AccountRegistered"], SECRET, settings=FAST, resolve=metadata
        )


# --- bad input ------------------------------------------------------------------------------


async def test_unknown_event_names_are_refused_with_the_valid_ones(bus: Bus) -> None:
    with pytest.raises(ops.WebhookError) as refused:
        await ops.add(bus, "http://127.0.0.1:9/", ["MessageRecieved"], SECRET, settings=FAST)
    message = str(refused.value)
    assert "\n" not in message
    assert "'MessageRecieved'" in message
    for valid in ("MessageReceived", "TurnCompleted", "DeliveryDeadLettered", "LeaseLost"):
        assert valid in message
    assert SECRET not in message
    assert await ops.ls(bus) == []


@pytest.mark.parametrize(
    ("url", "why"),
    [("ftp://x.test/", "http(s)"), ("http:///nohost", "http(s)"), ("http://[::1/", "valid URL")],
)
async def test_bad_urls_and_short_secrets_are_refused(bus: Bus, url: str, why: str) -> None:
    with pytest.raises(ops.WebhookError, match=why.replace("(", r"\(").replace(")", r"\)")):
        await ops.add(bus, url, ["LeaseAcquired"], SECRET, settings=FAST)
    with pytest.raises(ops.WebhookError, match="16 to 512 characters"):
        await ops.add(bus, "http://127.0.0.1:9/", ["LeaseAcquired"], "short", settings=FAST)


# --- svc webhooks test, secrets -------------------------------------------------------------


async def test_a_test_delivery_reaches_the_receiver_whatever_the_events(bus: Bus) -> None:
    async with receiving() as receiver, hooks_running(bus):
        sub = await subscribe(bus, receiver, "LeaseLost")
        result = await ops.send_test(bus, sub, actor="tester", wait=20)
        assert result.outcome == "delivered", result
        assert result.status == 200
        (request,) = receiver.requests
        assert request.signed_with(SECRET)
        assert request.headers["x-switchboard-event"] == "WebhookTestRequested"
        assert request.json()["event"]["actor"] == "tester"


async def test_a_test_delivery_without_a_running_worker_says_so(bus: Bus) -> None:
    async with receiving() as receiver:
        sub = await subscribe(bus, receiver)
        result = await ops.send_test(bus, sub, wait=0.5)
        assert result.outcome == "pending"
        assert "is a role that runs webhooks (web or all) up?" in result.error
        # The job waits in the queue for a worker; one delivers it when it comes
        async with hooks_running(bus):
            await wait_until(lambda: receiver.requests, 20, "the queued test")


async def test_the_secret_is_in_no_log_listing_record_or_error(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with receiving(lambda n: 500 if n == 0 else 200) as receiver, hooks_running(bus):
        sub = await subscribe(bus, receiver, "AccountRegistered", "LeaseAcquired")
        await registered(bus)
        await bus.publish(
            subjects.accounts("whatsapp", "acct-1"),
            LeaseAcquired(account="acct-1", holder="h", token=1),
        )
        await wait_until(lambda: len(receiver.requests) >= 3, 20, "the deliveries")
        listing = await ops.ls(bus)
        result = await ops.send_test(bus, sub, wait=20)
    shown = repr(listing) + repr(result) + repr(await records(bus)) + caplog.text
    assert listing[0].secret == "set"
    assert SECRET not in shown
    # Not in the jobs either: they name the subscription, the worker looks the secret up
    jobs = await stream_raw(bus, "HOOK_JOBS")
    assert all(SECRET.encode() not in data for _, data, _ in jobs)
    from contracts.hooks import WebhookSubscribed

    assert SECRET not in repr(
        WebhookSubscribed(subscription=sub, url="u", events=[], secret=SECRET)
    )


async def test_a_userinfo_password_in_the_url_is_masked_in_the_listing(bus: Bus) -> None:
    async with receiving() as receiver:
        url = receiver.url.replace("http://", "http://me:hunter2@")
        added = await ops.add(bus, url, ["LeaseLost"], SECRET, settings=FAST)
        assert "hunter2" not in added.url
        assert "me:***@127.0.0.1" in (await ops.ls(bus))[0].url


# --- what is read -------------------------------------------------------------------------


async def consumer_exists(bus: Bus, stream: str) -> bool:
    try:
        await bus.js.consumer_info(stream, fanout_durable(stream))
    except Exception:
        return False
    return True


async def test_only_streams_a_subscription_wants_are_read(bus: Bus) -> None:
    async with receiving() as receiver, hooks_running(bus):
        # Given a subscription to an ACCOUNTS event only
        sub = await subscribe(bus, receiver, "LeaseLost")
        # Then only ACCOUNTS gets a fan-out consumer
        await wait_until(lambda: consumer_exists(bus, "ACCOUNTS"), 20, "the ACCOUNTS fan-out")
        for stream in ("INBOUND", "AGENT", "DELIVERY"):
            assert not await consumer_exists(bus, stream)
        # And when it is removed, nothing reads ACCOUNTS any more
        await ops.rm(bus, sub)
        await wait_until(lambda: _not(consumer_exists(bus, "ACCOUNTS")), 20, "the fan-out deleted")


async def _not(check: object) -> bool:
    return not await check  # type: ignore[misc]


async def test_a_leftover_fan_out_consumer_is_deleted_at_start(bus: Bus) -> None:
    from nats.js.api import ConsumerConfig

    # Given a fan-out consumer left behind (its last subscription removed while no
    # replica ran), piling up pending events
    name = fanout_durable("ACCOUNTS")
    await bus.js.add_consumer("ACCOUNTS", ConsumerConfig(name=name, durable_name=name))
    await registered(bus)
    # When a replica starts with no subscription wanting ACCOUNTS
    async with hooks_running(bus):
        # Then the consumer is deleted
        await wait_until(lambda: _not(consumer_exists(bus, "ACCOUNTS")), 20, "it deleted")


# --- HTTPS to the checked address ---------------------------------------------------------


def make_cert(tmp_path: Path, name: str) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """(server context with a cert for DNS:`name` signed by a test CA, client context
    trusting only that CA)."""
    if shutil.which("openssl") is None:
        pytest.skip("the TLS test makes its certificates with the openssl CLI: not found")

    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], check=True, capture_output=True)

    d = tmp_path / "certs"
    d.mkdir(exist_ok=True)
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", f"{d}/ca.key", "-out", f"{d}/ca.pem",
            "-days", "1", "-subj", "/CN=hooks test CA")  # fmt: skip
    openssl("req", *ec, "-keyout", f"{d}/srv.key", "-out", f"{d}/srv.csr", "-subj", f"/CN={name}")
    (d / "srv.ext").write_text(f"subjectAltName=DNS:{name}\n")
    openssl("x509", "-req", "-in", f"{d}/srv.csr", "-CA", f"{d}/ca.pem", "-CAkey",
            f"{d}/ca.key", "-CAcreateserial", "-days", "1", "-out", f"{d}/srv.pem",
            "-extfile", f"{d}/srv.ext")  # fmt: skip
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(f"{d}/srv.pem", f"{d}/srv.key")
    client = ssl.create_default_context(cafile=f"{d}/ca.pem")
    return server, client


@pytest.mark.parametrize(
    ("cert_for", "delivered"), [("hooks.example.test", True), ("other.test", False)]
)
async def test_https_goes_to_the_checked_address_and_verifies_the_host_name(
    bus: Bus, tmp_path: Path, cert_for: str, delivered: bool
) -> None:
    server_tls, client_tls = make_cert(tmp_path, cert_for)

    async def resolve(host: str, port: int) -> list[str]:
        assert host == "hooks.example.test"
        return ["127.0.0.1"]

    async with (
        receiving(tls=server_tls) as receiver,
        hooks_running(bus, FAST, resolve=resolve, verify=client_tls),
    ):
        port = receiver.url.split(":")[2].split("/")[0]
        url = f"https://hooks.example.test:{port}/hook"
        sub = await ops.add(bus, url, ["AccountRegistered"], SECRET, settings=FAST, resolve=resolve)
        await registered(bus)
        if delivered:
            # The connection went to the address checked; TLS and Host named the host
            await wait_until(lambda: _has(bus, WebhookDelivered), 20, "the HTTPS delivery")
            assert receiver.requests[0].headers["host"] == f"hooks.example.test:{port}"
            assert receiver.requests[0].signed_with(SECRET)
        else:
            # A certificate for another name is refused: the check is on the host name
            await wait_until(lambda: _has(bus, WebhookDeadLettered), 20, "the dead letter")
            (letter,) = await ops.dead_letters(bus, sub.id)
            assert "CERTIFICATE_VERIFY_FAILED" in letter.errors[0].error
            assert receiver.requests == []


# --- bad input ------------------------------------------------------------------------------


async def test_garbage_on_the_hook_subjects_is_set_aside_and_delivery_goes_on(bus: Bus) -> None:
    async with receiving() as receiver, hooks_running(bus):
        sub = await subscribe(bus, receiver)
        # When someone stores garbage as a subscription event and as a job
        await bus.js.publish("hooks.subscriptions.0123456789abcdef", b"{not json")
        await bus.js.publish(f"hooks.jobs.{sub}.bogus", b'{"type":"DeliverWebhook"}')

        # Then the job is dead-lettered like any undecodable message, with the reason
        async def letter() -> bool:
            found = await stream_raw(bus, "DEADLETTER")
            return any(b"HOOK_JOBS" in data for _, data, _ in found)

        await wait_until(letter, 20, "the bad job in DEADLETTER")
        # And a real event is still delivered
        await registered(bus)
        await wait_until(lambda: receiver.requests, 20, "the delivery")
        assert [s.id for s in await ops.ls(bus)] == [sub]
