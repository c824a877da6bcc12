"""Tracing at default settings (ADR 0036): trace context in every message's headers, the
carried context passed on unchanged, no span built; the sampler from OTEL_* validated."""

from __future__ import annotations

import re

import pytest
from opentelemetry import trace

from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.telemetry import consume_span, sampler_from, spans_enabled, trace_context
from tests.conftest import stream_raw

TRACEPARENT = re.compile(r"\A00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}\Z")
CARRIED = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def test_outside_a_handler_each_publish_starts_its_own_trace() -> None:
    assert not spans_enabled()  # no exporter configured in the test process
    first, second = trace_context()["traceparent"], trace_context()["traceparent"]
    assert TRACEPARENT.match(first)
    assert TRACEPARENT.match(second)
    assert first.split("-")[1] != second.split("-")[1]


def test_a_handler_runs_in_the_trace_its_message_carried_and_passes_it_on_unchanged() -> None:
    headers = {"traceparent": CARRIED, "tracestate": "vendor=x", "Nats-Msg-Id": "m1"}
    with consume_span("inbound.whatsapp.a.c", headers, "core", "m1") as span:
        # no span was built: the current context is exactly the one the message carried
        assert not span.is_recording()
        current = trace.get_current_span().get_span_context()
        assert format(current.trace_id, "032x") == CARRIED.split("-")[1]
        assert format(current.span_id, "016x") == CARRIED.split("-")[2]
        assert trace_context() == {"traceparent": CARRIED, "tracestate": "vendor=x"}
    # and the context ends with the block
    assert trace_context()["traceparent"] != CARRIED


@pytest.mark.parametrize(
    "bad",
    [
        None,
        {},
        {"traceparent": "garbage"},
        {"traceparent": "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"},
        {"traceparent": "00-00000000000000000000000000000000-b7ad6b7169203331-01"},
        {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333z-01"},
    ],
)
def test_a_message_without_a_usable_traceparent_is_handled_in_a_new_trace(
    bad: dict[str, str] | None,
) -> None:
    with consume_span("inbound.whatsapp.a.c", bad, "core") as span:
        assert span.get_span_context().is_valid
        passed_on = trace_context()["traceparent"]
        assert TRACEPARENT.match(passed_on)
        assert passed_on.split("-")[1] != CARRIED.split("-")[1]


async def test_every_stored_message_carries_a_traceparent_without_any_tracing_setup(
    bus: Bus,
) -> None:
    # (a user's message on the sim network: nothing in this test answers it)
    await bus.publish_bytes("sim.whatsapp.a.in", b'{"chat": "c"}', msg_id="m1")
    ((_, _, headers),) = await stream_raw(bus, "SIM")
    assert TRACEPARENT.match(headers["traceparent"])
    assert headers["Nats-Msg-Id"] == "m1"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER='sometimes' is invalid"),
        (
            {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "2"},
            "OTEL_TRACES_SAMPLER_ARG='2' is invalid: expected a ratio from 0 to 1",
        ),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "half"},
            "OTEL_TRACES_SAMPLER_ARG='half' is invalid",
        ),
    ],
)
def test_a_bad_sampler_setting_is_one_clear_line(env: dict[str, str], expected: str) -> None:
    with pytest.raises(ConfigError) as caught:
        sampler_from(env)
    assert expected in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_default_sampler_follows_the_parent_and_samples_every_root() -> None:
    sampler, parent_based = sampler_from({})
    assert parent_based
    assert "ParentBased" in sampler.get_description()
    assert "TraceIdRatioBased{1.0}" in sampler.get_description()
    ratio, parent_based = sampler_from(
        {"OTEL_TRACES_SAMPLER": "parentbased_traceidratio", "OTEL_TRACES_SAMPLER_ARG": "0.1"}
    )
    assert parent_based
    assert "TraceIdRatioBased{0.1}" in ratio.get_description()
