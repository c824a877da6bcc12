"""OpenTelemetry: W3C trace context in every message's headers; spans only when exported.

Two modes, chosen once at start by `setup_tracing` (ADR 0036):

- **propagate** (the default: no `OTEL_TRACES_EXPORTER`, or `none`): no span is built.
  A handler runs with the trace context its message carried (the incoming `traceparent`
  passed on unchanged, as a W3C participant that records nothing may do), so what it
  publishes carries the same trace; a message published outside a handler starts a new,
  unsampled trace. Costs a header parse and a context switch per message.
- **spans** (`OTEL_TRACES_EXPORTER=console|otlp`): one span per handled or published
  message, sampled by `OTEL_TRACES_SAMPLER` / `OTEL_TRACES_SAMPLER_ARG` (default
  `parentbased_traceidratio` at 1.0). A message whose parent was not sampled is handled
  without building a span, as the parent-based sampler would drop it anyway.
"""

from __future__ import annotations

import os
import random
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager
from types import TracebackType

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import (
    ALWAYS_OFF,
    ALWAYS_ON,
    ParentBased,
    Sampler,
    TraceIdRatioBased,
)
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, SpanKind, TraceFlags

from services.runtime.errors import ConfigError

_TRACER_NAME = "switchboard"
_TRACEPARENT = "traceparent"
_TRACESTATE = "tracestate"
_installed = False
# True once an exporter is configured: spans are built (and sampled). False: propagate only.
_spans = False
_parent_based = True


def setup_tracing(service_name: str, env: Mapping[str, str] | None = None) -> None:
    """Choose the process's tracing mode once: spans with the exporter and sampler `OTEL_*`
    select, or trace context propagated without spans. ConfigError (one line) on a bad value."""
    global _installed, _spans, _parent_based
    if _installed:
        return
    env = os.environ if env is None else env
    exporter = _exporter(env.get("OTEL_TRACES_EXPORTER", "none").strip().lower())
    sampler, parent_based = sampler_from(env)
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true" or exporter is None:
        # Nothing is exported: trace context still flows in headers, no span is built.
        # The first context lookup loads OpenTelemetry's runtime context (entry points:
        # milliseconds); done here, at start, not in the first message's path.
        trace.get_current_span()
        _installed = True
        return
    name = env.get("OTEL_SERVICE_NAME") or service_name
    provider = TracerProvider(resource=Resource.create({"service.name": name}), sampler=sampler)
    provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    _spans, _parent_based, _installed = True, parent_based, True


_SAMPLERS = (
    "always_on",
    "always_off",
    "traceidratio",
    "parentbased_always_on",
    "parentbased_always_off",
    "parentbased_traceidratio",
)


def sampler_from(env: Mapping[str, str]) -> tuple[Sampler, bool]:
    """The sampler `OTEL_TRACES_SAMPLER` / `_ARG` name (default parentbased_traceidratio,
    ratio 1.0), and whether it follows the parent's decision."""
    name = (env.get("OTEL_TRACES_SAMPLER") or "parentbased_traceidratio").strip().lower()
    if name not in _SAMPLERS:
        raise ConfigError(
            f"OTEL_TRACES_SAMPLER={name!r} is invalid: expected one of {', '.join(_SAMPLERS)}"
        )
    base: Sampler
    if name.endswith("traceidratio"):
        raw = (env.get("OTEL_TRACES_SAMPLER_ARG") or "1.0").strip()
        try:
            ratio = float(raw)
        except ValueError:
            ratio = -1.0
        if not 0.0 <= ratio <= 1.0:
            raise ConfigError(
                f"OTEL_TRACES_SAMPLER_ARG={raw!r} is invalid: expected a ratio from 0 to 1"
                f" for {name} (e.g. 0.1 samples one trace in ten)"
            )
        base = TraceIdRatioBased(ratio)
    else:
        base = ALWAYS_ON if name.endswith("always_on") else ALWAYS_OFF
    if name.startswith("parentbased_"):
        return ParentBased(base), True
    return base, False


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
    if _tracer is None:
        _tracer = trace.get_tracer(_TRACER_NAME)
    return _tracer


