"""The core owns its tool port (issue 12 item 5, ADR 0018): it runs with whatever
`ToolSource` the wiring gives it, and loads without the plugins package."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import pytest

from contracts import subjects
from contracts.events import MessageReceived, TurnCompleted
from services.core.llm import EchoLLM
from services.core.tools import ToolBox, ToolError, ToolSource
from services.core.worker import CoreWorker
from services.plugins import base
from services.plugins.tools import ProjectedTools
from services.runtime.bus import Bus
from tests.conftest import read_stream, wait_until
from tests.core.wiring import default_tools


def test_importing_the_core_loads_no_plugin_channel_or_wiring_module() -> None:
    # A fresh interpreter: what `import services.core.worker` drags in by itself.
    probe = (
        "import sys, services.core.worker;"
        "print('\\n'.join(m for m in sys.modules if m.startswith('services.')))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], check=True, capture_output=True, text=True
    ).stdout.split()
    outside = [
        m
        for m in loaded
        if m.split(".")[1] in ("plugins", "channel", "whatsapp", "ops", "app", "cli")
    ]
    assert "services.core.worker" in loaded
    assert outside == []


def test_the_core_worker_needs_its_tools_from_the_wiring() -> None:
    with pytest.raises(TypeError, match="tools"):
        CoreWorker(None, EchoLLM())  # type: ignore[arg-type, call-arg]


def test_plugins_raise_the_cores_tool_error_under_its_old_name() -> None:
    # Third-party plugins import ToolError from services.plugins.base: it must stay the
    # very class the core catches, or their refusals would end turns as crashes.
    assert base.ToolError is ToolError
    assert issubclass(ToolError, Exception)


async def test_the_plugins_adapter_satisfies_the_port(bus: Bus) -> None:
    tools: ToolSource = default_tools(bus)
    assert isinstance(tools, ProjectedTools)
    box = await tools.toolbox("whatsapp", "acct", "c@s.whatsapp.net")
    assert "calculator.evaluate" in [s.name for s in box.specs()]


class RecordingTools:
    """A ToolSource with no plugins behind it: remembers what the core asked for."""

    def __init__(self) -> None:
        self.asked: list[tuple[str, str, str]] = []

    async def toolbox(self, channel: str, account: str, chat: str) -> ToolBox:
        self.asked.append((channel, account, chat))
        return ToolBox([], timeout=1.0)


async def test_a_turn_asks_the_given_tool_source_for_its_chats_tools(bus: Bus) -> None:
    tools = RecordingTools()
    worker = CoreWorker(bus, EchoLLM(), tools=tools)
    msg = MessageReceived(
        account="acct",
        chat="c@s.whatsapp.net",
        sender="c@s.whatsapp.net",
        message_id="m1",
        text="hi",
    )
    await bus.publish(subjects.inbound("whatsapp", "acct", msg.chat), msg)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    await wait_until(lambda: worker.loop.handled == 1, what="the turn")
    stop.set()
    await task
    assert tools.asked == [("whatsapp", "acct", "c@s.whatsapp.net")]
    ((_, record),) = await read_stream(bus, "AGENT")
    assert isinstance(record, TurnCompleted)
    assert record.tools_called == []
