"""`svc` processes run on uvloop unless SVC_UVLOOP=off (ADR 0036)."""

from __future__ import annotations

import json
import subprocess

import pytest

from services.runtime.bus import Bus
from tests.conftest import Processes, run_svc, wait_until

pytestmark = pytest.mark.slow


def _records(processes: Processes, proc: subprocess.Popen[bytes]) -> list[dict[str, object]]:
    return [json.loads(line) for line in processes.log(proc).splitlines() if line.startswith("{")]


def _loop_logged(processes: Processes, proc: subprocess.Popen[bytes]) -> str | None:
    starting = [r for r in _records(processes, proc) if r.get("msg") == "starting"]
    return str(starting[0].get("loop")) if starting else None


@pytest.mark.parametrize(("setting", "loop"), [(None, "uvloop"), ("off", "asyncio")])
async def test_svc_runs_on_uvloop_by_default_and_on_asyncio_when_turned_off(
    processes: Processes, served: tuple[str, Bus], setting: str | None, loop: str
) -> None:
    url, _ = served
    env = {"NATS_URL": url} if setting is None else {"NATS_URL": url, "SVC_UVLOOP": setting}
    core = processes.start("run", "core", **env)
    await wait_until(
        lambda: any(r.get("msg") == "running" for r in _records(processes, core)),
        what="the role running",
    )
    assert _loop_logged(processes, core) == loop
    # Signal handlers work on that loop: SIGTERM drains and exits 0.
    assert processes.stop(core) == 0, processes.log(core)


def test_a_bad_svc_uvloop_value_exits_2_with_one_line(processes: Processes) -> None:
    done = run_svc("run", "core", env=processes.env(SVC_UVLOOP="fast"), timeout=60)
    assert done.returncode == 2
    lines = done.stderr.decode().strip().splitlines()
    assert lines == [
        "svc: SVC_UVLOOP='fast' is invalid: expected one of on, off"
        " (off runs the standard asyncio loop)"
    ]
