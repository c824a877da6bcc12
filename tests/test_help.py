"""`svc --help` maps every role and command group to the modules that implement it, so
any behaviour is at most two hops away (the help, then docs/architecture.md)."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path
from typing import Any

import typer.main

from services.cli import app
from services.runtime.settings import ROLES
from tests.conftest import run_svc

ROOT = Path(__file__).resolve().parent.parent
_PATH = re.compile(r"\b(?:services|contracts|projections|docs|tests)/[\w./-]*")
_IMPORT = re.compile(r"^\s*from (services\.[\w.]+) import", re.MULTILINE)
_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def _svc() -> Any:
    """The click group typer builds for `svc` (typer vendors click: typed loosely here)."""
    return typer.main.get_command(app)


def _epilog() -> str:
    epilog = _svc().epilog
    assert epilog, "svc --help has no epilog"
    return epilog


def _section(title: str) -> dict[str, str]:
    """The epilog's lines under `title`: name -> the rest of its line."""
    rows: dict[str, str] = {}
    inside = False
    for line in _epilog().splitlines():
        if not line.startswith(" "):
            inside = line.startswith(title)
            continue
        if inside:
            name, _, rest = line.strip().partition("  ")
            rows[name] = rest.strip()
    return rows


def _modules_used_by(command: Any) -> set[str]:
    """The services modules a command's callbacks import (the code behind the command)."""
    subcommands = getattr(command, "commands", {})
    callbacks = [command.callback, *(sub.callback for sub in subcommands.values())]
    found: set[str] = set()
    for callback in callbacks:
        if callback is not None:
            found |= set(_IMPORT.findall(inspect.getsource(inspect.unwrap(callback))))
    return found


def test_the_epilog_names_every_role() -> None:
    roles = _section("Roles")
    assert set(ROLES) <= set(roles), f"roles missing from svc --help: {set(ROLES) - set(roles)}"
    for role in ROLES:
        assert _PATH.search(roles[role]), f"role {role} names no module: {roles[role]!r}"


def test_the_epilog_names_every_command_group_with_the_module_its_code_imports() -> None:
    svc = _svc()
    commands = _section("Commands")
    assert len(svc.commands) >= 11, list(svc.commands)
    for name in svc.commands:
        assert name in commands, f"svc {name} is missing from the epilog of svc --help"
        named = {p.removesuffix(".py").replace("/", ".") for p in _PATH.findall(commands[name])}
        used = _modules_used_by(svc.commands[name])
        assert used, f"svc {name}: no services module imported by its code?"
        assert named & used, f"svc {name}: the epilog names {named}, its code imports {used}"


def test_every_path_the_epilog_names_exists() -> None:
    paths = _PATH.findall(_epilog())
    assert len(paths) >= 20, paths
    missing = [p for p in paths if not (ROOT / p.rstrip(".")).exists()]
    assert not missing, f"svc --help names paths that do not exist: {missing}"
    assert "docs/architecture.md" in paths


def test_svc_help_prints_the_epilog_unwrapped_in_an_80_column_terminal() -> None:
    env = {**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"}
    result = run_svc("--help", env=env, timeout=60)
    assert result.returncode == 0, result.stderr.decode()
    shown = {line.strip() for line in _ANSI.sub("", result.stdout.decode()).splitlines()}
    for line in _epilog().splitlines():
        assert line.strip() in shown, f"wrapped or missing in svc --help: {line.strip()!r}"


def test_every_module_path_the_architecture_page_names_exists() -> None:
    # The "where things live" table and the prose name modules by path: a move that
    # forgets the page makes it lie, so every path it names must exist.
    page = (ROOT / "docs" / "architecture.md").read_text()
    # (a path inside a data directory, `$SVC_DATA_DIR/projections/...`, is not a module)
    in_repo = re.compile(r"(?<![\w/$])(?:services|contracts|projections|docs|tests)/[\w./-]*")
    named = {m.group(0).rstrip(".") for m in in_repo.finditer(page)}
    short = {
        f"services/{m.group(1)}"
        for m in re.finditer(
            r"`((?:channel|core|runtime|whatsapp|plugins|ops)/[\w./-]+\.py)`", page
        )
    }
    missing = sorted(p for p in named | short if not (ROOT / p).exists())
    assert len(named | short) > 30
    assert missing == []
