"""NATS micro (ADR 0030): what a registered role answers on `$SRV.PING|INFO|STATS` -- the
requests `nats micro ls|info|stats` send, made here as raw requests (the `nats` CLI is
not installed) -- its live `status` endpoint, discovery, and `svc status`'s workers."""

from __future__ import annotations

import json
from typing import Any

from nats.micro.service import Service, ServiceConfig

from services.ops.simclient import SimUser
from services.ops.status import collect_status, collect_workers, render_status
from services.runtime.bus import Bus
from services.runtime.micro import (
    discover,
    micro_service,
    package_version,
    scatter,
    status_subject,
)
from tests.conftest import role, wait_until
from tests.e2e.conftest import holder_of


async def request(bus: Bus, subject: str) -> Any:
    msg = await bus.nc.request(subject, b"", timeout=5)
    return json.loads(msg.data)


async def pings(bus: Bus) -> list[dict[str, Any]]:
    """What `nats micro ls` gathers: every answer to one `$SRV.PING`."""
    return [json.loads(d) for d in await scatter(bus.nc, "$SRV.PING", first=0.5)]


async def test_a_role_answers_ping_info_and_stats_as_the_nats_cli_asks(bus: Bus) -> None:
    live = {"core": {"handled": 0}}
    async with micro_service(bus, "core", metadata={"holder": "h-1"}, status=lambda: live) as svc:
        # nats micro ls: $SRV.PING, every service answers
        (ping,) = [p for p in await pings(bus) if p["name"] == "switchboard-core"]
        assert ping["type"] == "io.nats.micro.v1.ping_response"
        assert ping["id"] == svc.id
        assert ping["version"] == package_version() == "0.1.0"
        meta = ping["metadata"]
        assert meta["role"] == "core"
        assert meta["holder"] == "h-1"
        assert meta["pid"].isdigit()
        assert meta["host"]
        # nats micro info switchboard-core: $SRV.INFO.<name>
        info = await request(bus, "$SRV.INFO.switchboard-core")
        assert info["type"] == "io.nats.micro.v1.info_response"
        (endpoint,) = info["endpoints"]
        assert endpoint["name"] == "status"
        assert endpoint["subject"] == status_subject("switchboard-core", svc.id)
        # the status endpoint answers the live state, read at each request
        first = await request(bus, endpoint["subject"])
        live["core"] = {"handled": 7}
        second = await request(bus, endpoint["subject"])
        assert first["core"] == {"handled": 0}
        assert second["core"] == {"handled": 7}
        assert second["role"] == "core"
        assert second["id"] == svc.id
        assert second["holder"] == "h-1"
        # nats micro stats switchboard-core: $SRV.STATS.<name>.<id> counts them
        stats = await request(bus, f"$SRV.STATS.switchboard-core.{svc.id}")
        assert stats["type"] == "io.nats.micro.v1.stats_response"
        (counts,) = stats["endpoints"]
        assert (counts["num_requests"], counts["num_errors"]) == (2, 0)


async def test_a_failing_status_is_counted_as_an_error_and_its_cause_stays_in_the_log(
    bus: Bus,
) -> None:
    def broken() -> dict[str, Any]:
        raise RuntimeError("password=hunter2 in a message")

    async with micro_service(bus, "whatsapp", status=broken) as svc:
        msg = await bus.nc.request(status_subject("switchboard-whatsapp", svc.id), b"", timeout=5)
        assert msg.headers is not None
        assert msg.headers["Nats-Service-Error-Code"] == "500"
        assert "hunter2" not in msg.headers["Nats-Service-Error"]
        assert "see the worker's log" in msg.headers["Nats-Service-Error"]
        stats = await request(bus, f"$SRV.STATS.switchboard-whatsapp.{svc.id}")
        (counts,) = stats["endpoints"]
        assert (counts["num_requests"], counts["num_errors"]) == (1, 1)
        assert "hunter2" not in json.dumps(stats)
        # and the service still answers
        assert [p["id"] for p in await pings(bus)] == [svc.id]


async def test_a_stopped_role_no_longer_answers(bus: Bus) -> None:
    async with micro_service(bus, "core") as svc:
        assert [p["id"] for p in await pings(bus)] == [svc.id]
    assert await pings(bus) == []
    assert bus.nc.is_connected


async def test_discovery_finds_every_switchboard_instance_and_ignores_other_services(
    bus: Bus,
) -> None:
    other = Service(bus.nc, ServiceConfig(name="billing", version="1.0.0"))
    await other.start()
    try:
        async with (
            micro_service(bus, "core") as a,
            micro_service(bus, "core") as b,
            micro_service(bus, "whatsapp-ingress") as c,
        ):
            found = await discover(bus.nc, first=0.5)
            assert sorted((f.name, f.id) for f in found) == sorted(
                [
                    ("switchboard-core", a.id),
                    ("switchboard-core", b.id),
                    ("switchboard-whatsapp-ingress", c.id),
                ]
            )
    finally:
        await other.stop()


async def test_status_lists_the_owner_and_the_standby_of_an_account_and_each_core_replica(
    bus: Bus,
) -> None:
    async with (
        role(bus, "whatsapp"),
        role(bus, "whatsapp"),
        role(bus, "core"),
        role(bus, "core"),
    ):
        await wait_until(lambda: holder_of(bus, "default"), what="an owner of account default")
        holder = await holder_of(bus, "default")
        workers: list[dict[str, Any]] = []

        async def four_workers() -> bool:
            workers[:] = await collect_workers(bus, first=0.5)
            return len(workers) == 4

        await wait_until(four_workers, what="four workers answering $SRV.INFO")
        channel = sorted(
            (w for w in workers if w["role"] == "whatsapp"), key=lambda w: not w["owned"]
        )
        cores = [w for w in workers if w["role"] == "core"]
        assert [w["owned"] for w in channel] == [["default"], []]
        assert [w["standby"] for w in channel] == [[], ["default"]]
        assert channel[0]["holder"] == holder
        assert channel[1]["holder"] not in ("", holder)
        assert len({w["id"] for w in cores}) == 2
        assert all(w["core"]["consumer"] == "core" and w["answered"] for w in cores)
        text = render_status(await collect_status(bus, first=0.5))
        assert "owns default" in text
        assert "owns none; standby for default" in text
        assert text.count("consumer INBOUND/core") == 2
        # the status is live: a message answered shows as handled by one core replica
        async with SimUser(bus, "default") as user:
            await user.send("alice@s.whatsapp.net", "counted?")
            assert await user.wait_replies(20)

        async def one_handled() -> bool:
            cores = [w for w in await collect_workers(bus, first=0.5) if w["role"] == "core"]
            return sorted(w["core"]["handled"] for w in cores) == [0, 1]

        await wait_until(one_handled, what="one core replica counting the message handled")
