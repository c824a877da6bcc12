"""The CLI as a user meets it: demo, help, exit codes."""

from __future__ import annotations

import pytest

from tests.conftest import Processes, run_svc

pytestmark = pytest.mark.slow


def test_svc_demo_answers_every_message_and_exits_0(processes: Processes) -> None:
    result = run_svc("demo", env=processes.env(), timeout=90)
    out = result.stdout.decode()
    assert result.returncode == 0, result.stderr.decode()
    assert "bot  < echo: hi there! (#1)" in out
    assert "6/6 replies, 6 MessageSent recorded" in out
    assert "(no reply)" not in out


@pytest.mark.parametrize(
    "argv",
    [[], ["run"], ["demo"], ["chat"], ["status"], ["nats", "serve"], ["streams", "ensure"]],
)
def test_every_command_has_help(processes: Processes, argv: list[str]) -> None:
    result = run_svc(*argv, "--help", env=processes.env(), timeout=30)
    assert result.returncode == 0
    assert "Usage" in result.stdout.decode()


def test_an_unknown_command_fails_with_a_usage_error(processes: Processes) -> None:
    result = run_svc("frobnicate", env=processes.env(), timeout=30)
    assert result.returncode == 2
