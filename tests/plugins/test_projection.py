"""The plugin projection against a real server: rows + checkpoint, resume, determinism,
bad events skipped and counted; the core's tool list follows it."""

from __future__ import annotations

import asyncio
import sqlite3
from pathlib import Path
from typing import Any

import pytest

from contracts import subjects
from contracts.events import (
    FactRemembered,
    MessageReceived,
    PluginConfigured,
    PluginInstalled,
    PluginUninstalled,
    Scope,
    ToolPolicySet,
)
from services.plugins.base import ToolContext, ToolError
from services.plugins.builtin import HttpConfig, check_url, http_get
from services.plugins.projection import PluginProjection
from services.plugins.registry import discover, manifests
from services.plugins.tools import ChatFacts, ProjectedTools
from services.runtime.bus import Bus
from tests.conftest import wait_until

VIP = Scope(channel="whatsapp", account="vip")


async def history(bus: Bus) -> None:
    """A mixed history: installs, config, policies, facts, an uninstall, and junk."""
    await bus.publish(
        subjects.plugins("http_get"),
        PluginInstalled(name="http_get", version="1.0.0", config={"allowlist": ["example.org"]}),
    )
    await bus.publish(
        subjects.plugins("memory"), PluginInstalled(name="memory", version="1.0.0", scope=VIP)
    )
    await bus.publish(
        subjects.plugins("http_get"),
        PluginConfigured(name="http_get", config={"allowlist": ["example.org", "*.example.com"]}),
    )
    await bus.publish(subjects.PLUGIN_POLICY_SUBJECT, ToolPolicySet(allow=["calculator.*"]))
    await bus.publish(
        subjects.PLUGIN_POLICY_SUBJECT,
        ToolPolicySet(scope=Scope(channel="whatsapp"), deny=["calculator.*"]),
    )
    await bus.publish(
        subjects.PLUGIN_POLICY_SUBJECT, ToolPolicySet(scope=VIP, allow=["calculator.evaluate"])
    )
    await bus.publish_bytes("plugins.junk", b"\xff not json", msg_id="junk-1")
    other = MessageReceived(account="a", chat="c", sender="s", message_id="m", text="t")
    await bus.publish("plugins.odd", other)
    for i in range(5):
        fact = FactRemembered(account="vip", chat="c@s.whatsapp.net", key=f"k{i}", value=f"v{i}")
        await bus.publish(subjects.memory("whatsapp", "vip"), fact)
    await bus.publish(subjects.plugins("clock"), PluginUninstalled(name="clock", scope=VIP))


def projection(bus: Bus, path: Path | str) -> PluginProjection:
    return PluginProjection(bus, path, manifests(discover()))


async def test_a_rebuild_from_scratch_equals_the_live_projection_row_for_row(
    bus: Bus, tmp_path: Path
) -> None:
    async with projection(bus, tmp_path / "live.sqlite") as live:
        stop = asyncio.Event()
        tail = asyncio.create_task(live.run(stop))
        await history(bus)  # arrives while the live one tails
        last = (await bus.js.stream_info("PLUGINS")).state.last_seq
        await wait_until(lambda: live.position >= last, what="live caught up")
        stop.set()
        await tail
        live_rows = await live.dump()
    async with projection(bus, tmp_path / "rebuilt.sqlite") as rebuilt:
        await rebuilt.catch_up()
        assert await rebuilt.dump() == live_rows
        assert (rebuilt.position, rebuilt.skipped) == (live.position, live.skipped)
    assert len(live_rows["facts"]) == 5
    assert len(live_rows["installed"]) == 3


async def test_malformed_and_unknown_events_are_skipped_counted_and_the_rest_applied(
    bus: Bus, tmp_path: Path
) -> None:
    await history(bus)
    async with projection(bus, ":memory:") as p:
        await p.catch_up()
        assert p.skipped == 2
        assert p.position == (await bus.js.stream_info("PLUGINS")).state.last_seq
        assert len((await p.dump())["facts"]) == 5  # events after the junk still applied


async def test_it_resumes_from_its_checkpoint_after_a_restart(bus: Bus, tmp_path: Path) -> None:
    path = tmp_path / "p.sqlite"
    await history(bus)
    async with projection(bus, path) as first:
        applied = await first.catch_up()
        position = first.position
    more = FactRemembered(account="vip", chat="c@s.whatsapp.net", key="later", value="x")
    await bus.publish(subjects.memory("whatsapp", "vip"), more)
    async with projection(bus, path) as again:
        assert again.position == position  # from the checkpoint, not from 1
        assert await again.catch_up() == 1
    assert applied == position


