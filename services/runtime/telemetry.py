"""OpenTelemetry: W3C trace context in message headers, one span per handled message.

A TracerProvider is always installed so every published message carries a valid
`traceparent`; spans are exported only when `OTEL_TRACES_EXPORTER` asks for it
(`console`, or `otlp` with the `otlp` extra installed). Off by default.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
from opentelemetry.trace import Span, SpanKind

from services.runtime.errors import ConfigError

_TRACER_NAME = "switchboard"
_installed = False


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> None:
    """Install the process's TracerProvider once, with the exporter `OTEL_*` selects."""
    global _installed
    if _installed:
        return
    env = os.environ if env is None else env
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        _installed = True
        return
    name = env.get("OTEL_SERVICE_NAME") or service_name
    exporter = _exporter(env.get("OTEL_TRACES_EXPORTER", "none").strip().lower())
    resource = Resource.create({"service.name": name})
    if exporter is None:
        # Nothing is exported: keep trace context flowing (valid, unsampled spans still
        # yield a traceparent) without paying to record spans on the hot path.
        provider = TracerProvider(resource=resource, sampler=ALWAYS_OFF)
    else:
        provider = TracerProvider(resource=resource)  # OTEL_TRACES_SAMPLER applies
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _installed = True


def shutdown_tracing() -> None:
    """Flush exported spans (no-op without an SDK provider)."""
    provider = trace.get_tracer_provider()
    if isinstance(provider, TracerProvider):
        provider.force_flush(timeout_millis=2000)


def _exporter(name: str) -> SpanExporter | None:
    if name in ("", "none"):
        return None
    if name == "console":
        return ConsoleSpanExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
                OTLPSpanExporter,
            )
        except ImportError:
            raise ConfigError(
                "OTEL_TRACES_EXPORTER='otlp' needs the exporter: pip install 'switchboard[otlp]'"
            ) from None
        # Typed when the extra is installed, Any when not: the annotation fits both.
        exporter: SpanExporter = OTLPSpanExporter()
        return exporter
    raise ConfigError(f"OTEL_TRACES_EXPORTER={name!r} is invalid: expected none, console or otlp")


_tracer: trace.Tracer | None = None


def tracer() -> trace.Tracer:
    """The switchboard tracer (looked up once: get_tracer is costly on a hot path)."""
    global _tracer
    if _tracer is None or not _installed:
        _tracer = trace.get_tracer(_TRACER_NAME)
    return _tracer


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (`traceparent`) into `headers`."""
    propagate.inject(headers)
    return headers


@contextmanager
def publish_span(subject: str, msg_id: str) -> Iterator[dict[str, str]]:
    """Headers carrying the trace context: the current span's when a handler publishes
    (its consumer span already covers the work), else a new producer span's."""
    if trace.get_current_span().get_span_context().is_valid:
        yield inject({})
        return
    with tracer().start_as_current_span(
        f"send {subject.split('.', 1)[0]}",
        kind=SpanKind.PRODUCER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "send",
            "messaging.destination.name": subject,
            "messaging.message.id": msg_id,
        },
    ):
        yield inject({})


@contextmanager
def consume_span(
    subject: str, headers: Mapping[str, str] | None, consumer: str, msg_id: str = ""
) -> Iterator[Span]:
    """One span per handled message, parented on the trace context in its headers."""
    ctx = propagate.extract(dict(headers or {}))
    with tracer().start_as_current_span(
        f"process {subject.split('.', 1)[0]}",
        context=ctx,
        kind=SpanKind.CONSUMER,
        attributes={
            "messaging.system": "nats",
            "messaging.operation.type": "process",
            "messaging.destination.name": subject,
            "messaging.message.id": msg_id,
            "messaging.consumer.group.name": consumer,
        },
    ) as span:
        yield span
