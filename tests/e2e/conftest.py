"""End-to-end helpers: a `svc nats serve` process, job traffic, what the sim network saw."""

from __future__ import annotations

import asyncio
import contextlib
import re
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from nats.aio.msg import Msg
from nats.aio.subscription import Subscription

from contracts import subjects
from contracts.codec import decode
from contracts.events import SendMessage, TurnCompleted, derived_id
from contracts.payloads import SimOutbound
from services.runtime.bus import Bus, connect
from services.runtime.lease import LeaseValue
from tests.conftest import Processes, assert_audit_clean, read_stream, stream_raw, wait_until


def read_url(proc: subprocess.Popen[bytes]) -> str:
    """`svc nats serve` prints `nats-server ready at URL (...)` first."""
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith("nats-server ready at "), line
    return line.split()[3]


@pytest.fixture
async def served(
    processes: Processes, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[str, Bus]]:
    """`svc nats serve` in its own process, plus a test client; the audit must find no
    violation in what the test left in the log."""
    url = read_url(processes.start("nats", "serve", "--port", "0"))
    async with connect(url, name="e2e-test") as bus:
        yield url, bus
        await assert_audit_clean(bus, request)


OWNER_AND_CORE = (("SIM", "sim-in-default"), ("INBOUND", "core"))


async def consumers_ready(bus: Bus, *consumers: tuple[str, str]) -> bool:
    """True once every (stream, durable) consumer exists (default: the sim owner's and
    the core's, i.e. `svc run whatsapp` and `svc run core` are up)."""
    try:
        for stream, durable in consumers or OWNER_AND_CORE:
            await bus.js.consumer_info(stream, durable)
    except Exception:
        return False
    return True


def children(pid: int) -> list[int]:
    """Process ids whose parent is `pid` (from /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def cmdline(pid: int) -> str:
    """The command line of process `pid` ('' once it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return ""


def pid_of(holder: str) -> int:
    """The process id inside a holder id `<host>-<pid>-<role>-<hex>`."""
    found = re.search(r"-(\d+)-whatsapp(?:-egress)?-[0-9a-f]{6}$", holder)
    assert found, holder
    return int(found.group(1))


async def lease_of(bus: Bus, account: str) -> LeaseValue | None:
    """The current value of an account's lease key, or None."""
    try:
        kv = await bus.js.key_value("leases")
        entry = await kv.get(f"whatsapp.{account}")
    except Exception:  # no bucket yet (not provisioned) or no key
        return None
    if not entry.value:
        return None
    return msgspec.json.decode(entry.value, type=LeaseValue)


async def holder_of(bus: Bus, account: str) -> str | None:
    """Who holds the account now (a recorded token, not parked), or None."""
    value = await lease_of(bus, account)
    if value is None or value.parked or value.token == 0:
        return None
    return value.holder


@dataclass
class SimNetwork:
    """What the simulated WhatsApp network accepted for one account, as it happens."""

    bus: Bus
    account: str
    seen: list[SimOutbound] = field(default_factory=list)
    _sub: Subscription | None = None
    _changed: asyncio.Event = field(default_factory=asyncio.Event)

    async def __aenter__(self) -> SimNetwork:
        self._sub = await self.bus.nc.subscribe(subjects.sim_out(self.account), cb=self._on)
        await self.bus.nc.flush()  # subscribed on the server before anything is sent
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._sub is not None:
            await self._sub.unsubscribe()

    async def _on(self, msg: Msg) -> None:
        self.seen.append(decode(msg.data, SimOutbound))
        self._changed.set()

    def job_ids(self) -> set[str]:
        return {s.job_id for s in self.seen}

    async def wait(self, predicate: object, timeout: float, what: str) -> None:
        """Wait until `predicate()` holds, woken by every send."""
        deadline = time.monotonic() + timeout
        while not predicate():  # type: ignore[operator]
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"timed out after {timeout}s waiting for {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(remaining, 0.5))

    async def recorded(self) -> list[SimOutbound]:
        """Every accepted send in the order the network stored them (stream SIM_OUT)."""
        return [
            decode(data, SimOutbound)
            for subject, data, _ in await stream_raw(self.bus, "SIM_OUT")
            if subject == subjects.sim_out(self.account)
        ]


def job(account: str, chat: str, n: int, run: str = "") -> SendMessage:
    """The n-th job to `chat`, with a deterministic id."""
    job_id = derived_id("test-job", run, account, chat, str(n))
    return SendMessage(id=job_id, job_id=job_id, account=account, chat=chat, text=f"{chat} #{n}")


async def enqueue(
    bus: Bus, account: str, *, count: int, chats: int = 5, every: float = 0.0, run: str = ""
) -> list[SendMessage]:
    """Queue `count` jobs round-robin over `chats` chats, one every `every` seconds."""
    jobs = []
    for n in range(count):
        j = job(account, f"c{n % chats}@s.whatsapp.net", n, run)
        await bus.publish(subjects.outbound("whatsapp", account, j.chat), j)
        jobs.append(j)
        if every:
            await asyncio.sleep(every)  # pacing the traffic, not waiting for a condition
    return jobs


def assert_single_writer(sends: list[SimOutbound]) -> None:
    """Invariant 1 as the network saw it: tokens never decrease (no two holders'
    sends interleave) and each token belongs to one holder."""
    owner_of: dict[int, str] = {}
    highest = 0
    for i, s in enumerate(sends):
        assert s.lease_token > 0, f"send #{i} carries no fencing token"
        assert s.lease_token >= highest, (
            f"send #{i} by {s.holder} with token {s.lease_token} after token {highest}: split brain"
        )
        highest = s.lease_token
        assert owner_of.setdefault(s.lease_token, s.holder) == s.holder, (
            f"token {s.lease_token} shared"
        )


def assert_per_chat_order(sends: list[SimOutbound], jobs: list[SendMessage]) -> None:
    """Per chat, first sends happen in enqueue order (a resend of the in-flight job may
    repeat it, never reorder it)."""
    enqueued: dict[str, list[str]] = {}
    for j in jobs:
        enqueued.setdefault(j.chat, []).append(j.job_id)
    first_seen: dict[str, list[str]] = {}
    done: set[str] = set()
    for s in sends:
        if s.job_id not in done:
            done.add(s.job_id)
            first_seen.setdefault(s.chat, []).append(s.job_id)
    for chat, order in enqueued.items():
        assert first_seen.get(chat, []) == order, f"order broken in {chat}"


async def turn_records(bus: Bus, count: int, timeout: float = 30) -> list[TurnCompleted]:
    """The TurnCompleted records on AGENT once there are at least `count`. The core queues
    a turn's replies before it records the turn, so a reply can reach the network first."""
    turns: list[TurnCompleted] = []

    async def recorded() -> bool:
        turns[:] = [e for _, e in await read_stream(bus, "AGENT") if isinstance(e, TurnCompleted)]
        return len(turns) >= count

    await wait_until(recorded, timeout=timeout, what=f"{count} turn records on AGENT")
    return turns