def spans_enabled() -> bool:
    """True when spans are built and exported; False: trace context is only propagated."""
    return _spans


class _Carried(NonRecordingSpan):
    """The trace context a message carried (or a new, unsampled one), current while its
    handler runs; remembers its header text so a publish writes it without formatting."""

    def __init__(self, context: SpanContext, traceparent: str, tracestate: str | None) -> None:
        super().__init__(context)
        self.traceparent = traceparent
        self.tracestate = tracestate


_rand = random.getrandbits


def _new_trace() -> _Carried:
    trace_id, span_id = _rand(128) or 1, _rand(64) or 1
    context = SpanContext(trace_id, span_id, is_remote=False, trace_flags=TraceFlags(0))
    return _Carried(context, f"00-{trace_id:032x}-{span_id:016x}-00", None)


def _carried(headers: Mapping[str, str] | None) -> _Carried | None:
    """The trace context in `headers` (W3C traceparent, version 00), None if absent or bad."""
    value = headers.get(_TRACEPARENT) if headers else None
    if value is None or len(value) != 55:
        return None
    version, trace_hex, span_hex, flags_hex = value.split("-") if value.count("-") == 3 else "xxxx"
    if version != "00" or len(trace_hex) != 32 or len(span_hex) != 16 or len(flags_hex) != 2:
        return None
    try:
        trace_id, span_id, flags = int(trace_hex, 16), int(span_hex, 16), int(flags_hex, 16)
    except ValueError:
        return None
    if not trace_id or not span_id:
        return None
    context = SpanContext(trace_id, span_id, is_remote=True, trace_flags=TraceFlags(flags))
    return _Carried(context, value, headers.get(_TRACESTATE) if headers else None)


def trace_context() -> dict[str, str]:
    """Fresh headers carrying the current trace context (a new trace outside a handler)."""
    span = trace.get_current_span()
    if isinstance(span, _Carried):
        if span.tracestate:
            return {_TRACEPARENT: span.traceparent, _TRACESTATE: span.tracestate}
        return {_TRACEPARENT: span.traceparent}
    headers: dict[str, str] = {}
    if span.get_span_context().is_valid:
        propagate.inject(headers)  # an SDK span (spans mode) or a caller's own
        if _TRACEPARENT in headers:
            return headers
    return {_TRACEPARENT: _new_trace().traceparent}


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Write the current trace context (`traceparent`) into `headers`."""
    headers.update(trace_context())
    return headers


@contextmanager
def publish_span(subject: str, msg_id: str) -> Iterator[dict[str, str]]:
    """Headers carrying the trace context: the current one when a handler publishes (its
    consumer span already covers the work); else, in spans mode, a new producer span's."""
    if not _spans or trace.get_current_span().get_span_context().is_valid:
        yield trace_context()
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
        yield trace_context()


class _Current:
    """Makes `span` the current span for a `with` block: a class, not a generator, as it
    runs for every handled message."""

    __slots__ = ("span", "token")

    def __init__(self, span: Span) -> None:
        self.span = span
        self.token: object = None

    def __enter__(self) -> Span:
        self.token = otel_context.attach(trace.set_span_in_context(self.span))
        return self.span

    def __exit__(
        self,
        kind: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        otel_context.detach(self.token)  # type: ignore[arg-type]


def consume_span(
    subject: str, headers: Mapping[str, str] | None, consumer: str, msg_id: str = ""
) -> AbstractContextManager[Span]:
    """A `with` block for one handled message, in the trace its headers carry: a span
    (spans mode, sampled parent or none) or just that trace context made current."""
    carried = _carried(headers)
    unsampled = carried is not None and not carried.get_span_context().trace_flags.sampled
    if not _spans or (unsampled and _parent_based):
        return _Current(carried or _new_trace())
    return _consume_span(subject, carried, consumer, msg_id)


@contextmanager
def _consume_span(
    subject: str, carried: _Carried | None, consumer: str, msg_id: str
) -> Iterator[Span]:
    parent = trace.set_span_in_context(carried) if carried is not None else None
    with tracer().start_as_current_span(
        f"process {subject.split('.', 1)[0]}",
        context=parent,
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
