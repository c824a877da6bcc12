"""Run every benchmark at a short default size and print one summary table (figure,
ours, weak raw, strong raw, both ratios), then the physical limits (ADR 0037).

    python bench/all.py                 # every bench, 3 interleaved reps each
    python bench/all.py --markdown      # the tables for docs/benchmarks.md
    python bench/all.py --only core delivery --reps 5
    python bench/all.py --smoke         # tiny sizes, 1 rep: does every bench still run?

Each bench runs as its own process (its own servers, its own peak memory) with --json;
Ctrl-C or a failure stops the running one through SIGTERM, which its harness turns into
a cancellation that closes its servers and processes.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from _harness import LEGEND, Figure, machine, rows, single, table

HERE = Path(__file__).parent
# name -> the short default size `just bench` runs (a few minutes in all on 2 cores).
DEFAULT: dict[str, list[str]] = {
    "pipeline": ["--messages", "200", "--chats", "10", "--paced", "150", "--rate", "50"],
    "core": ["--turns", "1000", "--chats", "100", "--share", "100"],
    "delivery": ["--jobs", "400", "--accounts", "1", "10", "--rate", "200"],
    "projection": ["--events", "50000"],
    "replay": ["--events", "50000"],
    "audit": ["--events", "100000", "--no-replay"],
    "fsync": ["--messages", "1000"],
    "fairness": ["--flood", "100", "--turn-ms", "20", "--others", "5"],
    "failover": ["--ttl", "2"],
    "fence_window": ["--sends", "500", "--runs", "1"],
    "limits": ["--messages", "2000"],
}
# The smallest run of each that still goes through every path (tests/test_bench.py).
SMOKE: dict[str, list[str]] = {
    "pipeline": ["--messages", "20", "--chats", "4", "--paced", "10", "--rate", "100"],
    "core": ["--turns", "60", "--chats", "6", "--share", "10"],
    "delivery": ["--jobs", "30", "--accounts", "1", "2", "--rate", "500"],
    "projection": ["--events", "2000"],
    "replay": ["--events", "2000"],
    "audit": ["--events", "3000", "--replay-events", "1000"],
    "fsync": ["--messages", "100"],
    "fairness": ["--flood", "10", "--turn-ms", "10", "--others", "2", "--cores", "1"],
    "failover": ["--ttl", "2"],
    "fence_window": ["--sends", "40", "--runs", "1"],
    "limits": ["--messages", "200"],
}


def one(name: str, args: list[str], verbose: bool) -> dict[str, object]:
    """Run bench `name` with --json; its parsed figures (or raise with its stderr)."""
    argv = [sys.executable, str(HERE / f"{name}.py"), *args, "--json"]
    print(f"running {' '.join(argv[1:])}", file=sys.stderr, flush=True)
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=None if verbose else subprocess.PIPE,
        text=True,
        start_new_session=True,  # Ctrl-C here reaches it as SIGTERM, after us
    )
    try:
        out, err = proc.communicate()
    except BaseException:
        os.killpg(proc.pid, signal.SIGTERM)  # the bench cancels itself and cleans up
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        raise
    if proc.returncode:
        raise RuntimeError(f"bench {name} failed (exit {proc.returncode}):\n{err or ''}")
    lines = [line for line in out.splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"bench {name} printed no JSON figures:\n{out}\n{err or ''}")
    result: dict[str, object] = json.loads(lines[-1])
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3, help="interleaved repetitions per side")
    p.add_argument("--markdown", action="store_true", help="markdown tables")
    p.add_argument("--smoke", action="store_true", help="tiny sizes, 1 rep")
    p.add_argument("--only", nargs="+", choices=sorted(DEFAULT), help="these benches only")
    p.add_argument("--verbose", action="store_true", help="show each bench's progress")
    args = p.parse_args()
    sizes = SMOKE if args.smoke else DEFAULT
    reps = 1 if args.smoke else args.reps
    names = args.only or list(DEFAULT)
    body: list[list[str]] = []
    limits: list[Figure] = []
    setups: list[str] = []
    failed: list[str] = []
    started = time.monotonic()
    for name in names:
        try:
            result = one(name, [*sizes[name], "--reps", str(reps)], args.verbose)
        except RuntimeError as exc:
            print(exc, file=sys.stderr)
            failed.append(name)
            continue
        figures = [Figure.from_json(f) for f in result["figures"]]  # type: ignore[attr-defined]
        setups.append(f"{name}: {result['setup']}; `just bench {name} {' '.join(sizes[name])}`")
        if name == "limits":
            limits = figures
        else:
            body += rows(name, figures)
        if result.get("notes"):
            setups.append(f"  {result['notes']}".replace("\n", "\n  "))
    info = machine()
    print(
        f"machine: {info['nproc']} cores ({info['cpu']}), {info['ram']} RAM; nats-server"
        f" {info['nats-server']}, nats-py {info['nats-py']}, Python {info['python']};"
        f" {reps} interleaved reps (min / median / max); took {time.monotonic() - started:.0f} s"
    )
    print()
    if body:
        print(table(body, args.markdown))
        print()
        print(LEGEND)
    if limits:
        print()
        print("physical limits (plain nats-py, one client):")
        print(single(limits, args.markdown))
    print()
    print("\n".join(setups))
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        raise SystemExit(130) from None
