"""Metrics and readiness in-process (ADR 0029): the Prometheus text rendering, the label
cache, the exporter choice, the lag sampler on a real server, the instrument call sites,
/readyz, and that the runbook table and the Grafana dashboard name only real metrics."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader

from contracts import subjects
from contracts.codec import encode
from contracts.events import TokenUsage, TurnCompleted, TurnFailed
from contracts.payloads import SimControl
from services import app
from services.core.llm import ToolCall, ToolSpec
from services.core.tools import BoundTool, ToolBox
from services.core.worker import count_turn
from services.ops.accounts import handover
from services.runtime import metrics
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.health import READINESS, Flag, Readiness
from services.runtime.http import http_app, serve
from services.runtime.metrics import (
    ConsumerLag,
    FastCounter,
    GaugeState,
    Instruments,
    LagSampler,
    labels,
    prometheus_text,
)
from services.runtime.nats_server import EmbeddedNats
from services.runtime.settings import load_settings
from tests.conftest import role, session_board, wait_until
from tests.whatsapp.fake_graph import http_request

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def measured(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], str]]:
    """The process's instruments on a private provider; yields a render of what they hold."""
    metrics.setup_metrics("test", {})  # done first: a role started later must not redo it
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    state = GaugeState()
    monkeypatch.setattr(metrics, "STATE", state)
    monkeypatch.setattr(metrics, "_instruments", Instruments(provider.get_meter("t"), state))
    yield lambda: prometheus_text(reader.get_metrics_data())
    provider.shutdown()


def value(text: str, series: str) -> float:
    """The value of one exact series line (`name{labels}`) in Prometheus text."""
    for line in text.splitlines():
        if line.rsplit(" ", 1)[0] == series:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{series} not in:\n{text}")


def test_counters_histograms_and_gauges_render_as_prometheus_text(
    measured: Callable[[], str],
) -> None:
    m = metrics.instruments()
    where = labels(("channel", "whatsapp"), ("account", "a1"))
    m.messages_received.add(2, where)
    m.turn_duration.record(0.02, labels(("outcome", "completed"), ("model", 'odd"\\name')))
    m.turn_duration.record(3.0, labels(("outcome", "completed"), ("model", 'odd"\\name')))
    metrics.account_parked("whatsapp", "a1", "needs_pairing")
    metrics.STATE.consumers["INBOUND", "core"] = ConsumerLag(pending=7, redelivered=1)

    text = measured()

    assert "# TYPE switchboard_messages_received_total counter" in text
    assert value(text, 'switchboard_messages_received_total{channel="whatsapp",account="a1"}') == 2
    # Histogram buckets are cumulative and end in +Inf == count; label values are escaped.
    hist = 'outcome="completed",model="odd\\"\\\\name"'
    assert value(text, f'switchboard_turn_duration_seconds_bucket{{{hist},le="0.025"}}') == 1
    assert value(text, f'switchboard_turn_duration_seconds_bucket{{{hist},le="2.5"}}') == 1
    assert value(text, f'switchboard_turn_duration_seconds_bucket{{{hist},le="5"}}') == 2
    assert value(text, f'switchboard_turn_duration_seconds_bucket{{{hist},le="+Inf"}}') == 2
    assert value(text, f"switchboard_turn_duration_seconds_count{{{hist}}}") == 2
    assert value(text, f"switchboard_turn_duration_seconds_sum{{{hist}}}") == pytest.approx(3.02)
    assert "# TYPE switchboard_parked_accounts gauge" in text
    parked = 'switchboard_parked_accounts{channel="whatsapp",reason="needs_pairing"}'
    assert value(text, parked) == 1
    assert value(text, 'switchboard_consumer_pending{stream="INBOUND",consumer="core"}') == 7
    assert value(text, 'switchboard_consumer_redelivered{stream="INBOUND",consumer="core"}') == 1

    metrics.account_parked("whatsapp", "a1", None)  # resumed: no longer counted
    assert "switchboard_parked_accounts{" not in measured()


def test_a_label_set_is_built_once_and_shared() -> None:
    first = labels(("channel", "whatsapp"), ("account", "x"))
    assert labels(("channel", "whatsapp"), ("account", "x")) is first
    with pytest.raises(TypeError):
        first["chat"] = "c@s.whatsapp.net"  # type: ignore[index]


def test_metrics_exporters_are_checked_with_one_line() -> None:
    assert metrics._readers("prometheus") == []
    assert metrics._readers("none") == []
    with pytest.raises(ConfigError, match=r"OTEL_METRICS_EXPORTER='zipkin' is invalid") as bad:
        metrics._readers("zipkin")
    assert "\n" not in str(bad.value)
    try:
        import opentelemetry.exporter.otlp.proto.http.metric_exporter  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"pip install 'switchboard\[otlp\]'") as missing:
            metrics._readers("otlp")
        assert "\n" not in str(missing.value)


