"""A fresh server works on first use (issue 11 item 13): the real CLI against a bare
`svc nats serve` where no role has started. Writing commands provision first; reading
commands say in one line which stream is missing and how to create it."""

from __future__ import annotations

from services.runtime.bus import Bus
from tests.conftest import Processes, run_svc


async def test_plugins_install_on_a_fresh_server_provisions_then_records(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    env = processes.env(NATS_URL=url)
    installed = run_svc("plugins", "install", "clock", env=env)
    assert installed.returncode == 0, installed.stderr.decode()
    assert "recorded PluginInstalled (PLUGINS seq 1)" in installed.stdout.decode()
    listed = run_svc("plugins", "ls", env=env)
    assert listed.returncode == 0, listed.stderr.decode()
    assert any(
        line.split()[:3] == ["*", "clock", "installed"]
        for line in listed.stdout.decode().splitlines()
    )
    assert (await bus.js.stream_info("PLUGINS")).state.messages == 1


async def test_plugins_ls_on_a_fresh_server_shows_the_defaults_and_names_the_missing_stream(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, _ = served
    listed = run_svc("plugins", "ls", env=processes.env(NATS_URL=url))
    assert listed.returncode == 0, listed.stderr.decode()
    assert "clock" in listed.stdout.decode()
    assert "(nothing beyond the preinstalled plugins)" in listed.stdout.decode()
    note = listed.stderr.decode().strip().splitlines()
    assert len(note) == 1
    assert "stream PLUGINS does not exist yet" in note[0]
    assert "svc streams ensure" in note[0]


async def test_audit_on_a_fresh_server_refuses_to_say_ok(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, _ = served
    env = processes.env(NATS_URL=url)
    audited = run_svc("audit", env=env)
    assert audited.returncode == 1
    assert "ok" not in audited.stdout.decode().lower()
    line = audited.stderr.decode().strip().splitlines()
    assert len(line) == 1, line
    assert "streams ACCOUNTS, INBOUND, AGENT" in line[0]
    assert "nothing to audit" in line[0]
    assert "svc streams ensure" in line[0]
    # Once provisioned, the same audit judges (an empty log) and passes.
    assert run_svc("streams", "ensure", env=env).returncode == 0
    again = run_svc("audit", env=env)
    assert again.returncode == 0, again.stderr.decode()
