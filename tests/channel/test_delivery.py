"""Delivery against a real server: order, retries, dead letters, the ledger, rate limits.

The judge is the simulated network: what it accepted (SIM_OUT, in stored order) and what
it refused (reported on `sim.whatsapp.<acct>.failures`), next to our DELIVERY events.
"""

from __future__ import annotations

from collections import Counter

import msgspec
import pytest

from contracts import subjects
from contracts.codec import decode, encode
from contracts.events import (
    AttemptError,
    DeadLettered,
    DeliveryDeadLettered,
    DeliveryFailed,
    DeliveryReceipt,
    DeliveryUncertain,
    MessageSent,
    SendMessage,
)
from contracts.payloads import SendRecord, SimFailure
from services.channel.egress import egress_consumer_spec
from services.runtime.bus import Bus
from tests.conftest import Processes, arun_svc, read_stream, role, run_svc, stream_raw, wait_until
from tests.e2e.conftest import SimNetwork, assert_per_chat_order, assert_single_writer, enqueue, job

FAST_BACKOFF = ",".join(["0.01"] * 12)  # 13 attempts: 0.2**13 makes a dead letter unthinkable


async def delivery_events(bus: Bus, kind: type) -> list:  # type: ignore[type-arg]
    return [e for _, e in await read_stream(bus, "DELIVERY") if isinstance(e, kind)]


async def test_500_jobs_over_20_chats_with_20_percent_failures_all_arrive_in_order(
    bus: Bus,
) -> None:
    refused: list[SimFailure] = []

    async def on_failure(msg) -> None:  # type: ignore[no-untyped-def]
        refused.append(decode(msg.data, SimFailure))

    await bus.nc.subscribe(subjects.sim_failures("default"), cb=on_failure)
    env = {"SIM_FAILURE_RATE": "0.2", "SIM_SEED": "7", "DELIVERY_BACKOFF": FAST_BACKOFF}
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp", **env):
        jobs = await enqueue(bus, "default", count=500, chats=20)
        await net.wait(lambda: net.job_ids() >= {j.job_id for j in jobs}, 60, "every job")
    sends = await net.recorded()
    assert len(sends) == 500  # retried in place: nothing sent twice
    assert_per_chat_order(sends, jobs)
    assert_single_writer(sends)
    failed = await delivery_events(bus, DeliveryFailed)
    # One DeliveryFailed per refusal, for the same jobs, none permanent
    assert len(refused) > 50
    assert Counter(f.job_id for f in failed) == Counter(r.job_id for r in refused)
    assert not any(f.permanent for f in failed)
    assert len(await delivery_events(bus, MessageSent)) == 500


async def test_a_permanently_failing_chat_is_dead_lettered_at_once_and_others_flow(
    bus: Bus,
) -> None:
    env = {"SIM_FAILING_CHATS": "c0@s.whatsapp.net", "DELIVERY_BACKOFF": FAST_BACKOFF}
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp", **env):
        jobs = await enqueue(bus, "default", count=20, chats=4)
        others = {j.job_id for j in jobs if j.chat != "c0@s.whatsapp.net"}
        await net.wait(lambda: net.job_ids() >= others, 30, "other chats")
        await wait_until(lambda: _count(bus, DeliveryDeadLettered, 5), what="5 dead letters")
    failed = await delivery_events(bus, DeliveryFailed)
    assert len(failed) == 5  # one attempt each: no retries for a permanent error
    assert all(f.permanent and f.chat == "c0@s.whatsapp.net" for f in failed)


