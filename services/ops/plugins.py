"""`svc plugins`: every write is validated against the discovered plugins first, then
recorded as an event on PLUGINS; every read replays PLUGINS into a fresh projection (on a
fresh server without PLUGINS: the defaults, and a note saying the stream is missing)."""

from __future__ import annotations

import getpass
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import msgspec

from contracts import subjects
from contracts.events import (
    PluginConfigured,
    PluginInstalled,
    PluginUninstalled,
    Scope,
    ToolPolicySet,
)
from contracts.plugins import scope_key
from contracts.streams import PLUGINS
from services.plugins.base import Plugin
from services.plugins.projection import PluginProjection
from services.plugins.registry import discover, manifests, parse_config, require
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.provisioning import missing_message, missing_streams


def scope_of(channel: str | None, account: str | None) -> Scope:
    """The scope the flags name: none global, --channel, or --account (in its channel)."""
    if account is not None:
        subjects.check_account(account)
        return Scope(channel=subjects.check_channel(channel or "whatsapp"), account=account)
    if channel is not None:
        return Scope(channel=subjects.check_channel(channel))
    return Scope()


@asynccontextmanager
async def replayed(bus: Bus) -> AsyncIterator[tuple[dict[str, Plugin[Any]], PluginProjection]]:
    """The discovered plugins and PLUGINS replayed into an in-memory projection."""
    plugins = discover()
    async with PluginProjection(bus, ":memory:", manifests(plugins), name="cli") as projection:
        if not await missing_streams(bus.js, [PLUGINS.name]):
            await projection.catch_up()
        yield plugins, projection


async def missing_note(bus: Bus) -> str | None:
    """One line when PLUGINS does not exist yet (nothing was ever installed), else None."""
    if missing := await missing_streams(bus.js, [PLUGINS.name]):
        return missing_message(missing, "nothing is installed yet, showing the defaults")
    return None


async def listing(bus: Bus) -> dict[str, Any]:
    """Available plugins and what is installed (or removed) in which scope."""
    async with replayed(bus) as (plugins, projection):
        installed, policies = await projection.rows()
    return {
        "available": [msgspec.to_builtins(p.manifest) for _, p in sorted(plugins.items())],
        "installed": [
            {
                "scope": r.scope,
                "name": r.name,
                "state": r.state,
                "version": r.version,
                "config": r.config,
            }
            for r in sorted(installed, key=lambda r: (r.scope, r.name))
        ],
        "policies": [{"scope": s, "allow": a, "deny": d} for s, (a, d) in sorted(policies.items())],
    }


async def record(bus: Bus, event: msgspec.Struct, subject: str) -> int:
    """Publish a plugin event; return its stream sequence."""
    ack = await bus.publish(subject, event)  # type: ignore[arg-type]
    return int(ack.seq)


async def install(
    bus: Bus, name: str, scope: Scope, config: list[str]
) -> tuple[PluginInstalled, int]:
    """Validate and record an install."""
    plugin = require(discover(), name)
    event = PluginInstalled(
        name=name,
        version=plugin.version,
        scope=scope,
        config=parse_config(plugin, config),
        actor=getpass.getuser(),
    )
    return event, await record(bus, event, subjects.plugins(name))


async def configure(
    bus: Bus, name: str, scope: Scope, config: list[str]
) -> tuple[PluginConfigured, int]:
    """Validate and record a configuration change (the plugin must be installed there)."""
    async with replayed(bus) as (plugins, projection):
        plugin = require(plugins, name)
        installed, _ = await projection.rows()
    key = scope_key(scope)
    if not any(r.scope == key and r.name == name and r.state == "installed" for r in installed):
        raise ConfigError(
            f"plugin {name!r} is not installed at scope {key!r}: install it there first"
        )
    event = PluginConfigured(
        name=name, scope=scope, config=parse_config(plugin, config), actor=getpass.getuser()
    )
    return event, await record(bus, event, subjects.plugins(name))


async def uninstall(bus: Bus, name: str, scope: Scope) -> tuple[PluginUninstalled, int]:
    """Record an uninstall (of a known plugin)."""
    require(discover(), name)
    event = PluginUninstalled(name=name, scope=scope, actor=getpass.getuser())
    return event, await record(bus, event, subjects.plugins(name))


async def policy(
    bus: Bus, scope: Scope, allow: list[str], deny: list[str], *, actor: str | None = None
) -> tuple[ToolPolicySet, int]:
    """Record the allow/deny patterns of a scope (replacing its previous rules)."""
    for pattern in [*allow, *deny]:
        if not pattern.strip() or " " in pattern:
            raise ConfigError(
                f"pattern {pattern!r} is invalid: use plugin.tool globs like 'http_get.*'"
            )
    who = actor if actor is not None else getpass.getuser()
    event = ToolPolicySet(scope=scope, allow=allow, deny=deny, actor=who)
    return event, await record(bus, event, subjects.PLUGIN_POLICY_SUBJECT)


async def resolution(bus: Bus, channel: str, account: str) -> list[dict[str, Any]]:
    """Effective tools for (channel, account) and the rule that decided each."""
    subjects.check_account(account)
    async with replayed(bus) as (_, projection):
        decisions = await projection.resolve(subjects.check_channel(channel), account)
    return [{"tool": d.tool, "allowed": d.allowed, "rule": d.rule} for d in decisions]
