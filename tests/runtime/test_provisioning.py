"""Provisioning is idempotent, reports (never applies) a conflicting config, and reports
tunables that differ (replicas, limits) -- applied by `svc streams ensure --update`."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from nats.js.api import DiscardPolicy, RetentionPolicy, StreamConfig

from contracts.streams import BUCKETS, LEASES, STREAMS, STREAMS_BY_NAME, StreamSpec
from services.runtime import provisioning
from services.runtime.bus import Bus, connect
from services.runtime.errors import ProvisioningError
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams, raise_on_conflict
from tests.conftest import Processes, free_ports, run_svc, wait_until


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


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[list[EmbeddedNats]]:
    """Three JetStream nodes on loopback routed into one cluster."""
    ports = free_ports(3)
    routes = ",".join(f"nats://127.0.0.1:{p}" for p in ports)
    async with contextlib.AsyncExitStack() as stack:
        nodes = [
            await stack.enter_async_context(
                EmbeddedNats(
                    tmp_path / f"n{i}",
                    name=f"n{i}",
                    extra_args=(
                        "--cluster_name",
                        "switchboard",
                        "--cluster",
                        f"nats://127.0.0.1:{port}",
                        "--routes",
                        routes,
                    ),
                )
            )
            for i, port in enumerate(ports)
        ]
        yield nodes


async def _jetstream_ready(b: Bus) -> bool:
    try:
        await b.js.account_info()
    except Exception:  # no meta leader elected yet
        return False
    return True


async def test_replicas_that_differ_are_reported_and_applied_by_ensure_update(
    cluster: list[EmbeddedNats], processes: Processes
) -> None:
    url = cluster[0].url
    async with connect(url, name="t") as b:
        await wait_until(lambda: _jetstream_ready(b), timeout=20, what="a JetStream meta leader")
        # Given every stream and bucket created R1 (no SVC_STREAM_REPLICAS at first start)
        created = await ensure_streams(b.js)
        assert {r.action for r in created} == {"created"}
        names = [s.name for s in STREAMS] + [f"KV_{k.name}" for k in BUCKETS]
        env = processes.env(NATS_URL=url, SVC_STREAM_REPLICAS="3")
        # When ensure runs with 3 replicas wanted, it reports the difference, changes nothing
        ensure = run_svc("streams", "ensure", env=env)
        assert ensure.returncode == 0, ensure.stderr.decode()
        lines = ensure.stdout.decode().splitlines()
        assert len(lines) == len(names)
        for line in lines:
            assert " differs  replicas 1 \u2192 wanted 3;" in line, line
            assert "run 'svc streams ensure --update'" in line
        assert {(await b.js.stream_info(n)).config.num_replicas for n in names} == {1}
        # And a role started meanwhile warns and keeps running
        core = processes.start("run", "core", **{"NATS_URL": url, "SVC_STREAM_REPLICAS": "3"})
        await wait_until(
            lambda: "stream INBOUND differs: replicas 1" in processes.log(core),
            timeout=30,
            what="the role's warning",
        )
        assert core.poll() is None
        processes.stop(core)
        # When --update runs, every stream and bucket becomes R3
        updated = run_svc("streams", "ensure", "--update", env=env)
        assert updated.returncode == 0, updated.stdout.decode() + updated.stderr.decode()
        assert all(
            " updated  replicas 1 \u2192 wanted 3" in x
            for x in updated.stdout.decode().splitlines()
        )
        for name in names:
            assert (await b.js.stream_info(name)).config.num_replicas == 3, name
            # The two followers join the stream's Raft group right after the update
            await wait_until(lambda n=name: _followers(b, n, 2), timeout=20, what=f"{name} R3")
        # And nothing differs any more
        again = run_svc("streams", "ensure", env=env)
        assert {x.split()[2] for x in again.stdout.decode().splitlines()} == {"unchanged"}


async def _followers(b: Bus, name: str, n: int) -> bool:
    cluster = (await b.js.stream_info(name)).cluster
    return cluster is not None and len(cluster.replicas or []) == n


class _Limited(StreamSpec, frozen=True, kw_only=True):
    """A spec with limits it did not have when its stream was first created."""

    max_bytes: int = 64 * 1024 * 1024
    max_msgs_per_subject: int = 1000
    discard: str = "new"


async def test_new_limits_in_a_spec_are_reported_and_applied_to_an_existing_stream(
    nats_server: EmbeddedNats, monkeypatch: pytest.MonkeyPatch
) -> None:
    old = STREAMS_BY_NAME["AGENT"]  # created without limits
    async with connect(nats_server.url, name="t") as b:
        await ensure_streams(b.js)
        # Given the spec of an existing stream gains limits (a new release)
        limited = _Limited(
            name=old.name,
            subjects=old.subjects,
            description=old.description,
            max_msg_size=old.max_msg_size,
            max_age_s=30 * 86_400.0,
        )
        specs = tuple(limited if s.name == old.name else s for s in STREAMS)
        monkeypatch.setattr(provisioning, "STREAMS", specs)
        # When provisioning runs, each new limit is reported as a difference
        report = next(r for r in await ensure_streams(b.js) if r.name == old.name)
        assert report.action == "differs"
        for change in (
            "max_bytes -1 \u2192 wanted 67108864",
            "max_msgs_per_subject -1 \u2192 wanted 1000",
            "discard old \u2192 wanted new",
            "max_age 0 \u2192 wanted 2592000",
        ):
            assert change in report.detail
        # And --update applies them all
        applied = next(r for r in await ensure_streams(b.js, update=True) if r.name == old.name)
        assert applied.action == "updated"
        config = (await b.js.stream_info(old.name)).config
        assert config.max_bytes == 64 * 1024 * 1024
        assert config.max_msgs_per_subject == 1000
        assert config.discard == DiscardPolicy.NEW
        assert config.max_age == 30 * 86_400
        after = next(r for r in await ensure_streams(b.js) if r.name == old.name)
        assert after.action == "unchanged"
