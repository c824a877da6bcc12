"""Metrics through the OpenTelemetry metrics API (ADR 0029).

One MeterProvider per process, installed by `setup_metrics` (idempotent, like tracing).
It always has an in-memory reader that `GET /metrics` renders as Prometheus text on
scrape (no extra dependency, nothing exported when nobody scrapes), and a periodic OTLP
reader when `OTEL_METRICS_EXPORTER` says `otlp` (the `otlp` extra; refused at start with
one line when it is not installed).

Every name is `switchboard_`-prefixed and every label is low-cardinality (channel,
account, role, outcome, model, tool, reason, stream/consumer -- never a chat, sender, job
or message id). Label sets are built once and cached (`labels`), so the hot path
allocates no attribute dict. Gauges that cost a NATS round trip (consumer lag,
projection lag) are fed by `LagSampler`, one cheap read every `LAG_SAMPLE_INTERVAL`
seconds, never by a scrape.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import os
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import nats.errors
from opentelemetry import metrics as otel_metrics
from opentelemetry.metrics import CallbackOptions, Meter, Observation
from opentelemetry.sdk.metrics import AlwaysOffExemplarFilter, MeterProvider
from opentelemetry.sdk.metrics.export import (
    ConsoleMetricExporter,
    Gauge,
    Histogram,
    InMemoryMetricReader,
    MetricExporter,
    MetricReader,
    MetricsData,
    PeriodicExportingMetricReader,
    Sum,
)
from opentelemetry.sdk.resources import Resource

from services.runtime.errors import ConfigError

if TYPE_CHECKING:
    from services.runtime.bus import Bus

log = logging.getLogger(__name__)

PREFIX = "switchboard_"
# Seconds between two consumer-info / stream-info reads feeding the lag gauges.
LAG_SAMPLE_INTERVAL = 10.0
# Latency buckets in seconds: from a local echo turn (ms) to a slow model with tools.
SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

Labels = Mapping[str, str]


@functools.lru_cache(maxsize=4096)
def labels(*pairs: tuple[str, str]) -> Labels:
    """One read-only attribute mapping per distinct label set, made once and reused."""
    return MappingProxyType(dict(pairs))


class FastCounter:
    """A monotonic counter summed in plain Python and read by an observable counter when
    metrics are collected: `add` is a dict lookup and an addition, not an SDK measurement
    (which builds a Measurement, cleans and hashes its attributes and takes a lock on every
    call; ADR 0036). Renders exactly like an SDK counter (`..._total`)."""

    __slots__ = ("_by_id", "_totals")

    def __init__(self, meter: Meter, name: str, description: str) -> None:
        # attribute set -> [attributes, total]. Label sets from `labels()` (cached, read-only)
        # are also found by identity, so the hot path hashes nothing.
        self._totals: dict[frozenset[tuple[str, object]], list[Any]] = {}
        self._by_id: dict[int, tuple[Labels, list[Any]]] = {}
        meter.create_observable_counter(name, callbacks=[self._observe], description=description)

    def add(self, amount: float, attributes: Labels | None = None) -> None:
        """Count `amount` (>= 0) under `attributes`."""
        hit = self._by_id.get(id(attributes))
        entry = hit[1] if hit is not None and hit[0] is attributes else self._entry(attributes)
        entry[1] += amount

    def _entry(self, attributes: Labels | None) -> list[Any]:
        key = frozenset((attributes or {}).items())
        entry = self._totals.get(key)
        if entry is None:
            entry = self._totals.setdefault(key, [MappingProxyType(dict(attributes or {})), 0])
        if isinstance(attributes, MappingProxyType):  # immutable: safe to know by identity
            self._by_id[id(attributes)] = (attributes, entry)  # the reference keeps the id
        return entry

    def _observe(self, _: CallbackOptions) -> Iterable[Observation]:
        return [Observation(total, attributes) for attributes, total in list(self._totals.values())]


class Instruments:
    """Every switchboard instrument, made once on one meter."""

    def __init__(self, meter: Meter, state: GaugeState) -> None:
        histogram = meter.create_histogram

        def counter(name: str, *, description: str) -> FastCounter:
            return FastCounter(meter, name, description)

        self.messages_received = counter(
            PREFIX + "messages_received",
            description="Inbound messages recorded on INBOUND, by channel and account.",
        )
        self.turns = counter(
            PREFIX + "turns",
            description="Agent turns recorded on AGENT, by outcome (completed, failed,"
            " skipped) and model.",
        )
        self.turn_duration = histogram(
            PREFIX + "turn_duration_seconds",
            unit="s",
            description="Time a turn spent in the model and its tools, by outcome and model.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.model_duration = histogram(
            PREFIX + "model_duration_seconds",
            unit="s",
            description="Time of one model call, by model and outcome (ok, error).",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.tokens = counter(
            PREFIX + "tokens",
            description="Tokens the model provider reported, by model and kind (prompt,"
            " completion).",
        )
        self.tool_calls = counter(
            PREFIX + "tool_calls",
            description="Tool calls in turns, by tool and outcome (ok, error).",
        )
        self.jobs = counter(
            PREFIX + "jobs",
            description="Outbound jobs recorded on DELIVERY, by channel, account and outcome"
            " (sent, failed, dead_lettered, uncertain).",
        )
        self.send_duration = histogram(
            PREFIX + "send_duration_seconds",
            unit="s",
            description="Time of one transport send, by channel, account and outcome.",
            explicit_bucket_boundaries_advisory=SECONDS_BUCKETS,
        )
        self.retries = counter(
            PREFIX + "retries",
            description="Retries scheduled, by stream and consumer (send = in-place send"
            " retries of egress).",
        )
        self.lease_acquisitions = counter(
            PREFIX + "lease_acquisitions",
            description="Account leases acquired by this process, by channel and account.",
        )
        self.lease_losses = counter(
            PREFIX + "lease_losses",
            description="Account leases lost (not released) by this process.",
        )
        self.lease_handovers = counter(
            PREFIX + "lease_handovers",
            description="Account leases released to another owner, by reason (operator,"
            " rebalance).",
        )
        self.web_logins = counter(  # h-web (ADR 0040)
            PREFIX + "web_logins",
            description="Console logins by outcome (ok, failed, throttled).",
        )
        meter.create_observable_gauge(
            PREFIX + "parked_accounts",
            callbacks=[state.parked_observations],
            description="Accounts this process sees parked, by channel and reason.",
        )
        meter.create_observable_gauge(
            PREFIX + "consumer_pending",
            callbacks=[state.pending_observations],
            description="Messages not yet delivered to the consumer (lag), by stream and"
            " consumer; sampled every 10 s.",
        )
        meter.create_observable_gauge(
            PREFIX + "consumer_ack_pending",
            callbacks=[state.ack_pending_observations],
            description="Messages delivered and not yet acknowledged, by stream and consumer.",
        )
        meter.create_observable_gauge(
            PREFIX + "consumer_redelivered",
            callbacks=[state.redelivered_observations],
            description="Messages delivered more than once and not yet acknowledged, by"
            " stream and consumer.",
        )
        meter.create_observable_gauge(
            PREFIX + "projection_lag",
            callbacks=[state.projection_observations],
            description="Events in the stream not yet applied by a projection, by projection.",
        )


@dataclass
class ConsumerLag:
    """The last consumer-info read of one durable consumer."""

    pending: int = 0
    ack_pending: int = 0
    redelivered: int = 0


@dataclass
class GaugeState:
    """What the observable gauges report: written by the code that knows the fact (or by
    the lag sampler), read by a scrape without any I/O."""

    parked: dict[tuple[str, str], str] = field(default_factory=dict)
    consumers: dict[tuple[str, str], ConsumerLag] = field(default_factory=dict)
    # projection name -> (stream, position getter); lag filled in by the sampler
    projections: dict[str, tuple[str, Callable[[], int]]] = field(default_factory=dict)
    projection_lag: dict[str, int] = field(default_factory=dict)

    def parked_observations(self, _: CallbackOptions) -> Iterable[Observation]:
        counts: dict[tuple[str, str], int] = {}
        for (channel, _account), reason in list(self.parked.items()):
            counts[channel, reason] = counts.get((channel, reason), 0) + 1
        return [
            Observation(n, labels(("channel", channel), ("reason", reason)))
            for (channel, reason), n in counts.items()
        ]

    def _consumer(self, attr: str) -> list[Observation]:
        return [
            Observation(getattr(lag, attr), labels(("stream", stream), ("consumer", durable)))
            for (stream, durable), lag in list(self.consumers.items())
        ]

    def pending_observations(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._consumer("pending")

    def ack_pending_observations(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._consumer("ack_pending")

    def redelivered_observations(self, _: CallbackOptions) -> Iterable[Observation]:
        return self._consumer("redelivered")

    def projection_observations(self, _: CallbackOptions) -> Iterable[Observation]:
        return [
            Observation(lag, labels(("projection", name)))
            for name, lag in list(self.projection_lag.items())
        ]


STATE = GaugeState()  # process-wide, like the MeterProvider it feeds
_provider: MeterProvider | None = None
_prometheus: InMemoryMetricReader | None = None
_instruments: Instruments | None = None
_disabled = False


def setup_metrics(service_name: str, env: Mapping[str, str] | None = None) -> None:
    """Install the process's MeterProvider once: the reader `/metrics` renders, plus the
    exporters `OTEL_METRICS_EXPORTER` selects (none, prometheus, console, otlp; a comma
    list). Raises ConfigError (one line) on a bad value or a missing OTLP exporter."""
    global _provider, _prometheus, _instruments, _disabled
    if _provider is not None or _disabled:
        return
    env = os.environ if env is None else env
    readers = _readers(env.get("OTEL_METRICS_EXPORTER", "prometheus"))
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        _disabled = True
        return
    name = env.get("OTEL_SERVICE_NAME") or service_name
    prometheus = InMemoryMetricReader()
    provider = MeterProvider(
        metric_readers=[prometheus, *readers],
        resource=Resource.create({"service.name": name}),
        # Exemplars cost an offer per measurement in a sampled trace and /metrics never
        # shows them: off unless OTEL_METRICS_EXEMPLAR_FILTER asks (ADR 0036).
        exemplar_filter=None
        if env.get("OTEL_METRICS_EXEMPLAR_FILTER")
        else AlwaysOffExemplarFilter(),
    )
    otel_metrics.set_meter_provider(provider)
    _provider, _prometheus = provider, prometheus
    _instruments = None  # made again on the real provider, not the API's proxies


def _readers(value: str) -> list[MetricReader]:
    readers: list[MetricReader] = []
    for name in (part.strip().lower() for part in value.split(",")):
        if name in ("", "none", "prometheus"):
            continue  # /metrics is always rendered from the in-memory reader
        readers.append(PeriodicExportingMetricReader(_exporter(name)))
    return readers


def _exporter(name: str) -> MetricExporter:
    if name == "console":
        return ConsoleMetricExporter()
    if name == "otlp":
        try:
            from opentelemetry.exporter.otlp.proto.http.metric_exporter import (
                OTLPMetricExporter,
            )
        except ImportError:
            raise ConfigError(
                "OTEL_METRICS_EXPORTER='otlp' needs the OTLP exporter, which is not installed:"
                " pip install 'switchboard[otlp]' (or unset OTEL_METRICS_EXPORTER)"
            ) from None
        exporter: MetricExporter = OTLPMetricExporter()
        return exporter
    raise ConfigError(
        f"OTEL_METRICS_EXPORTER={name!r} is invalid: expected none, prometheus, console or otlp"
    )


def shutdown_metrics() -> None:
    """Export what the periodic readers still hold (no-op without a provider)."""
    if _provider is not None:
        with contextlib.suppress(Exception):  # an unreachable collector must not block exit
            _provider.force_flush(timeout_millis=2000)


def instruments() -> Instruments:
    """The process's instruments (no-ops until `setup_metrics` installed a provider)."""
    global _instruments
    if _instruments is None:
        _instruments = Instruments(otel_metrics.get_meter("switchboard"), STATE)
    return _instruments


