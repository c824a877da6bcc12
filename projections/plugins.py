"""The plugin read model: which plugins are installed where, tool policies, memory facts.

Pure: `apply(event)` maps an event to SQL statements; `resolve(...)` decides which tools a
(channel, account) may use. The services layer runs the statements and the checkpoint in
one transaction per event.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Any

from contracts.events import (
    FactForgotten,
    FactRemembered,
    PluginConfigured,
    PluginInstalled,
    PluginUninstalled,
    ToolPolicySet,
)
from contracts.plugins import PluginManifest, scope_chain, scope_key

SCHEMA = (
    """CREATE TABLE IF NOT EXISTS installed (
        scope TEXT NOT NULL, name TEXT NOT NULL, state TEXT NOT NULL,
        version TEXT NOT NULL, config TEXT NOT NULL, PRIMARY KEY (scope, name))""",
    """CREATE TABLE IF NOT EXISTS policy (
        scope TEXT PRIMARY KEY, allow TEXT NOT NULL, deny TEXT NOT NULL)""",
    """CREATE TABLE IF NOT EXISTS facts (
        chat TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (chat, key))""",
    """CREATE TABLE IF NOT EXISTS checkpoint (
        name TEXT PRIMARY KEY, seq INTEGER NOT NULL, skipped INTEGER NOT NULL,
        stream TEXT NOT NULL DEFAULT '')""",
)
TABLES = ("installed", "policy", "facts")

Statement = tuple[str, tuple[Any, ...]]
HANDLED_TYPES = (
    PluginInstalled,
    PluginConfigured,
    PluginUninstalled,
    ToolPolicySet,
    FactRemembered,
    FactForgotten,
)
Handled = (
    PluginInstalled
    | PluginConfigured
    | PluginUninstalled
    | ToolPolicySet
    | FactRemembered
    | FactForgotten
)


def _json(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def fact_chat(channel: str, account: str, chat: str) -> str:
    """The facts table's chat column."""
    return f"{channel}/{account}/{chat}"


def apply(event: Handled) -> list[Statement]:
    """The statements that fold `event` into the view (idempotent per event)."""
    match event:
        case PluginInstalled():
            return [
                (
                    "INSERT OR REPLACE INTO installed VALUES (?, ?, 'installed', ?, ?)",
                    (scope_key(event.scope), event.name, event.version, _json(event.config)),
                )
            ]
        case PluginConfigured():
            return [
                (
                    "UPDATE installed SET config = ?"
                    " WHERE scope = ? AND name = ? AND state = 'installed'",
                    (_json(event.config), scope_key(event.scope), event.name),
                )
            ]
        case PluginUninstalled():
            # A row, not a delete: uninstalling a preinstalled plugin must be remembered.
            return [
                (
                    "INSERT OR REPLACE INTO installed VALUES (?, ?, 'removed', '', '{}')",
                    (scope_key(event.scope), event.name),
                )
            ]
        case ToolPolicySet():
            return [
                (
                    "INSERT OR REPLACE INTO policy VALUES (?, ?, ?)",
                    (scope_key(event.scope), _json(sorted(event.allow)), _json(sorted(event.deny))),
                )
            ]
        case FactRemembered():
            chat = fact_chat(event.channel, event.account, event.chat)
            return [
                ("INSERT OR REPLACE INTO facts VALUES (?, ?, ?)", (chat, event.key, event.value))
            ]
        case FactForgotten():
            chat = fact_chat(event.channel, event.account, event.chat)
            return [("DELETE FROM facts WHERE chat = ? AND key = ?", (chat, event.key))]


@dataclass(frozen=True)
class InstalledRow:
    """A row of `installed`."""

    scope: str
    name: str
    state: str
    version: str
    config: dict[str, Any]


@dataclass(frozen=True)
class Decision:
    """Whether `tool` (`plugin.tool`) is offered, and which rule decided."""

    tool: str
    allowed: bool
    rule: str
    config: dict[str, Any]


def effective_plugins(
    rows: list[InstalledRow], manifests: dict[str, PluginManifest], channel: str, account: str
) -> dict[str, dict[str, Any]]:
    """Plugins in effect for (channel, account) with their config: the most specific row
    decides (installed or removed); preinstalled plugins count as installed globally."""
    by_scope = {(r.scope, r.name): r for r in rows}
    out: dict[str, dict[str, Any]] = {}
    for name, manifest in manifests.items():
        for scope in scope_chain(channel, account):
            row = by_scope.get((scope, name))
            if row is not None:
                if row.state == "installed":
                    out[name] = row.config
                break
        else:
            if manifest.preinstalled:
                out[name] = {}
    return out


def resolve(
    rows: list[InstalledRow],
    policies: dict[str, tuple[list[str], list[str]]],
    manifests: dict[str, PluginManifest],
    channel: str,
    account: str,
) -> list[Decision]:
    """Every tool of every plugin in effect, allowed or not, with the deciding rule.

    The most specific scope (account, then channel, then global) with a rule matching
    `plugin.tool` decides; within a scope a matching deny beats a matching allow. With no
    matching rule the plugin's `default_policy` applies.
    """
    decisions = []
    for name, config in sorted(effective_plugins(rows, manifests, channel, account).items()):
        manifest = manifests[name]
        for tool in manifest.tools:
            full = f"{name}.{tool.name}"
            decisions.append(_decide(full, policies, channel, account, manifest, config))
    return decisions


def _decide(
    tool: str,
    policies: dict[str, tuple[list[str], list[str]]],
    channel: str,
    account: str,
    manifest: PluginManifest,
    config: dict[str, Any],
) -> Decision:
    for scope in scope_chain(channel, account):
        allow, deny = policies.get(scope, ([], []))
        if denied := next((p for p in deny if fnmatchcase(tool, p)), None):
            return Decision(tool, False, f"deny {denied!r} at {scope}", config)
        if allowed := next((p for p in allow if fnmatchcase(tool, p)), None):
            return Decision(tool, True, f"allow {allowed!r} at {scope}", config)
    by_default = manifest.default_policy == "allow"
    return Decision(
        tool, by_default, f"default ({manifest.default_policy}) of {manifest.name}", config
    )
