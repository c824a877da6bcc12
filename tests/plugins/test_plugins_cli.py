"""`svc plugins` as an operator uses it: validated writes, explained resolution, --json."""

from __future__ import annotations

import msgspec

from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, arun_svc


async def test_plugins_cli_validates_records_and_explains(
    nats_server: EmbeddedNats, processes: Processes
) -> None:
    env = processes.env(NATS_URL=nats_server.url)
    assert (await arun_svc("streams", "ensure", env=env)).returncode == 0
    unknown = await arun_svc("plugins", "install", "nope", env=env)
    assert unknown.returncode == 2
    assert "unknown plugin 'nope': available are calculator, clock, http_get, memory" in (
        unknown.stderr.decode()
    )
    bad = await arun_svc("plugins", "install", "http_get", "--config", "max_bytes=lots", env=env)
    assert bad.returncode == 2
    assert "Expected `int`, got `str` - at `$.max_bytes`" in bad.stderr.decode()
    # nothing invalid was recorded
    listed = msgspec.json.decode((await arun_svc("plugins", "ls", "--json", env=env)).stdout)
    assert listed["installed"] == []
    ok = await arun_svc(
        "plugins", "install", "http_get", "--config", 'allowlist=["example.org"]', "--json", env=env
    )
    assert ok.returncode == 0, ok.stderr
    assert msgspec.json.decode(ok.stdout)["event"]["config"] == {"allowlist": ["example.org"]}
    for args in (
        ["--deny", "calculator.*"],
        [
            "--channel",
            "whatsapp",
            "--account",
            "vip",
            "--allow",
            "calculator.*",
            "--allow",
            "http_get.*",
        ],
    ):
        assert (await arun_svc("plugins", "policy", *args, env=env)).returncode == 0
    resolved = await arun_svc("plugins", "resolve", "--account", "vip", "--json", env=env)
    rows = {r["tool"]: (r["allowed"], r["rule"]) for r in msgspec.json.decode(resolved.stdout)}
    assert rows["calculator.evaluate"] == (True, "allow 'calculator.*' at whatsapp/vip")
    assert rows["http_get.fetch"] == (True, "allow 'http_get.*' at whatsapp/vip")
    other = await arun_svc("plugins", "resolve", "--account", "other", env=env)
    assert "DENY   calculator.evaluate      deny 'calculator.*' at *" in other.stdout.decode()
    assert "DENY   http_get.fetch           default (deny) of http_get" in other.stdout.decode()
    not_installed = await arun_svc("plugins", "config", "memory", "--config", "x=1", env=env)
    assert not_installed.returncode == 2
    assert "plugin 'memory' is not installed at scope '*'" in not_installed.stderr.decode()
