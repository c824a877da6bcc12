"""`svc audit` against a live system: it reads while traffic flows, disturbs nothing (no
durable consumer added or moved, every reply still arrives once), and finds what a
kill -9 mid-traffic left behind consistent."""

from __future__ import annotations

import json
import os
import signal

import pytest

from services.ops.simclient import SimUser, first_reply_job_id
from services.runtime.bus import Bus
from tests.conftest import Processes, arun_svc, wait_until
from tests.e2e.conftest import SimNetwork, holder_of, pid_of

pytestmark = pytest.mark.slow

STREAMS = ("INBOUND", "AGENT", "OUTBOUND", "DELIVERY", "ACCOUNTS", "SIM", "SIM_OUT")


async def consumers(bus: Bus) -> dict[str, set[str]]:
    """Durable consumers per stream (the audit must add or move none)."""
    out = {}
    for stream in STREAMS:
        infos = await bus.js.consumers_info(stream)
        out[stream] = {c.name for c in infos if c.config.durable_name}
    return out


async def test_auditing_a_live_system_disturbs_nothing(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    # 20 messages a chat within a second: over the default chat rate, which would hold
    # them (ADR 0015); this test is about the audit on a busy system, so no rate.
    processes.start("run", "all", NATS_URL=url, SVC_CHAT_RATE="off")
    await wait_until(lambda: holder_of(bus, "default"), what="an owner")
    async with SimUser(bus, "default") as user:
        await user.send("warmup@s.whatsapp.net", "hi")
        assert await user.wait_replies(20)
        before = await consumers(bus)
        env = processes.env(NATS_URL=url)
        # While 100 messages flow, audit twice
        for i in range(50):
            await user.send(f"u{i % 5}@s.whatsapp.net", f"message {i}")
        # The whatsapp role relays them into INBOUND as it goes; audit once all 51 are in
        await wait_until(lambda: _stored(bus, "INBOUND", 51), what="51 messages in INBOUND")
        during = await arun_svc("audit", "--json", env=env)
        for i in range(50, 100):
            await user.send(f"u{i % 5}@s.whatsapp.net", f"message {i}")
        during_too = await arun_svc("audit", env=env)
        assert await user.wait_replies(30)
    # Then the audits passed, saw traffic, and left the system's consumers as they were
    assert during.returncode == 0, during.stdout.decode() + during.stderr.decode()
    assert during_too.returncode == 0, during_too.stdout.decode()
    assert json.loads(during.stdout)["events"]["INBOUND"] >= 51
    assert await consumers(bus) == before
    for stream in STREAMS:  # the audit's ephemeral readers are gone
        infos = await bus.js.consumers_info(stream)
        assert [c.name for c in infos if not c.config.durable_name] == []
    # every message answered exactly once, and the final audit (fixture) is clean too
    replies = [e.reply for e in user.exchanges.values()]
    assert all(r is not None for r in replies)
    assert len(user.others) == 0


async def _stored(bus: Bus, stream: str, count: int) -> bool:
    return (await bus.js.stream_info(stream)).state.messages >= count


async def test_after_a_kill_9_of_the_owner_mid_traffic_the_audit_finds_no_violation(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    for _ in range(2):
        processes.start("run", "whatsapp", NATS_URL=url, WHATSAPP_LEASE_TTL="3")
    processes.start("run", "core", NATS_URL=url)
    await wait_until(lambda: holder_of(bus, "default"), what="an owner")
    async with SimNetwork(bus, "default") as net, SimUser(bus, "default") as user:
        asked = []
        for i in range(60):
            asked.append(await user.send(f"k{i % 6}@s.whatsapp.net", f"before and after {i}"))
            if i == 20:
                owner = await holder_of(bus, "default")
                assert owner is not None
                # Mid traffic: the owner has sent, so its grant is on record. Killed
                # between taking the lease and recording it, it would have sent nothing
                # and left no LeaseAcquired (allowed, and no takeover to see here).
                await net.wait(
                    lambda held=owner: any(s.holder == held for s in net.seen), 30, "a first send"
                )
                os.kill(pid_of(owner), signal.SIGKILL)
        await net.wait(lambda: len(net.job_ids()) >= 60, 60, "60 replies")
    assert len({s.holder for s in net.seen}) == 2  # sends before and after the kill
    env = processes.env(NATS_URL=url)
    result = await arun_svc("audit", "--json", "--grace", "0", env=env)
    report = json.loads(result.stdout)
    assert result.returncode == 0, result.stdout.decode()
    # each sent job once, though both DELIVERY and SIM_OUT record it (item 18)
    assert report["rules"]["split-brain"]["checked"]["sends"] == 60
    timeline = report["summary"]["leases"]["default"]
    assert [e["event"] for e in timeline].count("acquired") >= 2  # the takeover is there

    # And a reply sent after the takeover explains end to end, from its inbound message to
    # the new owner's send and the lease grant behind its token
    last = asked[-1]
    job_id = first_reply_job_id("default", last.message_id)
    explained = await arun_svc("audit", "explain", job_id, "--json", env=env)
    assert explained.returncode == 0, explained.stderr.decode()
    chain = json.loads(explained.stdout)
    assert chain["outcome"] == "sent"
    assert chain["inbound"]["event"]["text"] == "before and after 59"
    assert job_id in chain["turn"]["event"]["reply_ids"]
    (sent,) = chain["sent"]
    grant = chain["lease"]["event"]
    assert (grant["holder"], grant["token"]) == (
        sent["event"]["holder"],
        sent["event"]["lease_token"],
    )
    assert grant["token"] == max(e["token"] for e in timeline if e["event"] == "acquired")
    human = await arun_svc("audit", "explain", job_id, env=env)
    assert [line.split()[0] for line in human.stdout.decode().splitlines()[1:]][:2] == [
        "inbound",
        "turn",
    ]
