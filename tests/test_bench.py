"""Every benchmark still runs end to end (tiny sizes, one repetition, through
`bench/all.py --smoke`) and reports both ratios: ours against the weak and against the
strong raw baseline (ADR 0037). Speed is measured in bench/, never asserted here."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import die_with_test

ROOT = Path(__file__).resolve().parent.parent
BENCHES = [
    "pipeline",
    "core",
    "delivery",
    "projection",
    "replay",
    "audit",
    "fsync",
    "fairness",
    "failover",
    "fence_window",
]
LIMITS = 8  # awaited/pipelined/core publish, fetch+ack, ordered read, KV put, 2 KV gets


def smoke(name: str) -> str:
    """`bench/all.py --smoke --only name --markdown`'s output; stopped (and its servers
    with it) if it hangs."""
    argv = [sys.executable, str(ROOT / "bench" / "all.py"), "--smoke", "--markdown"]
    proc = subprocess.Popen(
        [*argv, "--only", name],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=die_with_test,
    )
    try:
        out, err = proc.communicate(timeout=280)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGTERM)  # the bench cancels itself and cleans up
        out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, f"bench {name} failed:\n{out}\n{err}"
    return out


def cells(out: str, prefix: str) -> list[list[str]]:
    """The markdown table rows whose first cell starts with `prefix`."""
    found = []
    for line in out.splitlines():
        if line.startswith("| "):
            row = [c.strip() for c in line.strip("|").split("|")]
            if row[0].startswith(prefix):
                found.append(row)
    return found


@pytest.mark.slow
@pytest.mark.timeout(400)
@pytest.mark.parametrize("name", BENCHES)
def test_bench_prints_ours_against_both_raw_baselines(name: str) -> None:
    out = smoke(name)

    header = cells(out, "figure")[0]
    assert header[-2:] == ["ours/weak", "ours/strong"]
    rows = cells(out, f"{name}: ")
    assert rows, f"no figures for {name}:\n{out}"
    for row in rows:
        float(row[-1].replace(",", ""))  # every figure has its strong ratio
        assert row[2] != "-", f"no figure of ours in {row}"
    # The weak ratio too, for every figure that has a weak run (fairness's weak baseline
    # has no flood, so no flood time).
    weak = [row for row in rows if row[3] != "-"]
    assert weak, f"no weak baseline in {name}"
    for row in weak:
        float(row[-2].replace(",", ""))


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_bench_limits_prints_every_physical_limit() -> None:
    out = smoke("limits")

    rows = [r for r in cells(out, "") if r[0] not in ("figure", "---")]
    assert len(rows) == LIMITS, out
    for row in rows:
        low, median, high = (float(v.replace(",", "")) for v in row[2].split(" / "))
        assert 0 < low <= median <= high