def test_a_recorded_turn_counts_its_outcome_latency_and_tokens_by_model(
    measured: Callable[[], str],
) -> None:
    common = {"account": "a1", "chat": "c@s.whatsapp.net", "inbound_id": "i1", "model": "m"}
    count_turn(
        TurnCompleted(
            id="t1",
            **common,
            latency_ms=1500,
            usage=TokenUsage(prompt_tokens=30, completion_tokens=4),
        )
    )
    count_turn(TurnCompleted(id="t2", **common, skipped="status update"))
    count_turn(TurnFailed(id="t3", **common, error="llm: down"))
    text = measured()
    by = 'channel="whatsapp",account="a1",outcome="{}",model="m"'
    for outcome in ("completed", "skipped", "failed"):
        assert value(text, f"switchboard_turns_total{{{by.format(outcome)}}}") == 1
    assert value(text, f"switchboard_turn_duration_seconds_sum{{{by.format('completed')}}}") == 1.5
    assert value(text, 'switchboard_tokens_total{model="m",kind="prompt"}') == 30
    assert value(text, 'switchboard_tokens_total{model="m",kind="completion"}') == 4
    assert "c@s.whatsapp.net" not in text


async def test_tool_calls_are_labelled_by_offered_tool_never_by_a_name_the_model_made_up(
    measured: Callable[[], str],
) -> None:
    async def clock(_: dict[str, object]) -> str:
        return "12:00"

    box = ToolBox([BoundTool(ToolSpec("clock", "the time", {}), clock)], timeout=5)
    await box.run(ToolCall(id="1", name="clock", arguments={}))
    await box.run(ToolCall(id="2", name="secret-chat-1234", arguments={}))
    text = measured()
    assert value(text, 'switchboard_tool_calls_total{tool="clock",outcome="ok"}') == 1
    assert value(text, 'switchboard_tool_calls_total{tool="unknown",outcome="unknown_tool"}') == 1
    assert "secret-chat-1234" not in text


async def test_the_lag_sampler_reads_consumer_and_projection_lag_once_per_interval(
    bus: Bus, measured: Callable[[], str]
) -> None:
    # Given a durable consumer with 3 messages it has not read, and a projection at 1.
    await bus.js.add_consumer(
        "SIM",
        config=ConsumerConfig(
            durable_name="lag-test",
            filter_subject=subjects.sim_in("lagged"),
            ack_policy=AckPolicy.EXPLICIT,
        ),
    )
    for i in range(3):
        await bus.js.publish(subjects.sim_in("lagged"), b"{}", headers={"Nats-Msg-Id": f"l{i}"})
    undo_consumer = metrics.consumer_bound("SIM", "lag-test")
    undo_projection = metrics.projection_running("test", "SIM", lambda: 1)
    try:
        assert (
            value(measured(), 'switchboard_consumer_pending{stream="SIM",consumer="lag-test"}') == 0
        )

        await LagSampler(bus).sample()

        text = measured()
        assert value(text, 'switchboard_consumer_pending{stream="SIM",consumer="lag-test"}') == 3
        assert value(text, 'switchboard_projection_lag{projection="test"}') == 2
    finally:
        undo_consumer()
        undo_projection()
    assert "lag-test" not in measured()  # a stopped consumer is no longer reported


