"""Policy resolution, pure: scopes from general to specific, deny beats allow, defaults."""

from __future__ import annotations

from contracts.plugins import PluginManifest, ToolManifest
from projections.plugins import InstalledRow, resolve


def manifest(name: str, tools: list[str], **kw: object) -> PluginManifest:
    return PluginManifest(
        name=name,
        version="1",
        description="",
        tools=[ToolManifest(name=t, description="", parameters={}) for t in tools],
        **kw,  # type: ignore[arg-type]
    )


MANIFESTS = {
    "calc": manifest("calc", ["evaluate"], preinstalled=True),
    "web": manifest("web", ["fetch"], default_policy="deny"),
}
INSTALLED = [InstalledRow("*", "web", "installed", "1", {})]


def allowed(policies: dict[str, tuple[list[str], list[str]]], account: str) -> dict[str, bool]:
    return {d.tool: d.allowed for d in resolve(INSTALLED, policies, MANIFESTS, "whatsapp", account)}


def test_allowed_globally_denied_for_a_channel_reallowed_for_one_account() -> None:
    policies = {
        "*": (["calc.*"], []),
        "whatsapp": ([], ["calc.*"]),
        "whatsapp/vip": (["calc.evaluate"], []),
    }
    assert allowed(policies, "vip")["calc.evaluate"] is True
    assert allowed(policies, "other")["calc.evaluate"] is False
    decisions = resolve(INSTALLED, policies, MANIFESTS, "whatsapp", "vip")
    assert next(d.rule for d in decisions if d.tool == "calc.evaluate") == (
        "allow 'calc.evaluate' at whatsapp/vip"
    )


def test_within_a_scope_deny_beats_allow() -> None:
    assert allowed({"*": (["*"], ["web.*"])}, "a") == {"calc.evaluate": True, "web.fetch": False}


def test_without_rules_each_plugin_default_applies() -> None:
    assert allowed({}, "a") == {"calc.evaluate": True, "web.fetch": False}


def test_an_uninstall_in_a_narrower_scope_wins_and_preinstalled_can_be_removed() -> None:
    rows = [
        *INSTALLED,
        InstalledRow("whatsapp/a", "calc", "removed", "", {}),
        InstalledRow("whatsapp/a", "web", "removed", "", {}),
    ]
    tools = {d.tool for d in resolve(rows, {}, MANIFESTS, "whatsapp", "a")}
    assert tools == set()
    assert {d.tool for d in resolve(rows, {}, MANIFESTS, "whatsapp", "b")} == {
        "calc.evaluate",
        "web.fetch",
    }


def test_the_most_specific_install_gives_the_config() -> None:
    rows = [
        InstalledRow("*", "web", "installed", "1", {"allowlist": ["a.org"]}),
        InstalledRow("whatsapp/b", "web", "installed", "1", {"allowlist": ["b.org"]}),
    ]
    (a,) = resolve(rows, {}, MANIFESTS, "whatsapp", "a")[1:]
    (b,) = resolve(rows, {}, MANIFESTS, "whatsapp", "b")[1:]
    assert (a.config, b.config) == ({"allowlist": ["a.org"]}, {"allowlist": ["b.org"]})
