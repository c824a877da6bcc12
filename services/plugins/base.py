"""How to write a plugin: a `Plugin` with a config Struct and tools whose parameters are
Structs. Register it under the entry-point group `switchboard.plugins`.

    class Params(msgspec.Struct):
        name: str

    greet = Plugin("greet", "1.0.0", "Say hello.")

    @greet.tool("hello", "Greet someone by name.", Params)
    async def hello(params: Params, config: msgspec.Struct, ctx: ToolContext) -> str:
        return f"hello, {params.name}"

Where a tool runs (so that SVC_TOOL_TIMEOUT can stop it; see docs/plugins.md, ADR 0014):
`async def` on the event loop (it must not block); a plain `def` in a worker process that
is killed at the timeout (`run="process"`, the default for `def`: CPU-bound work), or in a
daemon thread (`run="thread"`: blocking I/O, or a tool that cannot be pickled).
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any, Generic, Literal, Protocol, TypeVar

import msgspec

from contracts.plugins import PluginManifest, ToolManifest, parameters_schema

# The core owns the error a tool raises (its port, ADR 0018); re-exported here, where
# plugins (third-party ones too) have always imported it.
from services.core.tools import ToolError as ToolError

if TYPE_CHECKING:
    from services.plugins.runner import ToolRunner


class Facts(Protocol):
    """What the memory plugin needs from the platform."""

    async def remember(self, key: str, value: str) -> None: ...
    async def forget(self, key: str) -> None: ...
    async def recall(self) -> dict[str, str]: ...


@dataclass(frozen=True)
class ToolContext:
    """Where a tool runs: the chat it serves, and platform services."""

    channel: str
    account: str
    chat: str
    facts: Facts | None = None


class NoConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """For plugins without settings."""


P = TypeVar("P", bound=msgspec.Struct)
ToolFn = Callable[[Any, Any, ToolContext], Awaitable[str] | str]
F = TypeVar("F", bound=ToolFn)
RunIn = Literal["loop", "thread", "process"]


@dataclass
class _Tool:
    manifest: ToolManifest
    params: type[msgspec.Struct]
    fn: ToolFn
    run: RunIn = "loop"


@dataclass
class Plugin(Generic[P]):
    """A plugin: name, version, description, config Struct, tools."""

    name: str
    version: str
    description: str
    config_type: type[msgspec.Struct] = NoConfig
    default_policy: Literal["allow", "deny"] = "allow"
    preinstalled: bool = False
    _tools: dict[str, _Tool] = field(default_factory=dict)
    _manifest: PluginManifest | None = field(default=None, repr=False)

    def tool(
        self,
        name: str,
        description: str,
        params: type[msgspec.Struct],
        *,
        run: Literal["thread", "process"] | None = None,
    ) -> Callable[[F], F]:
        """Register `fn(params, config, ctx) -> str` as tool `name`: an `async def` runs on
        the event loop; a `def` in a worker process (`run="process"`, the default) or a
        daemon thread (`run="thread"`)."""

        def register(fn: F) -> F:
            manifest = ToolManifest(
                name=name, description=description, parameters=parameters_schema(params)
            )
            where: RunIn = run or ("loop" if inspect.iscoroutinefunction(fn) else "process")
            self._tools[name] = _Tool(manifest, params, fn, where)
            self._manifest = None  # rebuilt on next access
            return fn

        return register

    @property
    def manifest(self) -> PluginManifest:
        """The plugin's manifest (what `svc plugins ls` shows, what the model is offered);
        built once, since the core reads it on every turn."""
        if self._manifest is None:
            self._manifest = PluginManifest(
                name=self.name,
                version=self.version,
                description=self.description,
                tools=[t.manifest for t in self._tools.values()],
                config_schema=parameters_schema(self.config_type),
                default_policy=self.default_policy,
                preinstalled=self.preinstalled,
            )
        return self._manifest

    def config(self, raw: dict[str, Any]) -> msgspec.Struct:
        """Validated config; raises ToolError naming the field and the expected type."""
        try:
            return msgspec.convert(raw, self.config_type, strict=False)
        except msgspec.ValidationError as exc:
            raise ToolError(f"config of {self.name}: {exc}") from None

    async def call(
        self,
        tool: str,
        arguments: dict[str, Any],
        config: dict[str, Any],
        ctx: ToolContext,
        *,
        runner: ToolRunner | None = None,
    ) -> str:
        """Run `tool` with the model's arguments (validated against its parameter Struct),
        where the tool was declared to run (`runner`: the role's worker processes)."""
        entry = self._tools.get(tool)
        if entry is None:
            raise ToolError(f"{self.name} has no tool {tool!r}")
        try:
            params = msgspec.convert(arguments, entry.params, strict=False)
        except msgspec.ValidationError as exc:
            raise ToolError(f"bad arguments for {self.name}.{tool}: {exc}") from None
        settings = self.config(config)
        what = f"{self.name}.{tool}"
        from services.plugins import runner as runners  # runner imports ToolError from here

        result: object
        match entry.run:
            case "loop":
                result = entry.fn(params, settings, ctx)
                if inspect.isawaitable(result):
                    result = await result
            case "thread":
                result = await runners.in_thread(entry.fn, params, settings, ctx)
            case "process":
                # A worker process gets the chat, not the platform's services (`facts`).
                portable = replace(ctx, facts=None)
                if runner is not None:
                    result = await runner.in_process(
                        entry.fn, params, settings, portable, what=what
                    )
                else:  # no pool (a one-off call): a worker for this call only
                    async with runners.ToolRunner(processes=1, warm=0) as own:
                        result = await own.in_process(
                            entry.fn, params, settings, portable, what=what
                        )
        if not isinstance(result, str):
            raise ToolError(f"{what} returned {type(result).__name__}, not text")
        return result
