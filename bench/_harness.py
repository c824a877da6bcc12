"""What every bench script shares: interleaved repetitions, min/median/max, both ratios,
and one table (text, markdown or JSON) -- so the scripts do not copy each other.

A script measures each side ("ours", "weak" raw, "strong" raw) with a function returning
{figure name: value}; `interleave` runs them ours, weak, strong, ours, ... `--reps` times,
so a noisy neighbour on this shared box hurts every side alike (ADR 0037). A figure that
has no raw counterpart on one side simply leaves it out.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any

SIDES = ("ours", "weak", "strong")
# What each side means, for the table's legend and docs/benchmarks.md.
LEGEND = (
    "weak = the old raw shape (writes: one in flight, each publish/ack awaited; reads: "
    "fetch(500)); strong = the best plain nats-py for the same hops and guarantees "
    "(pipelined publish_async, pushed delivery, per-chat order kept; reads: ordered "
    "consumer); ratios are ours/raw on the medians"
)

Run = Callable[[], Awaitable[dict[str, float]]]


@dataclass
class Figure:
    """One measured quantity, with every repetition of every side."""

    name: str
    unit: str
    higher_is_better: bool = True
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, side: str) -> float | None:
        values = self.samples.get(side)
        return statistics.median(values) if values else None

    def ratio(self, base: str) -> float | None:
        """ours / base on the medians (throughput: > 1 is faster; latency: < 1 is faster)."""
        ours, other = self.median("ours"), self.median(base)
        if ours is None or not other:
            return None
        return ours / other

    def spread(self, side: str) -> str:
        values = self.samples.get(side)
        if not values:
            return "-"
        return f"{min(values):,.{_digits(values)}f} / {statistics.median(values):,.{_digits(values)}f} / {max(values):,.{_digits(values)}f}"  # noqa: E501

    def as_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "unit": self.unit,
            "higher_is_better": self.higher_is_better,
            "samples": self.samples,
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Figure:
        return cls(data["name"], data["unit"], data["higher_is_better"], data["samples"])


def _digits(values: list[float]) -> int:
    top = max(abs(v) for v in values)
    return 0 if top >= 100 else 1 if top >= 10 else 2


def parser(description: str, reps: int = 3) -> argparse.ArgumentParser:
    """The script's argument parser with the shared options."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--reps", type=int, default=reps, help="interleaved repetitions per side")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--json", action="store_true", help="print the figures as JSON (bench/all)")
    return p


async def interleave(
    reps: int,
    runs: dict[str, Run],
    units: dict[str, tuple[str, bool]],
    *,
    log: Callable[[str], None] | None = None,
) -> list[Figure]:
    """Run each side in turn `reps` times (ours, weak, strong, ours, ...) and collect the
    figures; `units` maps a figure name to (unit, higher_is_better), in table order."""
    figures = {name: Figure(name, unit, better) for name, (unit, better) in units.items()}
    for rep in range(reps):
        for side in SIDES:
            if side not in runs:
                continue
            values = await runs[side]()
            if log:
                shown = ", ".join(f"{k} {v:,.1f}" for k, v in values.items())
                log(f"rep {rep + 1}/{reps} {side}: {shown}")
            for name, value in values.items():
                figures[name].samples.setdefault(side, []).append(value)
    return list(figures.values())


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


ROW_HEADERS = (
    "figure",
    "unit",
    "ours min/med/max",
    "weak raw min/med/max",
    "strong raw min/med/max",
    "ours/weak",
    "ours/strong",
)


def rows(bench: str, figures: list[Figure]) -> list[list[str]]:
    out = []
    for f in figures:
        arrow = "" if f.higher_is_better else " (lower is better)"
        out.append(
            [
                f"{bench}: {f.name}",
                f.unit + arrow,
                f.spread("ours"),
                f.spread("weak"),
                f.spread("strong"),
                _ratio(f.ratio("weak")),
                _ratio(f.ratio("strong")),
            ]
        )
    return out


def table(body: list[list[str]], markdown: bool) -> str:
    """The rows under ROW_HEADERS, as aligned text or a markdown table."""
    lines = [list(ROW_HEADERS), *body]
    if markdown:
        out = ["| " + " | ".join(lines[0]) + " |", "|" + "---|" * len(ROW_HEADERS)]
        out += ["| " + " | ".join(r) + " |" for r in lines[1:]]
        return "\n".join(out)
    widths = [max(len(r[i]) for r in lines) for i in range(len(ROW_HEADERS))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines)


def single(figures: list[Figure], markdown: bool) -> str:
    """A table of one-sided figures (the physical limits): figure, unit, min/median/max."""
    lines = [["figure", "unit", "min / median / max"]]
    lines += [[f.name, f.unit, f.spread("ours")] for f in figures]
    if markdown:
        out = ["| " + " | ".join(lines[0]) + " |", "|---|---|---|"]
        return "\n".join(out + ["| " + " | ".join(r) + " |" for r in lines[1:]])
    widths = [max(len(r[i]) for r in lines) for i in range(3)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in lines)


def report(
    bench: str, setup: str, figures: list[Figure], args: argparse.Namespace, notes: str = ""
) -> None:
    """Print the figures in the format the options ask for (one-sided figures, measured
    as "ours" only, print as a plain table: the physical limits)."""
    if args.json:
        print(
            json.dumps(
                {
                    "bench": bench,
                    "setup": setup,
                    "reps": args.reps,
                    "figures": [f.as_json() for f in figures],
                    "notes": notes,
                }
            )
        )
        return
    print(f"{bench}: {setup} ({args.reps} interleaved reps each; min / median / max)")
    one_sided = all(set(f.samples) == {"ours"} for f in figures)
    print(
        single(figures, args.markdown) if one_sided else table(rows(bench, figures), args.markdown)
    )
    if notes:
        print(notes)
    if not args.markdown and not one_sided:
        print(LEGEND)


def info(line: str) -> None:
    """Progress on stderr, so --json/--markdown output stays clean."""
    print(line, file=sys.stderr, flush=True)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """asyncio.run(main()) where SIGTERM behaves like Ctrl-C: the coroutine is cancelled,
    so every `async with` (servers) and `finally` (processes) cleans up before exit."""

    async def guarded() -> None:
        task = asyncio.current_task()
        assert task is not None
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        await main()

    try:
        asyncio.run(guarded())
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("interrupted: servers and processes stopped", file=sys.stderr)
        raise SystemExit(130) from None


def machine() -> dict[str, str]:
    """What the figures were measured on."""
    import importlib.metadata
    import os
    import platform
    import shutil
    import subprocess
    from pathlib import Path

    cpu = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    ram = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram = f"{int(line.split()[1]) / 1024 / 1024:.0f} GiB"
    server = shutil.which("nats-server") or str(Path(sys.executable).parent / "nats-server")
    try:
        version = subprocess.run(
            [server, "--version"], capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        version = "?"
    return {
        "nproc": str(os.cpu_count()),
        "cpu": cpu,
        "ram": ram,
        "nats-server": version.removeprefix("nats-server: "),
        "nats-py": importlib.metadata.version("nats-py"),
        "python": platform.python_version(),
    }