async def test_outcomes_record_the_jobs_queue_position_start_time_and_text(bus: Bus) -> None:
    # What the audit's order and fencing rules and the transcript rely on, once the work
    # queue has forgotten the job.
    env = {"SIM_FAILING_CHATS": "c0@s.whatsapp.net", "DELIVERY_BACKOFF": FAST_BACKOFF}
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp", **env):
        jobs = await enqueue(bus, "default", count=12, chats=3)  # OUTBOUND seqs 1..12
        others = {j.job_id for j in jobs if j.chat != "c0@s.whatsapp.net"}
        await net.wait(lambda: net.job_ids() >= others, 30, "other chats")
        await wait_until(lambda: _count(bus, DeliveryDeadLettered, 4), what="4 dead letters")
    seq_of = {j.job_id: n + 1 for n, j in enumerate(jobs)}
    text_of = {j.job_id: j.text for j in jobs}
    sent = await delivery_events(bus, MessageSent)
    assert sorted((s.job_id, s.job_seq) for s in sent) == sorted(
        (job_id, seq_of[job_id]) for job_id in others
    )
    assert all(s.text == text_of[s.job_id] for s in sent)
    assert all(s.sent_at is not None and s.sent_at <= s.at for s in sent)
    dead = await delivery_events(bus, DeliveryDeadLettered)
    assert sorted(d.job_seq for d in dead) == sorted(
        seq_of[j.job_id] for j in jobs if j.job_id not in others
    )


async def _count(bus: Bus, kind: type, n: int) -> bool:
    return len(await delivery_events(bus, kind)) >= n


async def test_exhausted_retries_dead_letter_with_every_error_and_requeue_delivers(
    bus: Bus, processes: Processes, nats_server: object
) -> None:
    env = {"SIM_FAILURE_RATE": "1", "DELIVERY_BACKOFF": "0.01,0.01"}
    original = job("default", "alice@s.whatsapp.net", 1)
    async with role(bus, "whatsapp", **env):
        await bus.publish(subjects.outbound("whatsapp", "default", original.chat), original)
        await wait_until(lambda: _count(bus, DeliveryDeadLettered, 1), what="dead letter")
    ((seq, letter),) = [(s, e) for s, e in await _letters(bus)]
    assert letter.job_id == original.job_id
    assert [e.attempt for e in letter.errors] == [1, 2, 3]
    assert all("injected transient failure" in e.error for e in letter.errors)
    url = nats_server.url  # type: ignore[attr-defined]
    listed = run_svc("dlq", "ls", "--json", env=processes.env(NATS_URL=url))
    assert [row["seq"] for row in msgspec.json.decode(listed.stdout)] == [seq]
    # When the cause is fixed and an operator requeues it
    queued: list[SendMessage] = []

    async def on_job(msg) -> None:  # type: ignore[no-untyped-def]
        queued.append(decode(msg.data, SendMessage))

    await bus.nc.subscribe("outbound.whatsapp.default.*", cb=on_job)
    await bus.nc.flush()
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp"):
        result = await arun_svc("dlq", "requeue", str(seq), env=processes.env(NATS_URL=url))
        assert result.returncode == 0, result.stderr
        await net.wait(lambda: len(net.seen) == 1, 20, "the requeued job sent")
    # Then it is delivered as a new job linked to the original
    (sent,) = net.seen
    (again_job,) = queued
    assert sent.text == original.text
    assert sent.job_id == again_job.job_id != original.job_id
    assert again_job.requeued_from == original.job_id
    after = run_svc("dlq", "ls", env=processes.env(NATS_URL=url))
    assert "no open dead letters" in after.stdout.decode()
    again = run_svc("dlq", "requeue", str(seq), env=processes.env(NATS_URL=url))
    assert again.returncode == 1
    assert "already requeued" in again.stderr.decode()


async def _letters(bus: Bus) -> list[tuple[int, DeadLettered]]:
    return [
        (seq, decode(data, DeadLettered))
        for seq, (subject, data, _) in enumerate(await stream_raw(bus, "DEADLETTER"), 1)
        if not subject.startswith("deadletter._ops")
    ]


async def seed_record(bus: Bus, record: SendRecord) -> None:
    """Leave a job's ledger record as an earlier owner would have."""
    kv = await bus.js.key_value("sends")
    await kv.put(subjects.send_key("default", record.job_id), encode(record))


