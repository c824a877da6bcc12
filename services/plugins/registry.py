"""Plugin discovery through the entry-point group `switchboard.plugins` (built-ins too)."""

from __future__ import annotations

import logging
from importlib.metadata import entry_points
from typing import Any

from contracts.plugins import PluginManifest
from contracts.subjects import check_plugin
from services.plugins.base import Plugin, ToolError
from services.runtime.errors import ConfigError

log = logging.getLogger(__name__)

GROUP = "switchboard.plugins"


def discover() -> dict[str, Plugin[Any]]:
    """Every installed plugin by name; a plugin that fails to load is logged and skipped."""
    found: dict[str, Plugin[Any]] = {}
    for ep in entry_points(group=GROUP):
        try:
            plugin = ep.load()
            check_plugin(plugin.name)
        except Exception as exc:  # a broken third-party plugin must not stop the core
            log.warning(
                "plugin failed to load", extra={"entry_point": ep.value, "error": repr(exc)}
            )
            continue
        if not isinstance(plugin, Plugin):
            log.warning("entry point is not a Plugin", extra={"entry_point": ep.value})
            continue
        found[plugin.name] = plugin
    return found


def manifests(plugins: dict[str, Plugin[Any]]) -> dict[str, PluginManifest]:
    """The manifests of `plugins`."""
    return {name: p.manifest for name, p in plugins.items()}


def require(plugins: dict[str, Plugin[Any]], name: str) -> Plugin[Any]:
    """The plugin called `name`, or a one-line error listing the available ones."""
    if name not in plugins:
        raise ConfigError(
            f"unknown plugin {name!r}: available are {', '.join(sorted(plugins)) or '(none)'}"
        )
    return plugins[name]


def parse_config(plugin: Plugin[Any], pairs: list[str]) -> dict[str, Any]:
    """`key=value` pairs validated against the plugin's config Struct (nothing invalid is
    ever written): values are JSON when they parse as JSON, else strings."""
    import json

    raw: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ConfigError(f"--config {pair!r} is invalid: expected KEY=VALUE")
        try:
            raw[key] = json.loads(value)
        except json.JSONDecodeError:
            raw[key] = value
    try:
        plugin.config(raw)
    except ToolError as exc:
        raise ConfigError(str(exc)) from None
    return raw