def render() -> str:
    """Everything the process measured, as Prometheus text exposition (format 0.0.4)."""
    if _prometheus is None:
        return ""
    return prometheus_text(_prometheus.get_metrics_data())


def prometheus_text(data: MetricsData | None) -> str:
    """Render OpenTelemetry metrics data (cumulative) as Prometheus text."""
    out: list[str] = []
    for resource in data.resource_metrics if data else ():
        for scope in resource.scope_metrics:
            for metric in scope.metrics:
                points = metric.data
                name = metric.name
                if isinstance(points, Sum):
                    kind = "counter" if points.is_monotonic else "gauge"
                    shown = name + "_total" if points.is_monotonic else name
                elif isinstance(points, Gauge):
                    kind, shown = "gauge", name
                elif isinstance(points, Histogram):
                    kind, shown = "histogram", name
                else:  # an exponential histogram: none is configured
                    continue
                out.append(f"# HELP {shown} {_help(metric.description or name)}")
                out.append(f"# TYPE {shown} {kind}")
                if isinstance(points, Histogram):
                    for hp in points.data_points:
                        running = 0
                        for bound, count in zip(
                            (*hp.explicit_bounds, math.inf), hp.bucket_counts, strict=True
                        ):
                            running += count
                            le = (("le", _number(bound)),)
                            out.append(f"{name}_bucket{_labels(hp.attributes, le)} {running}")
                        out.append(f"{name}_sum{_labels(hp.attributes)} {_number(hp.sum)}")
                        out.append(f"{name}_count{_labels(hp.attributes)} {hp.count}")
                else:
                    for point in points.data_points:
                        out.append(f"{shown}{_labels(point.attributes)} {_number(point.value)}")
    return "\n".join(out) + "\n" if out else ""


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _escape(value: object) -> str:
    return str(value).replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(
    attributes: Mapping[str, object] | None, extra: tuple[tuple[str, str], ...] = ()
) -> str:
    pairs = [*(attributes or {}).items(), *extra]
    if not pairs:
        return ""
    return "{" + ",".join(f'{k}="{_escape(v)}"' for k, v in pairs) + "}"


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if math.isnan(value):
        return "NaN"
    return repr(float(value))


