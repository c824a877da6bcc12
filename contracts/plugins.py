"""The plugin contract: a manifest of tools whose parameters are msgspec Structs (exported
as JSON Schema for the model), and the scope a setting applies to."""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from contracts.events import Scope


class ToolManifest(msgspec.Struct, frozen=True, kw_only=True):
    """One tool: `name` is local to the plugin; the model sees `plugin.tool`."""

    name: str
    description: str
    parameters: dict[str, Any]  # JSON Schema of the tool's parameter Struct


class PluginManifest(msgspec.Struct, frozen=True, kw_only=True):
    """What a plugin offers. `default_policy` applies when no rule matches a tool;
    `preinstalled` plugins are in effect globally until uninstalled."""

    name: str
    version: str
    description: str
    tools: list[ToolManifest]
    config_schema: dict[str, Any] = msgspec.field(default_factory=dict)
    default_policy: Literal["allow", "deny"] = "allow"
    preinstalled: bool = False


def parameters_schema(params: type[msgspec.Struct]) -> dict[str, Any]:
    """The JSON Schema object of a parameter Struct, inlined (no $ref) for the model."""
    (ref,), components = msgspec.json.schema_components([params])
    name = ref["$ref"].rsplit("/", 1)[1]
    schema: dict[str, Any] = dict(components[name])
    schema.pop("title", None)
    schema.setdefault("properties", {})
    return schema


def scope_key(scope: Scope) -> str:
    """`*` (global), `<channel>`, or `<channel>/<account>`: the projection's scope column."""
    if scope.account:
        return f"{scope.channel or 'whatsapp'}/{scope.account}"
    return scope.channel or "*"


def scope_chain(channel: str, account: str) -> tuple[str, str, str]:
    """Scope keys from most to least specific for (channel, account)."""
    return (f"{channel}/{account}", channel, "*")
