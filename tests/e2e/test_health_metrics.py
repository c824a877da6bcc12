"""Health and metrics through real `svc` processes (ADR 0029): /healthz is "alive";
/readyz is 503 (one line per unmet condition) before JetStream can hold the streams and
while NATS is down, 200 otherwise; /metrics counts traffic with no chat id in it; the
embedded server's monitoring port opens on request and its log stays in SVC_DATA_DIR; an
OTLP metrics exporter that is not installed is refused at start with one line."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import socket
import subprocess
from pathlib import Path

import pytest

from contracts.streams import STREAMS
from services.ops.simclient import SimUser
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import nats_server_binary
from services.runtime.provisioning import missing_streams
from tests.conftest import Processes, assert_audit_clean, run_svc, wait_until
from tests.e2e.conftest import SimNetwork, consumers_ready, read_url
from tests.whatsapp.fake_graph import http_request

pytestmark = pytest.mark.slow


async def get(url: str) -> tuple[int, str, dict[str, str]]:
    answer = await asyncio.to_thread(http_request, url, "GET", None, None, 10)
    return answer.status, answer.body.decode(), answer.headers


def http_url(processes: Processes, proc: subprocess.Popen[bytes]) -> str | None:
    """The URL a process logged as `http listening` (None until it did)."""
    for line in processes.log(proc).splitlines():
        if '"http listening"' in line:
            return str(json.loads(line)["url"])
    return None


async def served_at(processes: Processes, proc: subprocess.Popen[bytes]) -> str:
    await wait_until(lambda: http_url(processes, proc) is not None, 30, "http listening")
    url = http_url(processes, proc)
    assert url is not None
    return url


async def readyz(url: str) -> tuple[int, str]:
    try:
        status, body, _ = await get(f"{url}/readyz")
    except OSError as exc:  # not answering at all is a failure here, never "not ready"
        pytest.fail(f"/readyz did not answer: {exc!r}")
    return status, body


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_readyz_is_503_until_jetstream_holds_the_streams_and_while_nats_is_down(
    processes: Processes, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    port = free_port()
    nats_url = f"nats://127.0.0.1:{port}"
    # Given a nats-server without JetStream: the streams cannot be provisioned there.
    plain = await asyncio.create_subprocess_exec(
        *(nats_server_binary(), "-a", "127.0.0.1", "-p", str(port)),
        *("-l", str(tmp_path / "plain.log")),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        await wait_until(lambda: _accepts(port), 10, "the plain nats-server")
        core = processes.start("run", "core", NATS_URL=nats_url, SVC_HTTP_PORT="0")
        url = await served_at(processes, core)

        # Then alive, but not ready: the line says what is missing.
        assert (await get(f"{url}/healthz"))[:2] == (200, "ok")

        async def says_streams_missing() -> bool:
            status, body = await readyz(url)
            return status == 503 and "not ready: streams: not provisioned yet: JetStream" in body

        await wait_until(says_streams_missing, 30, "/readyz 503 naming the streams")
        _, body = await readyz(url)
        assert all(line.startswith("not ready: ") for line in body.splitlines()), body
        assert core.poll() is None, "the role must wait for JetStream, not exit"
    finally:
        plain.terminate()
        await asyncio.wait_for(plain.wait(), 10)

    # When a JetStream server takes the port: provisioned, consuming, ready.
    server = processes.start("nats", "serve", "--port", str(port))
    read_url(server)

    async def ready() -> bool:
        return (await readyz(url))[0] == 200

    await wait_until(ready, 60, "/readyz 200 once JetStream answers")
    assert (await readyz(url)) == (200, "ready\n")
    async with connect(nats_url, name="e2e-test") as bus:
        assert await missing_streams(bus.js, [s.name for s in STREAMS]) == []

    # When NATS goes down: not ready (the connection line), still alive.
    processes.stop(server)

    async def says_disconnected() -> bool:
        status, body = await readyz(url)
        return status == 503 and "not ready: nats: not connected" in body

    await wait_until(says_disconnected, 30, "/readyz 503 while NATS is down")
    assert (await get(f"{url}/healthz"))[0] == 200
    assert core.poll() is None

    # And ready again once it is back (same port, same store).
    server = processes.start("nats", "serve", "--port", str(port))
    read_url(server)
    await wait_until(ready, 60, "/readyz 200 after NATS is back")
    async with connect(nats_url, name="e2e-test") as bus:
        await assert_audit_clean(bus, request)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of the series `name` whose labels include `labels` (0 when absent)."""
    total = 0.0
    for line in metrics.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{", 1)[0] != name:
            continue
        found = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', series))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(value)
    return total


async def test_metrics_count_messages_turns_and_sends_with_no_chat_id_in_them(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    nats_url, bus = served
    owner = processes.start("run", "whatsapp", NATS_URL=nats_url, SVC_HTTP_PORT="0")
    core = processes.start("run", "core", NATS_URL=nats_url, SVC_HTTP_PORT="0")
    owner_url, core_url = await served_at(processes, owner), await served_at(processes, core)
    await wait_until(lambda: consumers_ready(bus), 30, "owner and core consumers")
    chats = [f"4915550{i:04d}@s.whatsapp.net" for i in range(3)]
    ids: list[str] = []
    async with SimNetwork(bus, "default") as net, SimUser(bus, "default") as user:
        for i in range(6):
            ids.append((await user.send(chats[i % 3], f"hello {i}")).message_id)
        await net.wait(lambda: len(net.job_ids()) >= 6, 60, "6 replies")
        jobs = net.job_ids()

    async def counted() -> bool:
        owner_m = (await get(f"{owner_url}/metrics"))[1]
        core_m = (await get(f"{core_url}/metrics"))[1]
        return (
            sample(owner_m, "switchboard_messages_received_total", account="default") == 6
            and sample(owner_m, "switchboard_jobs_total", outcome="sent", account="default") == 6
            and sample(core_m, "switchboard_turns_total", outcome="completed", model="echo") == 6
        )

    await wait_until(counted, 30, "messages received, turns and jobs sent counted")
    status, owner_m, headers = await get(f"{owner_url}/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    core_m = (await get(f"{core_url}/metrics"))[1]
    assert sample(core_m, "switchboard_turn_duration_seconds_count", outcome="completed") == 6
    assert sample(core_m, "switchboard_model_duration_seconds_count", model="echo") == 6
    assert sample(owner_m, "switchboard_send_duration_seconds_count", outcome="ok") == 6
    assert sample(owner_m, "switchboard_lease_acquisitions_total", account="default") == 1
    assert "switchboard_consumer_pending{" in core_m  # sampled lag, per consumer
    # Labels are low-cardinality: no chat, sender, message or job id anywhere.
    for text in (owner_m, core_m):
        for value in [*chats, *ids, *jobs, "4915550"]:
            assert value not in text
    for url in (owner_url, core_url):
        assert await readyz(url) == (200, "ready\n")


def _installed(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:  # a parent package is missing
        return False


# Imported first by the child (PYTHONPATH): makes the OTLP exporter missing, as in an
# install without the `otlp` extra, whether or not this venv has it.
_HIDE_OTLP = """
import importlib.abc, sys
class _NoOtlp(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith("opentelemetry.exporter.otlp"):
            raise ModuleNotFoundError(f"No module named {name!r}")
        return None
sys.meta_path.insert(0, _NoOtlp())
"""


def test_an_otlp_metrics_exporter_that_is_not_installed_is_refused_at_start(
    processes: Processes, tmp_path: Path
) -> None:
    hide = tmp_path / "no-otlp"
    hide.mkdir()
    (hide / "sitecustomize.py").write_text(_HIDE_OTLP)
    # Nothing listens at NATS_URL: the refusal must come before any connect attempt.
    env = processes.env(
        OTEL_METRICS_EXPORTER="otlp",
        NATS_URL=f"nats://127.0.0.1:{free_port()}",
        PYTHONPATH=str(hide),
    )
    done = run_svc("run", "core", env=env, timeout=60)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert len(lines) == 1, lines
    assert "OTEL_METRICS_EXPORTER='otlp'" in lines[0]
    assert "pip install 'switchboard[otlp]'" in lines[0]


async def test_nats_serve_opens_its_monitoring_port_on_request_and_logs_under_the_data_dir(
    processes: Processes, tmp_path: Path
) -> None:
    server = processes.start("nats", "serve", "--port", "0", "--monitor-port", "0")
    read_url(server)
    assert server.stdout is not None
    monitor = server.stdout.readline().decode()
    assert monitor.startswith("monitoring at http://127.0.0.1:"), monitor
    status, body, _ = await get(monitor.split()[2] + "/varz")
    assert status == 200
    assert json.loads(body)["server_name"] == "svc-embedded"
    log = tmp_path / "svc-data" / "nats" / "nats-server.log"
    assert server.stdout.readline().decode().strip() == f"log at {log}"
    assert "Server is ready" in log.read_text()
    # Without the option (and no SVC_NATS_MONITOR_PORT) the monitoring port stays closed.
    plain = processes.start("nats", "serve", "--port", "0", "--store-dir", "b")  # cwd: tmp_path
    read_url(plain)
    assert plain.stdout is not None
    assert plain.stdout.readline().decode().startswith("log at ")
