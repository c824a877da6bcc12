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


def test_spans_are_exported_when_otel_asks_for_the_console(processes: Processes) -> None:
    env = processes.env(OTEL_TRACES_EXPORTER="console")
    result = run_svc("demo", "--chats", "1", "--messages", "1", env=env, timeout=90)
    assert result.returncode == 0, result.stderr.decode()
    out = result.stdout.decode()
    assert '"name": "process inbound"' in out
    assert '"messaging.system": "nats"' in out


def test_an_unknown_trace_exporter_is_a_config_error(processes: Processes) -> None:
    result = run_svc("demo", env=processes.env(OTEL_TRACES_EXPORTER="zipkin"), timeout=30)
    assert result.returncode == 2
    assert "OTEL_TRACES_EXPORTER='zipkin' is invalid" in result.stderr.decode()
