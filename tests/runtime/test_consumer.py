"""The consumer loop: errors decide acks, poison is dead-lettered, stop drains."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import nats.errors
import nats.js.errors
import pytest
from nats.js.kv import KeyValue
from opentelemetry import trace

from contracts.codec import encode
from contracts.errors import InvalidSubjectError
from contracts.events import DeadLettered, MessageReceived
from contracts.streams import OUTBOUND
from services.runtime.bus import Bus
from services.runtime.consumer import (
    LETTER_PAYLOAD_LIMIT,
    ConsumerLoop,
    ConsumerSpec,
    Delivery,
    RetryPolicy,
)
from services.runtime.errors import AbandonError, PermanentError, TransientError
from services.runtime.telemetry import setup_tracing
from tests.conftest import read_stream, wait_until

SUBJECT = "outbound.whatsapp.acct.chat1"


def spec(**kw: object) -> ConsumerSpec:
    base: dict[str, object] = {
        "stream": OUTBOUND.name,
        "durable": "test",
        "filter_subject": "outbound.>",
        "retry": RetryPolicy(attempts=3, delays=(0.05,)),
        "fetch_timeout": 0.2,
    }
    base.update(kw)
    return ConsumerSpec(**base)  # type: ignore[arg-type]


def event(text: str) -> MessageReceived:
    return MessageReceived(
        account="acct", chat="c@s.whatsapp.net", sender="s", message_id=text, text=text
    )


@asynccontextmanager
async def running(
    bus: Bus, handler: Callable[[MessageReceived, Delivery], Awaitable[None]], **kw: object
) -> AsyncIterator[ConsumerLoop[MessageReceived]]:
    loop = ConsumerLoop(bus, spec(**kw), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        yield loop
    finally:
        stop.set()
        await task


async def pending(bus: Bus) -> int:
    info = await bus.js.consumer_info(OUTBOUND.name, "test")
    return int(info.num_pending + info.num_ack_pending)


async def test_a_handled_message_is_acked_and_leaves_the_work_queue(bus: Bus) -> None:
    seen: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        seen.append(body.text)

    async with running(bus, handler) as loop:
        for text in ("a", "b", "c"):
            await bus.publish(SUBJECT, event(text))
        await wait_until(lambda: loop.handled == 3, what="3 handled")
    assert seen == ["a", "b", "c"]
    assert (await bus.js.stream_info(OUTBOUND.name)).state.messages == 0


async def test_a_malformed_payload_is_dead_lettered_and_the_next_message_still_flows(
    bus: Bus,
) -> None:
    seen: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        seen.append(body.text)

    async with running(bus, handler) as loop:
        await bus.publish_bytes(SUBJECT, b"{not json", msg_id="poison-1")
        await bus.publish(SUBJECT, event("after"))
        await wait_until(lambda: loop.handled == 1 and loop.dead_lettered == 1, what="dlq + next")
    assert seen == ["after"]
    letters = await read_stream(bus, "DEADLETTER")
    assert len(letters) == 1
    subject, letter = letters[0]
    assert subject == f"deadletter.{SUBJECT}"
    assert isinstance(letter, DeadLettered)
    assert letter.payload == b"{not json"
    assert letter.source_subject == SUBJECT
    assert "malformed JSON" in letter.reason
    assert await pending(bus) == 0


async def test_a_transient_error_is_retried_then_succeeds(bus: Bus) -> None:
    attempts: list[int] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        attempts.append(d.num_delivered)
        if d.num_delivered < 2:
            raise TransientError("flaky", delay=0.05)

    async with running(bus, handler) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.handled == 1, what="success on retry")
    assert attempts == [1, 2]
    assert loop.dead_lettered == 0


async def test_after_the_last_attempt_the_message_is_dead_lettered_with_every_error(
    bus: Bus,
) -> None:
    async def handler(body: MessageReceived, d: Delivery) -> None:
        raise TransientError(f"down #{d.num_delivered}", delay=0.05)

    async with running(bus, handler, retry=RetryPolicy(attempts=3, delays=(0.05,))) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.dead_lettered == 1, what="dead letter")
    ((_, letter),) = await read_stream(bus, "DEADLETTER")
    assert isinstance(letter, DeadLettered)
    assert letter.reason.startswith("down #3 (gave up after 3 attempts)")
    # Nothing stays stuck in the work queue after max_deliver.
    assert (await bus.js.stream_info(OUTBOUND.name)).state.messages == 0


async def test_an_unexpected_exception_is_retried_not_fatal(bus: Bus) -> None:
    calls = 0

    async def handler(body: MessageReceived, d: Delivery) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("bug")

    async with running(bus, handler) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.handled == 1, what="handled after a bug")
    assert calls == 2


async def test_a_permanent_error_dead_letters_at_once_without_retry(bus: Bus) -> None:
    calls = 0

    async def handler(body: MessageReceived, d: Delivery) -> None:
        nonlocal calls
        calls += 1
        raise PermanentError("invalid recipient")

    async with running(bus, handler) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.dead_lettered == 1, what="dead letter")
    assert calls == 1


async def test_stop_lets_the_in_flight_message_finish_and_be_acked(bus: Bus) -> None:
    started, release = asyncio.Event(), asyncio.Event()
    finished: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        started.set()
        await release.wait()
        finished.append("done")

    loop = ConsumerLoop(bus, spec(), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    await bus.publish(SUBJECT, event("slow"))
    await asyncio.wait_for(started.wait(), 10)
    stop.set()  # SIGTERM arrives mid-message
    release.set()
    await asyncio.wait_for(task, 10)
    assert finished == ["done"]
    assert loop.handled == 1
    assert await pending(bus) == 0


async def test_the_handler_runs_in_a_span_continuing_the_publishers_trace(bus: Bus) -> None:
    setup_tracing("test")
    seen: list[tuple[str, int]] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        ctx = trace.get_current_span().get_span_context()
        seen.append((d.headers["traceparent"], ctx.trace_id))

    async with running(bus, handler) as loop:
        await bus.publish(SUBJECT, event("traced"))
        await wait_until(lambda: loop.handled == 1, what="handled")
    ((traceparent, trace_id),) = seen
    assert traceparent.split("-")[1] == format(trace_id, "032x")


async def test_ordered_by_subject_a_retry_waits_in_place_and_other_subjects_flow(bus: Bus) -> None:
    order: list[str] = []
    a1_failures = 2

    async def handler(body: MessageReceived, d: Delivery) -> None:
        nonlocal a1_failures
        text = body.text
        if text == "a1" and a1_failures:
            a1_failures -= 1
            raise TransientError("flaky", delay=0.2)
        order.append(text)

    retry = RetryPolicy(attempts=3, delays=(0.2,))
    async with running(bus, handler, ordered_by_subject=True, retry=retry) as loop:
        await bus.publish("outbound.whatsapp.acct.A", event("a1"))
        await bus.publish("outbound.whatsapp.acct.A", event("a2"))
        await bus.publish("outbound.whatsapp.acct.B", event("b1"))
        await wait_until(lambda: loop.handled == 3, what="3 handled")
    # b1 was not held up by a1's retries; a2 did not overtake a1
    assert order.index("b1") < order.index("a1") < order.index("a2")


async def test_ordered_by_subject_keeps_waiting_messages_alive_past_the_ack_deadline(
    bus: Bus,
) -> None:
    calls: list[str] = []
    slow_done = asyncio.Event()

    async def handler(body: MessageReceived, d: Delivery) -> None:
        text = body.text
        calls.append(text)
        if text == "slow":
            await asyncio.sleep(2.5)  # the work itself: longer than ack_wait
            slow_done.set()

    async with running(bus, handler, ordered_by_subject=True, ack_wait=1.0) as loop:
        await bus.publish("outbound.whatsapp.acct.A", event("slow"))
        await bus.publish("outbound.whatsapp.acct.A", event("behind"))
        await wait_until(lambda: loop.handled == 2, what="both handled")
    # Neither was redelivered while it waited
    assert calls == ["slow", "behind"]


async def test_ordered_by_subject_dead_letters_after_the_last_attempt_with_every_error(
    bus: Bus,
) -> None:
    async def handler(body: MessageReceived, d: Delivery) -> None:
        raise TransientError(f"down #{d.attempt}", delay=0.01)

    retry = RetryPolicy(attempts=3, delays=(0.05,))
    async with running(bus, handler, ordered_by_subject=True, retry=retry) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.dead_lettered == 1, what="dead letter")
    ((_, letter),) = await read_stream(bus, "DEADLETTER")
    assert isinstance(letter, DeadLettered)
    assert [e.error for e in letter.errors] == ["down #1", "down #2", "down #3"]


@pytest.mark.parametrize("ordered", [False, True], ids=["sequential", "ordered"])
async def test_a_nats_outage_longer_than_the_attempts_dead_letters_nothing(
    bus: Bus, ordered: bool
) -> None:
    # Given a handler whose writes find no stream for more tries than the policy's
    # attempts (a leader election outlasting the ladder: 4-9 s per round in nats-server)
    outage: list[Exception] = [
        nats.js.errors.NoStreamResponseError(),
        nats.errors.NoRespondersError(),
        nats.js.errors.ServiceUnavailableError(code=503, description="no leader"),
        nats.errors.TimeoutError(),
        nats.js.errors.NoStreamResponseError(),
    ]
    calls: list[int] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        calls.append(d.attempt)
        if outage:
            raise outage.pop(0)
        if len(calls) == 6:  # then one failure of its own, which uses up an attempt
            raise TransientError("its own", delay=0.01)

    # (waits of 0.05 s; the server's ack deadline never passes: the loop keeps it alive)
    retry = RetryPolicy(attempts=2, delays=(0.05,))
    async with running(bus, handler, ordered_by_subject=ordered, retry=retry) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.handled + loop.dead_lettered == 1, what="an end")
    # Then it is handled once NATS answers: the outage used up none of its 2 attempts
    assert (loop.handled, loop.dead_lettered) == (1, 0)
    assert len(calls) == 7
    assert await read_stream(bus, "DEADLETTER") == []


@pytest.mark.parametrize("ordered", [False, True], ids=["sequential", "ordered"])
async def test_a_nats_error_of_the_message_itself_still_dead_letters_after_the_attempts(
    bus: Bus, ordered: bool
) -> None:
    async def handler(body: MessageReceived, d: Delivery) -> None:
        raise nats.js.errors.KeyWrongLastSequenceError(code=400, description="wrong last seq")

    retry = RetryPolicy(attempts=2, delays=(0.05,))
    async with running(bus, handler, ordered_by_subject=ordered, retry=retry) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.dead_lettered == 1, what="dead letter")
    assert loop.handled == 0


# --- bad input never stops a consumer (issue 11 items 1, 7, 8, 12, 18) ---------------------


async def test_a_dead_letter_hook_that_raises_still_ends_the_message_and_its_chat_flows(
    bus: Bus,
) -> None:
    # Given a hook that cannot record the job (a job whose chat forms no subject)
    async def hook(d: Delivery, reason: str) -> None:
        raise InvalidSubjectError("chat JID is empty: pass e.g. 123@s.whatsapp.net")

    seen: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        text = body.text
        if text == "poison":
            raise PermanentError("cannot send")
        seen.append(text)

    loop = ConsumerLoop(
        bus, spec(ordered_by_subject=True), MessageReceived, handler, on_dead_letter=hook
    )
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        await bus.publish(SUBJECT, event("poison"))
        await bus.publish(SUBJECT, event("behind"))
        # Then the poison job is dead-lettered and the job behind it (same chat) handled
        await wait_until(lambda: seen == ["behind"], what="the job behind the poison one")
    finally:
        stop.set()
        await task
    ((_, letter),) = await read_stream(bus, "DEADLETTER")
    assert isinstance(letter, DeadLettered)
    assert letter.hook_error.startswith("InvalidSubjectError: chat JID is empty")
    assert await pending(bus) == 0  # nothing held, nothing left in the work queue


async def test_a_payload_over_the_letter_limit_is_kept_cut_with_its_size_and_digest(
    bus: Bus,
) -> None:
    garbage = bytes(range(256)) * 2000  # 512,000 bytes, not JSON

    async def handler(body: MessageReceived, d: Delivery) -> None:
        pass  # never called: the loop decodes at the edge

    async with running(bus, handler) as loop:
        await bus.publish_bytes(SUBJECT, garbage, msg_id="garbage-1")
        await wait_until(lambda: loop.dead_lettered == 1, what="dead letter")
    ((_, letter),) = await read_stream(bus, "DEADLETTER")
    assert isinstance(letter, DeadLettered)
    assert letter.payload == garbage[:LETTER_PAYLOAD_LIMIT]
    assert letter.payload_truncated is True
    assert letter.payload_size == len(garbage)
    assert letter.payload_sha256 == hashlib.sha256(garbage).hexdigest()
    # The letter is stored at about the limit, not 1.33 x the input (base64 of 64 KiB)
    info = await bus.js.stream_info("DEADLETTER")
    assert info.state.bytes < 2 * LETTER_PAYLOAD_LIMIT


async def test_a_subject_too_long_to_carry_is_dead_lettered_under_invalid_and_the_loop_lives(
    bus: Bus,
) -> None:
    # Given a message whose subject is so long that `deadletter.<subject>` would pass the
    # server's 4,096-byte control line (which closes the publisher's connection)
    long_subject = "outbound.whatsapp.acct." + "x" * (4030 - len("outbound.whatsapp.acct."))
    seen: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        if d.subject == long_subject:
            raise InvalidSubjectError("chat token is not an encoded chat JID")
        seen.append(body.text)

    async with running(bus, handler) as loop:
        # no reply inbox: fits the control line
        await bus.nc.publish(long_subject, encode(event("long")))
        await bus.publish(SUBJECT, event("after"))
        await wait_until(lambda: seen == ["after"], what="the message after it")
        await wait_until(lambda: loop.dead_lettered == 1, what="dead letter")
    assert bus.nc.is_connected
    ((subject, letter),) = await read_stream(bus, "DEADLETTER")
    assert subject == "deadletter._invalid.OUTBOUND"
    assert isinstance(letter, DeadLettered)
    assert letter.source_subject.startswith("outbound.whatsapp.acct.xxx")
    assert len(letter.source_subject) < 300
    assert letter.source_subject_sha256 == hashlib.sha256(long_subject.encode()).hexdigest()


async def test_an_expected_nats_error_logs_one_line_with_the_delay_and_no_traceback(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    calls = 0

    async def handler(body: MessageReceived, d: Delivery) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # as during a stream leader election
            raise nats.js.errors.ServiceUnavailableError(code=503, description="no leader")

    caplog.set_level(logging.INFO, logger="services.runtime.consumer")
    async with running(bus, handler, ordered_by_subject=True) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.handled == 1, what="handled after the retry")
    records = [r for r in caplog.records if r.name == "services.runtime.consumer"]
    assert not [r for r in records if r.exc_info], "a traceback for an expected error"
    (retry,) = [r for r in records if r.getMessage() == "retrying"]
    assert retry.delay_s == 0.05  # type: ignore[attr-defined]
    assert "ServiceUnavailableError" in retry.error  # type: ignore[attr-defined]


async def test_ordered_mode_hand_backs_do_not_count_as_attempts_that_never_ended(
    bus: Bus,
) -> None:
    # Given a message handed back more often than the limit of unfinished attempts
    # (a core replica waiting for an earlier message of the chat does this)
    deliveries: list[int] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        deliveries.append(d.num_delivered)
        if len(deliveries) <= 5:
            raise AbandonError("not my turn yet")

    async with running(bus, handler, ordered_by_subject=True, max_unsettled=2) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.handled == 1, what="handled", timeout=20)
    # Then it is handled, not dead-lettered: only attempts that stopped the process count
    # (through real processes: test_a_message_that_kills_the_core_each_time_...)
    assert deliveries == [1, 2, 3, 4, 5, 6]
    assert loop.dead_lettered == 0
    kv = await bus.js.key_value("attempts")

    async def marks_cleared() -> bool:  # the mark is cleared just after the ack
        return [k async for k in _keys(kv)] == []

    await wait_until(marks_cleared, what="every attempt mark cleared")


async def test_a_handed_back_message_is_unmarked_before_its_redelivery_can_count_the_mark(
    bus: Bus,
) -> None:
    # Given a loop whose attempt marks are cleared slowly (a loaded KV), and a message
    # handed back several times: its redelivery comes at once after the nak
    class SlowUnmark(ConsumerLoop[MessageReceived]):
        async def unmark(self, d: Delivery) -> None:
            await asyncio.sleep(0.2)
            await super().unmark(d)

    deliveries: list[int] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        deliveries.append(d.num_delivered)
        if len(deliveries) <= 4:
            raise AbandonError("not my turn yet")

    loop = SlowUnmark(bus, spec(ordered_by_subject=True, max_unsettled=2), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.handled + loop.dead_lettered == 1, what="settled")
    finally:
        stop.set()
        await task
    # Then it is handled: no hand-back's mark was still there when its redelivery looked
    assert (loop.handled, loop.dead_lettered) == (1, 0)
    assert deliveries == [1, 2, 3, 4, 5]


async def _keys(kv: KeyValue) -> AsyncIterator[str]:
    with contextlib.suppress(nats.js.errors.NoKeysError):
        for key in await kv.keys():
            yield key


async def test_an_exception_escaping_an_ordered_worker_hands_its_message_back(bus: Bus) -> None:
    # Given a loop whose own machinery fails once outside the handler (a bug)
    class Buggy(ConsumerLoop[MessageReceived]):
        failures = 1

        async def attempt(self, d: Delivery) -> Any:
            if self.failures:
                self.failures -= 1
                raise RuntimeError("bug in the loop")
            return await super().attempt(d)

    seen: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        seen.append(body.text)

    loop = Buggy(bus, spec(ordered_by_subject=True), MessageReceived, handler)
    stop = asyncio.Event()
    task = asyncio.create_task(loop.run(stop))
    try:
        await bus.publish(SUBJECT, event("first"))
        # Then the message is not left held (kept alive by the heartbeat) forever: it is
        # tried again in place and handled, and its subject keeps flowing in order
        await wait_until(lambda: seen == ["first"], what="the message handled")
        await bus.publish(SUBJECT, event("second"))
        await wait_until(lambda: seen == ["first", "second"], what="both handled")
    finally:
        stop.set()
        await task
    assert await pending(bus) == 0


# --- typed loop and one retry policy (issue 12 item 4) --------------------------------------


async def test_a_handler_receives_the_typed_struct_decoded_once_across_in_place_retries(
    bus: Bus,
) -> None:
    bodies: list[MessageReceived] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        bodies.append(body)
        if len(bodies) < 3:
            raise TransientError("flaky")

    sent = event("typed")
    async with running(bus, handler, ordered_by_subject=True) as loop:
        await bus.publish(SUBJECT, sent)
        await wait_until(lambda: loop.handled == 1, what="handled on the third attempt")
    # Then the handler got the contract type, equal to what was published, and its retries
    # reused the one decoded object (decoded once per delivery, at the edge)
    assert [type(b) for b in bodies] == [MessageReceived] * 3
    assert bodies[0] == sent
    assert bodies[1] is bodies[0]
    assert bodies[2] is bodies[0]


@pytest.mark.parametrize("ordered", [False, True], ids=["sequential", "ordered"])
async def test_a_payload_off_the_contract_is_dead_lettered_with_one_line_and_never_handled(
    bus: Bus, ordered: bool
) -> None:
    seen: list[str] = []

    async def handler(body: MessageReceived, d: Delivery) -> None:
        seen.append(body.text)

    async with running(bus, handler, ordered_by_subject=ordered) as loop:
        # Valid JSON with the right tag, but a field of the wrong type
        await bus.publish_bytes(SUBJECT, b'{"type": "MessageReceived", "text": 5}', msg_id="bad")
        await bus.publish(SUBJECT, event("after"))
        await wait_until(lambda: loop.handled == 1 and loop.dead_lettered == 1, what="dlq + next")
    assert seen == ["after"]
    ((_, letter),) = await read_stream(bus, "DEADLETTER")
    assert isinstance(letter, DeadLettered)
    assert letter.reason.startswith("DecodeError: invalid MessageReceived: Expected `str`")
    assert "\n" not in letter.reason
    assert [e.attempt for e in letter.errors] == [1]  # not retried: retrying cannot help
    assert await pending(bus) == 0


async def test_a_requested_retry_wait_is_honoured_within_the_policys_cap(
    bus: Bus, caplog: pytest.LogCaptureFixture
) -> None:
    requests = [0.1, 5.0]  # what the handler's failures ask for (e.g. Retry-After)

    async def handler(body: MessageReceived, d: Delivery) -> None:
        if requests:
            raise TransientError("busy", delay=requests.pop(0))

    caplog.set_level(logging.INFO, logger="services.runtime.consumer")
    retry = RetryPolicy(attempts=3, delays=(0.05,), max_delay=0.2)
    async with running(bus, handler, ordered_by_subject=True, retry=retry) as loop:
        await bus.publish(SUBJECT, event("x"))
        await wait_until(lambda: loop.handled == 1, what="handled on the third attempt")
    waits = [r.delay_s for r in caplog.records if r.getMessage() == "retrying"]  # type: ignore[attr-defined]
    assert waits == [0.1, 0.2]  # the request over the step; the cap over the request


async def test_a_letter_names_no_job_unless_its_spec_says_how(bus: Bus) -> None:
    # Given a message on OUTBOUND whose Nats-Msg-Id is a valid job id, and a loop whose spec
    # names no job: the generic loop knows nothing about OUTBOUND
    async def handler(body: MessageReceived, d: Delivery) -> None:
        raise PermanentError("cannot")

    job_id = "0123456789abcdef0123456789abcdef"
    async with running(bus, handler) as loop:
        await bus.publish(SUBJECT, event("x"), msg_id=job_id)
        await wait_until(lambda: loop.dead_lettered == 1, what="dead letter")
    async with running(bus, handler, letter_job=lambda d: f"job-of-{d.msg_id[:4]}") as loop:
        await bus.publish(SUBJECT, event("y"), msg_id="abcd-2")
        await wait_until(lambda: loop.dead_lettered == 1, what="second dead letter")
    letters = [letter for _, letter in await read_stream(bus, "DEADLETTER")]
    assert [getattr(letter, "job_id", "?") for letter in letters] == [None, "job-of-abcd"]
