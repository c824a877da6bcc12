"""The tools a turn may use: resolved from the plugin projection for (channel, account).
`ProjectedTools` implements the core's tool port (`services.core.tools.ToolSource`)."""

from __future__ import annotations

from typing import Any

from contracts import subjects
from contracts.events import FactForgotten, FactRemembered
from projections import plugins as view
from services.core.llm import ToolSpec
from services.core.tools import BoundTool, ToolBox
from services.plugins.base import Plugin, ToolContext
from services.plugins.projection import PluginProjection
from services.plugins.runner import ToolRunner
from services.runtime.bus import Bus


class ChatFacts:
    """The memory plugin's view of one chat: writes are events, reads the projection."""

    def __init__(
        self, bus: Bus, projection: PluginProjection | None, ctx: tuple[str, str, str]
    ) -> None:
        self.bus = bus
        self.projection = projection
        self.channel, self.account, self.chat = ctx

    async def remember(self, key: str, value: str) -> None:
        await self.bus.publish(
            subjects.memory(self.channel, self.account),
            FactRemembered(
                channel=self.channel, account=self.account, chat=self.chat, key=key, value=value
            ),
        )

    async def forget(self, key: str) -> None:
        await self.bus.publish(
            subjects.memory(self.channel, self.account),
            FactForgotten(channel=self.channel, account=self.account, chat=self.chat, key=key),
        )

    async def recall(self) -> dict[str, str]:
        if self.projection is None:
            return {}
        return await self.projection.facts(self.channel, self.account, self.chat)


class ProjectedTools:
    """Tools of the plugins in effect, filtered by the resolved policy, bound to the chat."""

    def __init__(
        self,
        bus: Bus,
        plugins: dict[str, Plugin[Any]],
        projection: PluginProjection | None,
        *,
        timeout: float,
        runner: ToolRunner | None = None,
    ) -> None:
        self.bus = bus
        self.plugins = plugins
        self.projection = projection
        self.timeout = timeout
        self.runner = runner  # the role's worker processes (None: one per call)
        # Resolution only changes when the projection moves: remember it per position.
        self._resolved: dict[tuple[str, str], tuple[int, int, list[view.Decision]]] = {}

    async def resolution(self, channel: str, account: str) -> tuple[int, list[view.Decision]]:
        """The PLUGINS position and the resolution a turn uses (plugin defaults at 0 when
        there is no projection)."""
        position = self.projection.position if self.projection is not None else 0
        cached = self._resolved.get((channel, account))
        if cached is not None and cached[0] == position:
            return cached[1], cached[2]
        if self.projection is not None:
            seq, decisions = await self.projection.resolve_at(channel, account)
        else:
            manifests = {n: p.manifest for n, p in self.plugins.items()}
            seq, decisions = 0, view.resolve([], {}, manifests, channel, account)
        self._resolved[(channel, account)] = (position, seq, decisions)
        return seq, decisions

    async def decisions(self, channel: str, account: str) -> list[view.Decision]:
        """The resolution the turn uses (events only, defaults when there is no projection)."""
        return (await self.resolution(channel, account))[1]

    async def toolbox(self, channel: str, account: str, chat: str) -> ToolBox:
        """The allowed tools, ready to call."""
        ctx = ToolContext(
            channel, account, chat, ChatFacts(self.bus, self.projection, (channel, account, chat))
        )
        bound = []
        seq, decisions = await self.resolution(channel, account)
        for decision in decisions:
            if not decision.allowed:
                continue
            plugin_name, _, tool_name = decision.tool.partition(".")
            plugin = self.plugins.get(plugin_name)
            if plugin is None:
                continue
            manifest = next(t for t in plugin.manifest.tools if t.name == tool_name)
            spec = ToolSpec(decision.tool, manifest.description, manifest.parameters)
            caller = _caller(plugin, tool_name, decision.config, ctx, self.runner)
            bound.append(BoundTool(spec, caller))
        return ToolBox(bound, timeout=self.timeout, plugins_seq=seq)


def _caller(
    plugin: Plugin[Any],
    tool: str,
    config: dict[str, Any],
    ctx: ToolContext,
    runner: ToolRunner | None,
) -> Any:
    async def call(arguments: dict[str, Any]) -> str:
        return await plugin.call(tool, arguments, config, ctx, runner=runner)

    return call