async def test_resolution_and_the_cores_tool_list_agree(bus: Bus) -> None:
    await history(bus)
    plugins = discover()
    async with projection(bus, ":memory:") as p:
        await p.catch_up()
        tools = ProjectedTools(bus, plugins, p, timeout=5)
        for account, expected_calc in (("vip", True), ("other", False)):
            decisions = await p.resolve("whatsapp", account)
            offered = {s.name for s in (await tools.toolbox("whatsapp", account, "c")).specs()}
            assert offered == {d.tool for d in decisions if d.allowed}
            assert ("calculator.evaluate" in offered) is expected_calc
        vip = {s.name for s in (await tools.toolbox("whatsapp", "vip", "c")).specs()}
        assert "memory.remember" in vip  # installed for vip only
        assert "clock.now" not in vip  # uninstalled for vip
        assert "http_get.fetch" not in vip  # installed globally, denied by default


async def test_memory_facts_are_events_and_a_projection(bus: Bus) -> None:
    async with projection(bus, ":memory:") as p:
        facts = ChatFacts(bus, p, ("whatsapp", "vip", "c@s.whatsapp.net"))
        ctx = ToolContext("whatsapp", "vip", "c@s.whatsapp.net", facts)
        memory = discover()["memory"]
        assert (
            await memory.call("remember", {"key": "name", "value": "Ana"}, {}, ctx)
            == "remembered name"
        )
        await p.catch_up()
        assert await memory.call("recall", {"key": "name"}, {}, ctx) == "Ana"
        await memory.call("forget", {"key": "name"}, {}, ctx)
        await p.catch_up()
        assert await memory.call("recall", {}, {}, ctx) == "nothing remembered"


async def test_http_get_refuses_loopback_and_unlisted_hosts_by_default() -> None:
    ctx = ToolContext("whatsapp", "a", "c")
    with pytest.raises(ToolError, match="private or loopback"):
        await http_get.call("fetch", {"url": "http://127.0.0.1/"}, {"allowlist": ["*"]}, ctx)
    with pytest.raises(ToolError, match="not in the http_get allowlist"):
        await http_get.call("fetch", {"url": "http://localhost:8080/x"}, {}, ctx)
    with pytest.raises(ToolError, match="only http"):
        check_url("file:///etc/passwd", HttpConfig())
    # opted in: a loopback host on the allowlist is fine
    assert check_url("http://127.0.0.1:9/", HttpConfig(allowlist=["127.0.0.1"], allow_private=True))


async def test_a_bad_plugin_config_names_the_field_and_the_type() -> None:
    from services.plugins.registry import parse_config
    from services.runtime.errors import ConfigError

    with pytest.raises(ConfigError, match=r"Expected `float`, got `str` - at `\$.timeout_s`"):
        parse_config(http_get, ["timeout_s=soon"])
    with pytest.raises(ConfigError, match="unknown field `colour`"):
        parse_config(http_get, ["colour=red"])
    ok: dict[str, Any] = parse_config(http_get, ["timeout_s=2", 'allowlist=["a.org"]'])
    assert ok == {"timeout_s": 2, "allowlist": ["a.org"]}


async def test_a_projection_built_from_a_recreated_stream_starts_over(
    bus: Bus, tmp_path: Path
) -> None:
    path = tmp_path / "p.sqlite"
    await history(bus)
    async with projection(bus, path) as first:
        await first.catch_up()
        assert first.position > 1
    # Given PLUGINS was deleted and recreated (a wiped NATS store, say)
    from services.runtime.provisioning import ensure_streams

    await bus.js.delete_stream("PLUGINS")
    await ensure_streams(bus.js)
    await bus.publish(subjects.plugins("memory"), PluginInstalled(name="memory", version="1.0.0"))
    # Then the old file is not trusted: it is rebuilt from the new history
    async with projection(bus, path) as again:
        await again.catch_up()
        assert again.position == 1
        assert (await again.dump())["installed"] == [("*", "memory", "installed", "1.0.0", "{}")]


async def test_a_replica_opening_the_file_while_another_writes_it_waits_instead_of_dying(
    bus: Bus, tmp_path: Path
) -> None:
    # Given another core replica on this host in the middle of a write to the shared file
    # (e.g. creating the schema at start): SQLite refuses the switch to WAL at once, without
    # calling its busy handler, and a replica starting then died with "database is locked"
    path = tmp_path / "plugins.sqlite"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE starting (a)")
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO starting VALUES (1)")
    loop = asyncio.get_running_loop()
    finish = loop.call_later(0.5, other.execute, "COMMIT")
    try:
        # When this replica opens the projection, then it waits for the writer and opens
        async with projection(bus, path) as opened:
            assert opened.position == 0
    finally:
        finish.cancel()
        other.close()