async def test_readyz_lists_each_unmet_condition_on_its_own_line_then_answers_ready(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    readiness = Readiness()
    monkeypatch.setattr("services.runtime.http.READINESS", readiness)
    streams, role = Flag("not provisioned yet"), Flag("starting")
    readiness.add("streams", streams.check)
    remove_role = readiness.add("role core", role.check)

    def broken() -> str | None:
        raise RuntimeError("bug")

    remove_broken = readiness.add("broken", broken)
    async with serve(http_app(), "127.0.0.1", 0) as server:

        async def readyz() -> tuple[int, bytes]:
            answer = await asyncio.to_thread(http_request, f"{server.url}/readyz")
            return answer.status, answer.body

        assert await readyz() == (
            503,
            b"not ready: streams: not provisioned yet\n"
            b"not ready: role core: starting\n"
            b"not ready: broken: check failed: RuntimeError: bug\n",
        )
        remove_broken()
        streams.met()
        assert await readyz() == (503, b"not ready: role core: starting\n")
        role.met()
        assert await readyz() == (200, b"ready\n")
        remove_role()
        readiness.add("role core", Flag("starting").check)  # a new role instance: unmet
        assert (await readyz())[0] == 503


def exposed_series() -> set[str]:
    """Every series name the instruments can expose (each touched once)."""
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    state = GaugeState(
        parked={("whatsapp", "a"): "banned"},
        consumers={("S", "c"): ConsumerLag()},
        projection_lag={"p": 0},
    )
    instruments = Instruments(provider.get_meter("t"), state)
    for instrument in vars(instruments).values():
        if hasattr(instrument, "add"):
            instrument.add(1)
        else:
            instrument.record(1.0)
    text = prometheus_text(reader.get_metrics_data())
    provider.shutdown()
    return {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line[:1] != "#"}


def metric_names() -> set[str]:
    """The metric names (histograms once, without their _bucket/_sum/_count series)."""
    return {re.sub(r"_(bucket|sum|count)$", "", s) for s in exposed_series()}


def test_every_metric_is_in_the_runbook_table_and_the_table_names_only_real_ones() -> None:
    runbook = (ROOT / "docs" / "runbook.md").read_text()
    section = runbook.split("## Metrics and health", 1)[1].split("\n## ", 1)[0]
    documented = set(re.findall(r"^\| `(switchboard_\w+)`", section, re.MULTILINE))
    assert documented == metric_names()


def test_the_grafana_dashboard_is_valid_json_and_queries_only_real_metrics() -> None:
    dashboard = json.loads((ROOT / "deploy" / "grafana" / "switchboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 10
    used = {name for e in exprs for name in re.findall(r"\bswitchboard_\w+", e)}
    assert used, "the dashboard queries no switchboard metric"
    assert used <= exposed_series(), used - exposed_series()
    # Every metric has a panel.
    assert {re.sub(r"_(bucket|sum|count)$", "", u) for u in used} == metric_names()


async def test_an_owner_counts_acquisitions_operator_handovers_and_its_parked_account(
    bus: Bus, measured: Callable[[], str]
) -> None:
    where = 'channel="whatsapp",account="default"'

    def counted(series: str) -> float:
        text = measured()
        return value(text, series) if series in text else 0

    async with role(bus, "whatsapp"):
        acquired = f"switchboard_lease_acquisitions_total{{{where}}}"
        await wait_until(lambda: counted(acquired) == 1, 20, "the lease acquired")

        await handover(bus, "default", timeout=10)

        handed = f'switchboard_lease_handovers_total{{{where},reason="operator"}}'
        assert counted(handed) == 1
        await wait_until(lambda: counted(acquired) == 2, 30, "the lease taken again")

        # Once the new session is up (the sim's control subject is plain NATS: a signal
        # published before the session subscribes reaches nobody)
        async def connected() -> bool:
            status = await session_board(bus, "default")
            return status is not None and status.state == "connected"

        await wait_until(connected, 20, "the new session connected")
        # The network logs the session out: the account is parked, labelled by its state.
        logout = SimControl(event="logged_out", reason="bye from +4915550001")
        await bus.nc.publish(subjects.sim_control("default"), encode(logout))
        await wait_until(
            lambda: "switchboard_parked_accounts{" in measured(), 20, "the account parked"
        )
        text = measured()
        [parked] = [ln for ln in text.splitlines() if ln.startswith("switchboard_parked_")]
        assert parked.startswith('switchboard_parked_accounts{channel="whatsapp",reason="')
        assert parked.endswith(" 1")
        assert "bye from" not in text
        assert "4915550001" not in text


async def test_a_role_is_not_ready_between_provisioning_and_its_first_step(
    nats_server: EmbeddedNats, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a role started by `system` against a fresh server: what /readyz would answer
    # at the role task's first step, when provisioning is done and nothing else has run
    seen: list[list[str]] = []
    real_run_role = app.run_role

    async def first_step(*args: Any, **kwargs: Any) -> None:
        seen.append(READINESS.unmet())
        await real_run_role(*args, **kwargs)

    monkeypatch.setattr(app, "run_role", first_step)
    settings = load_settings({"NATS_URL": nats_server.url, "SVC_DATA_DIR": str(tmp_path)})
    async with app.system(settings, "core") as (_, stop, task):
        await wait_until(lambda: READINESS.unmet() == [], 30, "the role ready")
        stop.set()
        await task
    # Then it was not ready yet: the role's own check said so (not a 200 in between)
    assert seen == [["role core: starting"]]


def test_a_fast_counter_sums_by_label_set_whatever_mapping_carries_it() -> None:
    reader = InMemoryMetricReader()
    provider = MeterProvider(metric_readers=[reader])
    counter = FastCounter(provider.get_meter("t"), "switchboard_things", "Things.")
    cached = labels(("channel", "whatsapp"), ("account", "a"))
    counter.add(1, cached)
    counter.add(2, cached)
    counter.add(1, {"account": "a", "channel": "whatsapp"})  # same set, another mapping
    counter.add(5, labels(("channel", "whatsapp"), ("account", "b")))
    text = prometheus_text(reader.get_metrics_data())
    assert "# TYPE switchboard_things_total counter" in text
    assert value(text, 'switchboard_things_total{channel="whatsapp",account="a"}') == 4
    assert value(text, 'switchboard_things_total{channel="whatsapp",account="b"}') == 5
    counter.add(1, cached)  # cumulative across collections, like an SDK counter
    text = prometheus_text(reader.get_metrics_data())
    assert value(text, 'switchboard_things_total{channel="whatsapp",account="a"}') == 5
    provider.shutdown()
