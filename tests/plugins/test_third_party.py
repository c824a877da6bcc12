"""A third-party plugin, built as a tiny wheel in a temp dir and installed into this
environment, is discovered through its entry point and callable; a running core offers
it, and an uninstall mid-conversation removes it from the next turn."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from contracts import subjects
from contracts.events import PluginUninstalled
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from tests.conftest import role
from tests.plugins.wheels import installed

MODULE = """
import msgspec
from services.plugins.base import Plugin

class Params(msgspec.Struct):
    name: str

plugin = Plugin("greeter", "0.1.0", "Greets people.", preinstalled=True)

@plugin.tool("hello", "Greet someone by name.", Params)
async def hello(params, config, ctx):
    return f"hello, {params.name}, from {ctx.account}"
"""


@pytest.fixture
def greeter_installed(tmp_path: Path) -> Iterator[None]:
    with installed(tmp_path, "greeter", MODULE):
        yield


def test_a_third_party_plugin_is_discovered_through_its_entry_point_and_callable(
    greeter_installed: None,
) -> None:
    script = (
        "import asyncio\n"
        "from services.plugins.registry import discover\n"
        "from services.plugins.base import ToolContext\n"
        "p = discover()['greeter']\n"
        "ctx = ToolContext('whatsapp', 'acct', 'c')\n"
        "print(asyncio.run(p.call('hello', {'name': 'Ana'}, {}, ctx)))\n"
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, check=True)
    assert out.stdout.decode().strip() == "hello, Ana, from acct"


async def test_uninstalling_mid_conversation_removes_the_tool_from_the_next_turn(
    bus: Bus, greeter_installed: None
) -> None:
    import importlib

    importlib.invalidate_caches()
    ask = '!tool greeter.hello {"name": "Bo"}'
    async with SimUser(bus, "default") as user, role(bus, "all"):
        first = await user.send("bo@s.whatsapp.net", ask)
        assert await user.wait_replies(20)
        assert first.reply is not None
        assert first.reply.text == "echo: greeter.hello -> hello, Bo, from default"
        # When the plugin is uninstalled between two turns
        uninstalled_at = time.monotonic()
        await bus.publish(subjects.plugins("greeter"), PluginUninstalled(name="greeter"))
        # Then once projected, the next turn no longer offers it (and it stays gone)
        replies = []
        for _ in range(50):
            later = await user.send("bo@s.whatsapp.net", ask)
            assert await user.wait_replies(20)
            assert later.reply is not None
            replies.append(later.reply.text)
            if "no tool named" in later.reply.text:
                break
        lag_ms = (time.monotonic() - uninstalled_at) * 1000
        gone = await user.send("bo@s.whatsapp.net", ask)
        assert await user.wait_replies(20)
    assert replies[-1] == "echo: no tool named 'greeter.hello' here"
    assert gone.reply is not None
    assert gone.reply.text == replies[-1]
    print(f"uninstall -> first turn without the tool: {lag_ms:.0f} ms, {len(replies)} turn(s)")