async def handed_to_an_earlier_owner(bus: Bus) -> None:
    """An earlier owner's consumer took the queued jobs and died without acking them."""
    spec = egress_consumer_spec("whatsapp", "default")
    await bus.js.add_consumer(spec.stream, config=spec.config())
    sub = await bus.js.pull_subscribe_bind(durable=spec.durable, stream=spec.stream)
    assert await sub.fetch(10, timeout=2)
    await sub.unsubscribe()


async def test_a_job_left_past_its_last_attempt_by_a_dead_worker_ends_in_the_dead_letter(
    bus: Bus,
) -> None:
    # Given a worker died during the job's last allowed attempt (3 with this backoff)
    stuck = job("default", "bob@s.whatsapp.net", 1)
    earlier = [AttemptError(attempt=1, error="timeout"), AttemptError(attempt=2, error="timeout")]
    await seed_record(
        bus,
        SendRecord(
            job_id=stuck.job_id,
            state="sending",
            attempt=3,
            holder="dead-worker",
            lease_token=9,
            errors=earlier,
        ),
    )
    await bus.publish(subjects.outbound("whatsapp", "default", stuck.chat), stuck)
    await handed_to_an_earlier_owner(bus)
    # When a new owner takes the account
    async with role(bus, "whatsapp", DELIVERY_BACKOFF="0.01,0.01"):
        await wait_until(lambda: _count(bus, DeliveryDeadLettered, 1), what="dead letter")
    # Then the job is not stuck: dead-lettered with every attempt's error, outcome unknown
    ((_, letter),) = await _letters(bus)
    assert [e.attempt for e in letter.errors] == [1, 2, 3]
    assert "outcome unknown" in letter.errors[-1].error
    (uncertain,) = await delivery_events(bus, DeliveryUncertain)
    assert (uncertain.holder, uncertain.lease_token) == ("dead-worker", 9)
    assert (await bus.js.stream_info("OUTBOUND")).state.messages == 0


@pytest.mark.parametrize(("policy", "sends"), [("resend", 1), ("skip", 0)])
async def test_an_uncertain_send_is_recorded_and_resolved_by_policy(
    bus: Bus, policy: str, sends: int
) -> None:
    maybe = job("default", "carol@s.whatsapp.net", 1)
    await seed_record(
        bus,
        SendRecord(
            job_id=maybe.job_id, state="sending", attempt=1, holder="dead-worker", lease_token=3
        ),
    )
    await bus.publish(subjects.outbound("whatsapp", "default", maybe.chat), maybe)
    await handed_to_an_earlier_owner(bus)
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp", DELIVERY_UNCERTAIN=policy):
        await wait_until(lambda: _count(bus, DeliveryUncertain, 1), what="DeliveryUncertain")
        await wait_until(lambda: _queue_empty(bus), what="the job settled")
    (uncertain,) = await delivery_events(bus, DeliveryUncertain)
    assert uncertain.resolution == policy
    assert len(net.seen) == sends


async def _queue_empty(bus: Bus) -> bool:
    return (await bus.js.stream_info("OUTBOUND")).state.messages == 0


async def test_a_job_already_recorded_as_sent_is_acked_without_sending_again(bus: Bus) -> None:
    done = job("default", "dave@s.whatsapp.net", 1)
    await seed_record(
        bus,
        SendRecord(
            job_id=done.job_id,
            state="sent",
            attempt=1,
            holder="earlier",
            lease_token=2,
            transport_message_id="sim-1",
        ),
    )
    later = job("default", "dave@s.whatsapp.net", 2)
    for j in (done, later):
        await bus.publish(subjects.outbound("whatsapp", "default", j.chat), j)
    await handed_to_an_earlier_owner(bus)
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp"):
        await net.wait(lambda: later.job_id in net.job_ids(), 20, "the next job")
    assert [s.job_id for s in net.seen] == [later.job_id]


