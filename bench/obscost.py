"""What tracing and metrics cost: client CPU per message, tracing default / off / full.

Each repetition runs the whole system (role `all`, sim transport, echo LLM) in a fresh
child process against its own embedded nats-server, sends a fixed workload through the
sim network and measures `time.process_time()` of that process (every role, the sim user
and all their threads; the nats-server is another process) from the first send to the
last reply. Variants, interleaved in every round so a busy machine hits all alike:

- `off`: no tracing code on the path at all (publish/consume spans replaced by no-ops,
  OTEL_SDK_DISABLED=true so no metrics either): the floor.
- `default`: the settings a deployment starts with (no OTEL_* variables).
- `full`: a trace exporter configured and every message sampled (OTEL_TRACES_SAMPLER=
  always_on); the exporter drops what it gets, so only building the spans is measured.

    python bench/obscost.py --messages 300 --chats 10 --rounds 5

Overhead = (cpu(variant) - cpu(off)) / cpu(variant), per round; min/median/max printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import pstats
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

VARIANTS = ("off", "default", "full")
PROFILER: cProfile.Profile | None = None
# Where observability code lives: its share of the profiled time is what it costs.
OBSERVABILITY = (
    "services/runtime/telemetry.py",
    "services/runtime/metrics.py",
    "opentelemetry/",
    "logging/__init__.py",
    "services/runtime/logs.py",
)


def _patch(variant: str) -> None:
    """Make this (child) process run `variant`."""
    from opentelemetry.sdk.trace.export import SpanExporter, SpanExportResult

    import services.runtime.bus as bus_module
    import services.runtime.consumer as consumer_module
    import services.runtime.telemetry as telemetry

    if variant == "off":

        @contextlib.contextmanager
        def no_publish_span(subject: str, msg_id: str) -> Iterator[dict[str, str]]:
            yield {}

        class _Span:
            def set_attribute(self, key: str, value: object) -> None:
                pass

        @contextlib.contextmanager
        def no_consume_span(*args: Any, **kwargs: Any) -> Iterator[Any]:
            yield _Span()

        bus_module.publish_span = no_publish_span  # type: ignore[assignment]
        if hasattr(bus_module, "trace_context"):  # the propagate-only fast path (ADR 0036)
            bus_module.trace_context = dict  # type: ignore[attr-defined]
        consumer_module.consume_span = no_consume_span  # type: ignore[assignment]
    elif variant == "full":

        class Dropping(SpanExporter):
            def export(self, spans: Sequence[Any]) -> SpanExportResult:
                return SpanExportResult.SUCCESS

        telemetry._exporter = lambda name: Dropping()  # type: ignore[assignment]


def _env(variant: str) -> dict[str, str]:
    if variant == "off":
        return {"OTEL_SDK_DISABLED": "true"}
    if variant == "full":
        return {"OTEL_TRACES_EXPORTER": "console", "OTEL_TRACES_SAMPLER": "always_on"}
    return {}


async def _workload(messages: int, chats: int) -> float:
    from _system import sim_system

    from services.runtime.telemetry import setup_tracing

    setup_tracing("switchboard-all")  # as `svc run` does, before the roles start
    async with sim_system() as (_, user):
        # warm up: first turns pay for imports, consumer creation, the lease
        for i in range(chats):
            await user.send(f"warm{i}@s.whatsapp.net", "warm up")
        if not await user.wait_replies(120):
            raise SystemExit("warm-up replies missing")
        user.exchanges.clear()
        if PROFILER is not None:
            PROFILER.enable()
        cpu = time.process_time()
        for i in range(messages):
            await user.send(f"chat{i % chats}@s.whatsapp.net", f"message {i}")
        if not await user.wait_replies(600):
            raise SystemExit("replies missing")
        cpu = time.process_time() - cpu
        if PROFILER is not None:
            PROFILER.disable()
        return cpu


def _child(variant: str, messages: int, chats: int, profile: bool) -> None:
    _patch(variant)
    try:
        from services.runtime.lifecycle import loop_factory

        factory = loop_factory()
    except ImportError:  # code from before uvloop
        factory = asyncio.new_event_loop
    from services.runtime.logs import setup_logging

    setup_logging("ERROR", "json")
    global PROFILER
    if profile:
        PROFILER = cProfile.Profile()
    with asyncio.Runner(loop_factory=factory) as runner:
        cpu = runner.run(_workload(messages, chats))
        loop = type(runner.get_loop()).__module__.split(".")[0]
    result: dict[str, Any] = {"variant": variant, "cpu": cpu, "loop": loop}
    if PROFILER is not None:
        result["share"], result["top"] = _observability_share(PROFILER)
    print(json.dumps(result))


def _observability_share(profiler: cProfile.Profile) -> tuple[float, list[str]]:
    """Share of profiled time spent in observability code (its own time, `tottime`),
    and the costliest such functions."""
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]
    total = sum(row[2] for row in stats.values())
    ours = {key: row for key, row in stats.items() if any(part in key[0] for part in OBSERVABILITY)}
    spent = sum(row[2] for row in ours.values())
    top = sorted(ours.items(), key=lambda item: -item[1][2])[:12]
    return spent / total, [
        f"{row[2] / total * 100:5.2f}% {row[1]:6d} calls {Path(k[0]).name}:{k[1]} {k[2]}"
        for k, row in top
    ]


def _run_child(variant: str, messages: int, chats: int, profile: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("OTEL_")}
    env.update(_env(variant))
    done = subprocess.run(
        [
            sys.executable,
            __file__,
            "--child",
            variant,
            "--messages",
            str(messages),
            "--chats",
            str(chats),
            *(["--profile"] if profile else []),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=900,
    )
    if done.returncode != 0:
        raise SystemExit(f"{variant} failed:\n{done.stderr[-3000:]}")
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def _summary(values: list[float]) -> str:
    low, mid, high = min(values), statistics.median(values), max(values)
    return f"min {low:7.1f}  median {mid:7.1f}  max {high:7.1f}"


def main() -> None:
    parser = argparse.ArgumentParser(description="Tracing and metrics CPU cost per message")
    parser.add_argument("--messages", type=int, default=300)
    parser.add_argument("--chats", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--child", choices=VARIANTS)
    parser.add_argument(
        "--profile",
        action="store_true",
        help="cProfile each run: print the share of time spent in observability code",
    )
    args = parser.parse_args()
    if args.child:
        _child(args.child, args.messages, args.chats, args.profile)
        return
    per_msg: dict[str, list[float]] = {v: [] for v in VARIANTS}
    shares: dict[str, list[float]] = {v: [] for v in VARIANTS}
    tops: dict[str, list[str]] = {}
    loops = set()
    for _ in range(args.rounds):
        for variant in VARIANTS:
            result = _run_child(variant, args.messages, args.chats, args.profile)
            per_msg[variant].append(result["cpu"] / args.messages * 1e6)
            loops.add(result["loop"])
            if args.profile:
                shares[variant].append(result["share"] * 100)
                tops[variant] = result["top"]
    print(
        f"obscost: {args.messages} messages over {args.chats} chats, {args.rounds} rounds,"
        f" loop {'/'.join(sorted(loops))}; client CPU per message (us)"
    )
    for variant in VARIANTS:
        print(f"  {variant:8}: {_summary(per_msg[variant])}")
    for variant in ("default", "full"):
        overhead = [
            (v - off) / v * 100 for v, off in zip(per_msg[variant], per_msg["off"], strict=True)
        ]
        print(f"  overhead {variant:8} vs off (%): {_summary(overhead)}")
    if args.profile:
        print("profiled share of time in observability code (tracing, metrics, logging), %:")
        for variant in VARIANTS:
            print(f"  {variant:8}: {_summary(shares[variant])}")
        for variant in VARIANTS:
            print(f"  costliest in {variant} (last round):")
            for line in tops[variant]:
                print(f"    {line}")


if __name__ == "__main__":
    main()
