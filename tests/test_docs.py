"""Every `svc` command the docs show exists, with the options they give it: a renamed
command or option that forgets the README, the runbook or deploy/ makes them lie to the
person following them (the real WhatsApp path is followed by hand, with a phone)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import typer.main

from services.cli import app

ROOT = Path(__file__).resolve().parent.parent
DOCS = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "deploy" / "README.md",
    *sorted(p for p in (ROOT / "deploy").rglob("*") if p.is_file() and p.suffix != ".md"),
]
# `svc` and what follows it, up to the end of the command (a pipe, `;`, `&&`, a comment).
_INVOCATION = re.compile(r"(?:^|(?<=[\s`/(]))svc ((?:[^\s`|;&#)]+ ?)+)")
# Outside markdown (comments of deploy files) only what is written as a command.
_COMMAND_LINE = re.compile(r"(?:^|(?<=/)|(?<=-- )|(?<=\$ ))svc ((?:[^\s`|;&#)]+ ?)+)")
_CODE_SPAN = re.compile(r"`([^`\n]+)`")
_FENCE = re.compile(r"^\s*```")


def _code(path: Path) -> list[tuple[int, str]]:
    """The code of a doc: fenced blocks and inline spans of markdown, every line elsewhere."""
    lines = path.read_text().splitlines()
    if path.suffix != ".md":
        return list(enumerate(lines, 1))
    found: list[tuple[int, str]] = []
    fenced = False
    for n, line in enumerate(lines, 1):
        if _FENCE.match(line):
            fenced = not fenced
            continue
        if fenced:
            found.append((n, line))
        else:
            found.extend((n, span) for span in _CODE_SPAN.findall(line))
    return found


def invocations() -> list[tuple[str, str]]:
    """(where, the words after `svc`) for every `svc ...` command in the docs."""
    found = []
    for path in DOCS:
        for n, code in _code(path):
            pattern = _INVOCATION if path.suffix == ".md" else _COMMAND_LINE
            for match in pattern.finditer(code):
                where = f"{path.relative_to(ROOT)}:{n}"
                found.append((where, match.group(1).strip()))
    return found


def _problem(command_line: str) -> str | None:
    """Why `svc <words>` does not parse as a command of ours, or None (also for prose
    that only mentions svc: `real svc processes`)."""
    command: Any = typer.main.get_command(app)
    words = [w.strip("[]\"'") for w in command_line.split()]
    if not words or words == ["--help"]:
        return None
    if words[0] not in command.commands:
        return None  # prose, not a command (sub-commands and options are checked strictly)
    path = ["svc"]
    i = 0
    while hasattr(command, "commands") and i < len(words):
        alternatives = re.split(r"[|/]", words[i])  # `ls|show|requeue`, `install/config`
        if not all(a in command.commands for a in alternatives):
            if words[i].startswith("-"):
                break
            return f"{' '.join(path)} has no command {words[i]!r}"
        if len(alternatives) > 1:
            return None  # a summary of several commands: each exists
        command = command.commands[alternatives[0]]
        path.append(alternatives[0])
        i += 1
    if hasattr(command, "commands") and len(path) == 1:
        return "no command given"
    options = {opt for param in command.params for opt in (*param.opts, *param.secondary_opts)}
    for word in words[i:]:
        option = word.split("=")[0]
        if option.startswith("--") and option not in options:
            return f"{' '.join(path)} has no option {option!r} (it has {sorted(options)})"
    return None


def test_every_svc_command_in_the_docs_exists_with_its_options() -> None:
    found = invocations()
    # The docs show many commands: an extraction that finds few is itself broken.
    assert len(found) > 100, found
    assert any(words.startswith("whatsapp pair") for _, words in found)
    wrong = [
        f"{where}: svc {words}: {problem}"
        for where, words in found
        if (problem := _problem(words)) is not None
    ]
    assert wrong == []


def test_a_misspelt_command_or_option_is_caught() -> None:
    assert _problem("whatsapp pair sales --phone +15550000001") is None
    assert _problem("whatsapp pairs sales") == "svc whatsapp has no command 'pairs'"
    assert (_problem("whatsapp pair sales --device x") or "").startswith(
        "svc whatsapp pair has no option '--device'"
    )
    assert _problem("accounts resume sales --reason x") is None