async def test_receipts_become_delivery_events_linked_to_their_job(bus: Bus) -> None:
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp", SIM_AUTO_RECEIPTS="true"):
        jobs = await enqueue(bus, "default", count=5, chats=2)
        await net.wait(lambda: net.job_ids() >= {j.job_id for j in jobs}, 20, "sends")
        await wait_until(lambda: _count(bus, DeliveryReceipt, 5), what="5 receipts")
    receipts = await delivery_events(bus, DeliveryReceipt)
    sent = {s.transport_message_id: s.job_id for s in await delivery_events(bus, MessageSent)}
    assert {(r.transport_message_id, r.job_id) for r in receipts} == set(sent.items())
    assert {r.status for r in receipts} == {"delivered"}


async def test_a_burst_to_one_account_is_spread_by_its_budget_in_order(bus: Bus) -> None:
    # 100 jobs, budget 100/s with bursts of 10: at least (100 - 10) / 100 s from first to last
    env = {"WHATSAPP_RATE_LIMIT": "6000:10"}
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp", **env):
        jobs = await enqueue(bus, "default", count=100, chats=3)
        await net.wait(lambda: net.job_ids() >= {j.job_id for j in jobs}, 30, "every job")
    times = [t for _, _, t in await _sim_out_times(bus)]
    assert (times[-1] - times[0]).total_seconds() >= 0.9 * (100 - 10) / 100
    # no second holds more than the burst plus one second's budget
    for i, start in enumerate(times):
        in_window = sum(1 for t in times[i:] if (t - start).total_seconds() < 1.0)
        assert in_window <= 10 + 100 + 1
    assert_per_chat_order(await net.recorded(), jobs)


async def _sim_out_times(bus: Bus) -> list:  # type: ignore[type-arg]
    from services.runtime.reader import read

    return [(s.seq, s.subject, s.time) async for s in read(bus, "SIM_OUT")]


def test_the_token_bucket_waits_exactly_for_the_next_token() -> None:
    from services.channel.ratelimit import TokenBucket
    from services.runtime.settings import RateLimit

    now = [0.0]
    bucket = TokenBucket(RateLimit(per_minute=60, burst=2), clock=lambda: now[0])
    assert bucket.wait_time() == 0
    bucket.tokens -= 2
    assert bucket.wait_time() == pytest.approx(1.0)
    now[0] = 0.5
    assert bucket.wait_time() == pytest.approx(0.5)
    now[0] = 10.0
    assert bucket.wait_time() == 0
    assert bucket.tokens == 2  # never more than the burst


async def test_dropping_a_dead_letter_records_who_and_why(
    bus: Bus, processes: Processes, nats_server: object
) -> None:
    env = {"SIM_FAILING_CHATS": "ghost@s.whatsapp.net"}
    async with role(bus, "whatsapp", **env):
        lost = job("default", "ghost@s.whatsapp.net", 1)
        await bus.publish(subjects.outbound("whatsapp", "default", lost.chat), lost)
        await wait_until(lambda: _count(bus, DeliveryDeadLettered, 1), what="dead letter")
    ((seq, _),) = await _letters(bus)
    cli = processes.env(NATS_URL=nats_server.url)  # type: ignore[attr-defined]
    no_reason = await arun_svc("dlq", "drop", str(seq), env=cli)
    assert no_reason.returncode == 2  # --reason is required
    dropped = await arun_svc("dlq", "drop", str(seq), "--reason", "not a real user", env=cli)
    assert dropped.returncode == 0, dropped.stderr
    shown = msgspec.json.decode((await arun_svc("dlq", "show", str(seq), env=cli)).stdout)
    assert shown["state"] == "dropped"
    assert shown["payload"]["job_id"] == lost.job_id
    (action,) = shown["actions"]
    assert action["type"] == "DeadLetterDropped"
    assert action["reason"] == "not a real user"
    assert action["actor"]
    everything = msgspec.json.decode(
        (await arun_svc("dlq", "ls", "--all", "--json", env=cli)).stdout
    )
    assert [(r["seq"], r["state"]) for r in everything] == [(seq, "dropped")]
    missing = await arun_svc("dlq", "show", "999", env=cli)
    assert missing.returncode == 1
    assert "no dead letter at sequence 999" in missing.stderr.decode()
