"""Provisioning is idempotent and reports (never applies) a conflicting config."""

from __future__ import annotations

import pytest
from nats.js.api import RetentionPolicy, StreamConfig

from contracts.streams import BUCKETS, LEASES, STREAMS
from services.runtime.bus import Bus, connect
from services.runtime.errors import ProvisioningError
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams, raise_on_conflict
from tests.conftest import Processes, run_svc


async def test_provisioning_twice_creates_once_and_changes_nothing(
    nats_server: EmbeddedNats,
) -> None:
    async with connect(nats_server.url, name="t") as b:
        first = await ensure_streams(b.js)
        configs = {s.name: (await b.js.stream_info(s.name)).config for s in STREAMS}
        second = await ensure_streams(b.js)
        again = {s.name: (await b.js.stream_info(s.name)).config for s in STREAMS}
    assert {r.action for r in first} == {"created"}
    assert {r.action for r in second} == {"unchanged"}
    assert len(first) == len(STREAMS) + len(BUCKETS)
    assert configs == again


async def test_the_lease_bucket_keeps_one_revision_with_per_key_ttl_and_no_markers(
    bus: Bus,
) -> None:
    config = (await bus.js.stream_info(f"KV_{LEASES.name}")).config
    assert config.max_msgs_per_subject == 1
    assert config.allow_msg_ttl is True
    assert not config.subject_delete_marker_ttl


async def test_a_conflicting_stream_is_reported_and_left_unchanged(
    nats_server: EmbeddedNats,
) -> None:
    async with connect(nats_server.url, name="t") as b:
        # Given an OUTBOUND stream someone created with limits retention
        await b.js.add_stream(
            StreamConfig(
                name="OUTBOUND", subjects=["outbound.*.*.*"], retention=RetentionPolicy.LIMITS
            )
        )
        # When provisioning runs
        results = await ensure_streams(b.js)
        # Then the conflict is reported, not applied
        conflict = next(r for r in results if r.name == "OUTBOUND")
        assert conflict.action == "conflict"
        assert "retention is limits, expected workqueue" in conflict.detail
        assert (await b.js.stream_info("OUTBOUND")).config.retention == RetentionPolicy.LIMITS
        with pytest.raises(ProvisioningError, match="stream OUTBOUND conflicts"):
            raise_on_conflict(results)


async def test_svc_streams_ensure_exits_1_on_conflict_and_a_role_refuses_to_start(
    nats_server: EmbeddedNats, processes: Processes
) -> None:
    async with connect(nats_server.url, name="t") as b:
        await b.js.add_stream(StreamConfig(name="AGENT", subjects=["agent.>"]))
    env = processes.env(NATS_URL=nats_server.url)
    ensure = run_svc("streams", "ensure", env=env)
    assert ensure.returncode == 1
    assert "AGENT" in ensure.stdout.decode()
    assert "conflict" in ensure.stdout.decode()
    role = run_svc("run", "core", env=env)
    assert role.returncode == 1
    assert "stream AGENT conflicts: subjects are ['agent.>']" in role.stderr.decode()
