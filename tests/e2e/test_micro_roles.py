"""Every role, as a real `svc run` process, answers NATS micro (ADR 0030): the requests
`nats micro ls|info|stats` send (`$SRV.PING`, `$SRV.INFO.<name>`, `$SRV.STATS.<name>`),
its live `status` endpoint, and nothing once it has stopped; `svc status` lists every
live worker, the standby and each core replica included."""

from __future__ import annotations

import json
from typing import Any

import pytest

from services.runtime.bus import Bus
from services.runtime.micro import package_version, scatter
from tests.conftest import Processes, arun_svc, wait_until
from tests.e2e.conftest import holder_of, pid_of

pytestmark = pytest.mark.slow


async def answers(bus: Bus, subject: str) -> list[dict[str, Any]]:
    return [json.loads(d) for d in await scatter(bus.nc, subject, first=0.5)]


async def request(bus: Bus, subject: str) -> dict[str, Any]:
    msg = await bus.nc.request(subject, b"", timeout=5)
    assert not (msg.headers or {}).get("Nats-Service-Error-Code"), msg.headers
    body: dict[str, Any] = json.loads(msg.data)
    return body


# What each role's status says it does, once it runs (sim transport, account "default").
LIVE: dict[str, dict[str, Any]] = {
    "core": {"core": True},
    "whatsapp": {"owned": ["default"], "standby": []},
    "whatsapp-egress": {"owned": ["default"], "standby": []},
    "whatsapp-ingress": {"ingress": ["default"]},
    "all": {"owned": ["default"], "core": True},
}


def matches(live: dict[str, Any], expected: dict[str, Any]) -> bool:
    for key, value in expected.items():
        if value is True:
            if not isinstance(live.get(key), dict):
                return False
        elif live.get(key) != value:
            return False
    return True


@pytest.mark.parametrize("role", list(LIVE))
async def test_each_role_answers_ping_info_stats_and_its_live_status(
    processes: Processes, served: tuple[str, Bus], role: str
) -> None:
    url, bus = served
    name = f"switchboard-{role}"
    proc = processes.start("run", role, NATS_URL=url)

    async def pinged() -> bool:
        return any(p["name"] == name for p in await answers(bus, "$SRV.PING"))

    await wait_until(pinged, timeout=60, what=f"{name} answering $SRV.PING")
    (ping,) = [p for p in await answers(bus, "$SRV.PING") if p["name"] == name]
    assert ping["version"] == package_version()
    assert ping["metadata"]["role"] == role
    assert ping["metadata"]["pid"] == str(proc.pid)
    if role in ("whatsapp", "whatsapp-egress", "all"):
        assert pid_of(ping["metadata"]["holder"].replace("-all-", "-whatsapp-")) == proc.pid
    # nats micro info <name>
    info = await request(bus, f"$SRV.INFO.{name}")
    assert info["id"] == ping["id"]
    (endpoint,) = info["endpoints"]
    # its live state, once the role has settled (the lease taken, the consumer bound)
    live: dict[str, Any] = {}

    async def settled() -> bool:
        live.update(await request(bus, endpoint["subject"]))
        return matches(live, LIVE[role])

    await wait_until(settled, timeout=30, what=f"{name} status {LIVE[role]}")
    assert live["id"] == ping["id"]
    assert live["role"] == role
    # nats micro stats <name>: the status requests were counted, none failed
    stats = await request(bus, f"$SRV.STATS.{name}")
    (counts,) = stats["endpoints"]
    assert counts["num_requests"] >= 1
    assert counts["num_errors"] == 0
    # it stops cleanly with the role, and no longer answers
    assert processes.stop(proc) == 0, processes.log(proc)
    assert [p for p in await answers(bus, "$SRV.PING") if p["name"] == name] == []


async def test_svc_status_lists_the_owner_the_standby_and_two_core_replicas(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    for role in ("whatsapp", "whatsapp", "core", "core"):
        processes.start("run", role, NATS_URL=url)
    await wait_until(lambda: holder_of(bus, "default"), timeout=60, what="an owner of default")
    env = processes.env(NATS_URL=url)
    status: dict[str, Any] = {}

    async def four_workers() -> bool:
        result = await arun_svc("status", "--json", env=env)
        assert result.returncode == 0, result.stderr
        status.update(json.loads(result.stdout))
        return len(status["workers"]) == 4 and all(w["answered"] for w in status["workers"])

    await wait_until(four_workers, timeout=60, what="svc status listing four workers")
    workers = status["workers"]
    channel = sorted((w for w in workers if w["role"] == "whatsapp"), key=lambda w: not w["owned"])
    cores = [w for w in workers if w["role"] == "core"]
    assert [w["owned"] for w in channel] == [["default"], []]
    assert [w["standby"] for w in channel] == [[], ["default"]]
    assert channel[0]["holder"] == await holder_of(bus, "default")
    assert len({w["pid"] for w in cores}) == 2
    assert all(w["core"]["consumer"] == "core" for w in cores)
    human = await arun_svc("status", env=env)
    assert human.returncode == 0, human.stderr
    text = human.stdout.decode()
    assert "owns default" in text
    assert "owns none; standby for default" in text
    assert text.count("consumer INBOUND/core") == 2
