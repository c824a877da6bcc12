"""An example Switchboard plugin.

Install it next to Switchboard (`pip install ./docs/examples/greeter-plugin`), then
`svc plugins ls` lists it; `svc plugins install greeter --config style=formal` turns it on.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from services.plugins.base import Plugin, ToolContext, ToolError


class Config(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings, validated by `svc plugins install/config` before anything is recorded."""

    style: Literal["casual", "formal"] = "casual"
    max_name_length: int = 40


class HelloParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """What the model passes to greeter.hello (exported as JSON Schema for the model)."""

    name: str


plugin: Plugin[Config] = Plugin(
    "greeter",
    "0.1.0",
    "Greets people by name.",
    config_type=Config,
    default_policy="allow",  # "deny" for tools that reach outside (like http_get)
)


@plugin.tool("hello", "Greet someone by name.", HelloParams)
async def hello(params: HelloParams, config: Config, ctx: ToolContext) -> str:
    """The text goes back to the model; a ToolError's message does too."""
    if len(params.name) > config.max_name_length:
        raise ToolError(f"a name of at most {config.max_name_length} characters, please")
    if config.style == "formal":
        return f"Good day, {params.name}."
    return f"Hi {params.name}! (greeted on {ctx.channel} account {ctx.account})"
