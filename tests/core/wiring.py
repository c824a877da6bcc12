"""The core wired as a test needs it: the core takes its tools from outside (ADR 0018)."""

from __future__ import annotations

from services.core.llm import LLM
from services.core.worker import CoreWorker
from services.plugins.registry import discover
from services.plugins.tools import ProjectedTools
from services.runtime.bus import Bus
from services.runtime.settings import CoreSettings


def default_tools(bus: Bus, settings: CoreSettings | None = None) -> ProjectedTools:
    """The installed plugins with their default policies (no plugin projection)."""
    return ProjectedTools(bus, discover(), None, timeout=(settings or CoreSettings()).tool_timeout)


def core_worker(bus: Bus, llm: LLM, settings: CoreSettings | None = None) -> CoreWorker:
    """A CoreWorker with `default_tools`."""
    return CoreWorker(bus, llm, settings, tools=default_tools(bus, settings))
