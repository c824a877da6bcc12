"""Tools cannot freeze the core (issue 11, item 3): the calculator bounds every result
before computing it, and a `def` tool runs in a worker process that SVC_TOOL_TIMEOUT
kills, while the event loop keeps running."""

from __future__ import annotations

import asyncio
import os
import time
from typing import Any

import msgspec
import pytest

from services.core.llm import ToolCall, ToolSpec
from services.core.tools import BoundTool, ToolBox
from services.plugins.base import Plugin, ToolContext, ToolError
from services.plugins.builtin import MAX_BITS, calculate, calculator
from services.plugins.runner import ToolRunner


class NoParams(msgspec.Struct):
    """No parameters."""


spinner: Plugin[Any] = Plugin("spinner", "0.1.0", "Burns CPU forever.")


@spinner.tool("spin", "Never returns.", NoParams)
def spin(params: NoParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """A third-party tool that spins forever (a plain `def`: runs in a worker process)."""
    while True:
        pass


@spinner.tool("pid", "The process it runs in.", NoParams)
def pid(params: NoParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """Where a `def` tool runs."""
    return str(os.getpid())


@spinner.tool("pid_thread", "The process a thread tool runs in.", NoParams, run="thread")
def pid_thread(params: NoParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """Where a `run="thread"` tool runs."""
    return str(os.getpid())


CTX = ToolContext("whatsapp", "acct", "c@s.whatsapp.net")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.mark.parametrize(
    "bomb",
    [
        "((9**99)**99)**99",  # 3 million bits: computed (and printed) by the old calculator
        "9**9**9**9",
        f"2**{MAX_BITS}",
        "*".join(["(9**99)"] * 14),  # 14 x 314 bits
        "1e308*10",
        "1e999",
        "10**300/1e-300",
        "(-8)**0.5",
        "2.0**(9**300)",
        "3**(2**4000)",
        "(((9**99)**99)**99)**99",  # the bomb: minutes of CPU on the old code
    ],
)
def test_the_calculator_refuses_results_past_its_bound_before_computing_them(bomb: str) -> None:
    started = time.perf_counter()
    with pytest.raises(ToolError, match=r"too large|no real result"):
        calculate(bomb)
    elapsed = time.perf_counter() - started
    assert elapsed < 1.0, f"{bomb} took {elapsed:.3f}s"  # measured: tens of microseconds


def test_the_calculator_still_does_arithmetic_up_to_its_bound() -> None:
    assert calculate("2**4000") == 2**4000
    assert calculate("9" * 199) == int("9" * 199)  # the longest literal that fits
    assert calculate("2**-5000") == 0.0
    assert calculate("(2+3)*4/5") == 4
    assert calculate("7//2 + 7%2 - -1") == 5


async def test_a_spinning_tool_is_stopped_at_the_timeout_while_the_loop_keeps_running() -> None:
    # Given a third-party `def` tool that spins forever, run the way the core runs tools
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.05)
            ticks += 1

    async with ToolRunner() as runner:
        box = ToolBox([_bound(spinner, "spin", runner)], timeout=2.0)
        ticker = asyncio.create_task(tick())
        started = time.perf_counter()
        # When the model calls it
        text, record = await box.run(ToolCall("c1", "spinner.spin", {}))
        elapsed = time.perf_counter() - started
        ticker.cancel()
        # Then the turn gets an error at the timeout, and the loop ran all along
        assert text == "error: spinner.spin timed out after 2s"
        assert record.error == "spinner.spin timed out after 2s"
        assert 2.0 <= elapsed < 6.0
        assert ticks >= 10  # ~40 expected in 2 s; 0 if the loop had been frozen
        # And the pool still works: the killed worker was replaced
        again = ToolBox([_bound(spinner, "pid", runner)], timeout=10.0)
        worker_pid, _ = await again.run(ToolCall("c2", "spinner.pid", {}))
        assert int(worker_pid) != os.getpid()
        assert int(worker_pid) in runner.pids()
        pids = runner.pids()
    # And closing the pool (as the role does when it stops) leaves no worker behind
    assert pids
    assert not any(_alive(p) for p in pids)


async def test_the_calculator_bomb_ends_in_an_error_the_model_sees() -> None:
    async with ToolRunner() as runner:
        box = ToolBox([_bound(calculator, "evaluate", runner)], timeout=5.0)
        bomb = {"expression": "(((9**99)**99)**99)**99"}
        text, record = await box.run(ToolCall("c1", "calculator.evaluate", bomb))
        ok, _ = await box.run(ToolCall("c2", "calculator.evaluate", {"expression": "6*7"}))
    assert text.startswith("error: result too large")
    assert record.error is not None
    assert ok == "42"


async def test_thread_tools_run_in_this_process_and_process_tools_do_not() -> None:
    here = await spinner.call("pid_thread", {}, {}, CTX)
    there = await spinner.call("pid", {}, {}, CTX)  # no pool: a worker for this call only
    assert int(here) == os.getpid()
    assert int(there) != os.getpid()


def _bound(plugin: Plugin[Any], tool: str, runner: ToolRunner) -> BoundTool:
    async def call(arguments: dict[str, Any]) -> str:
        return await plugin.call(tool, arguments, {}, CTX, runner=runner)

    return BoundTool(ToolSpec(f"{plugin.name}.{tool}", ""), call)
