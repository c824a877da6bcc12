"""Tools cannot freeze the core (issue 11, item 3), with real `svc` processes: a
third-party tool that spins forever and the calculator bomb leave other chats answered,
the spinner ends at SVC_TOOL_TIMEOUT, and no worker process outlives the core."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from tests.conftest import Processes, wait_until
from tests.e2e.conftest import children, cmdline, consumers_ready
from tests.plugins.wheels import installed

pytestmark = pytest.mark.slow

SPINNER = """
import msgspec
from services.plugins.base import Plugin

class Params(msgspec.Struct):
    pass

plugin = Plugin("spinner", "0.1.0", "Burns CPU.", preinstalled=True)

@plugin.tool("spin", "Never returns.", Params)
def spin(params, config, ctx):
    while True:
        pass
"""

TOOL_TIMEOUT = 8
# Measured on the shared 2-core box (4 runs): 8-161 ms for the other chats' replies while the
# spinner runs. Bound: well under the tool timeout, so they cannot have waited for it.
OTHER_CHATS_BOUND_S = 5.0


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


async def test_a_spinning_tool_and_the_calculator_bomb_leave_other_chats_answered(
    processes: Processes, served: tuple[str, Bus], tmp_path: Path
) -> None:
    url, bus = served
    with installed(tmp_path, "spinner", SPINNER):
        processes.start("run", "whatsapp", NATS_URL=url)
        core = processes.start("run", "core", NATS_URL=url, SVC_TOOL_TIMEOUT=str(TOOL_TIMEOUT))
        await wait_until(lambda: consumers_ready(bus), timeout=30, what="owner and core consumers")
        async with SimUser(bus, "default") as user:
            first = await user.send("warm@s.whatsapp.net", "hello")
            assert await user.wait_replies(30), processes.log(core)
            assert first.reply is not None
            # Given one chat whose tool spins forever and one that sends the bomb
            started = time.monotonic()
            spin = await user.send("a@s.whatsapp.net", "!tool spinner.spin {}")
            bomb = await user.send(
                "b@s.whatsapp.net",
                '!tool calculator.evaluate {"expression": "(((9**99)**99)**99)**99"}',
            )
            # When other chats talk meanwhile
            others = [await user.send(f"c{i}@s.whatsapp.net", f"hi {i}") for i in range(3)]
            await wait_until(
                lambda: all(e.reply is not None for e in [bomb, *others]),
                timeout=TOOL_TIMEOUT - 1,
                what="the other chats' replies while the spinner runs",
            )
            # Then they are answered while the spinner still runs
            assert spin.reply is None
            workers = [p for p in children(core.pid) if "services.plugins.runner" in cmdline(p)]
            latencies = [e.latency_ms for e in [bomb, *others]]
            print("other chats' reply latency (ms):", [round(x) for x in latencies])
            assert max(latencies) < OTHER_CHATS_BOUND_S * 1000
            # And the spinner ends at the tool timeout with an error the model saw
            await wait_until(lambda: spin.reply is not None, timeout=30, what="spin's reply")
            spun = time.monotonic() - started
        assert spin.reply is not None
        assert spin.reply.text == (
            f"echo: spinner.spin -> error: spinner.spin timed out after {TOOL_TIMEOUT}s"
        )
        assert TOOL_TIMEOUT <= spun < TOOL_TIMEOUT + 10
        assert bomb.reply is not None
        assert bomb.reply.text.startswith("echo: calculator.evaluate -> error: result too large")
        # The core exits cleanly and takes its worker processes along
        assert workers, "the core runs CPU-bound tools in worker processes"
        assert processes.stop(core) == 0, processes.log(core)
        await wait_until(lambda: not any(_running(p) for p in workers), what="workers gone")