# -- facts recorded at one place each ---------------------------------------------------


def consumer_bound(stream: str, durable: str) -> Callable[[], None]:
    """A consumer loop runs: the lag sampler reads it. Returns the undo for its end."""
    key = (stream, durable)
    STATE.consumers.setdefault(key, ConsumerLag())

    def unbound() -> None:
        STATE.consumers.pop(key, None)

    return unbound


def projection_running(name: str, stream: str, position: Callable[[], int]) -> Callable[[], None]:
    """A projection applies `stream`: the sampler reports how far it is behind."""
    STATE.projections[name] = (stream, position)

    def stopped() -> None:
        STATE.projections.pop(name, None)
        STATE.projection_lag.pop(name, None)

    return stopped


def account_parked(channel: str, account: str, reason: str | None) -> None:
    """What this process last saw of an account: parked for `reason`, or not (None)."""
    if reason is None:
        STATE.parked.pop((channel, account), None)
    else:
        STATE.parked[channel, account] = reason


class LagSampler:
    """Reads consumer info and stream positions every `interval` s for the lag gauges:
    one cheap read per consumer per interval, whatever the scrape rate."""

    def __init__(self, bus: Bus, interval: float = LAG_SAMPLE_INTERVAL) -> None:
        self.bus = bus
        self.interval = interval

    async def sample(self) -> None:
        """One read of every running consumer and projection; trouble keeps the last value."""
        for (stream, durable), lag in list(STATE.consumers.items()):
            try:
                info = await self.bus.js.consumer_info(stream, durable, timeout=2)
            except (nats.errors.Error, TimeoutError):
                continue
            lag.pending = info.num_pending or 0
            lag.ack_pending = info.num_ack_pending or 0
            lag.redelivered = info.num_redelivered or 0
        for name, (stream, position) in list(STATE.projections.items()):
            try:
                info = await self.bus.js.stream_info(stream)
            except (nats.errors.Error, TimeoutError):
                continue
            STATE.projection_lag[name] = max(0, (info.state.last_seq or 0) - position())

    async def run(self, stop: asyncio.Event) -> None:
        """Sample until `stop` is set."""
        while not stop.is_set():
            await self.sample()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)
