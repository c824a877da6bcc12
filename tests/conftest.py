"""Shared fixtures: a real nats-server per test (port 0, temp store), svc processes."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest

from contracts.codec import decode, decode_any
from contracts.events import AnyMessage
from contracts.payloads import SessionStatus
from contracts.streams import SESSIONS
from services.runtime.bus import Bus, connect
from services.runtime.lifecycle import loop_factory
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from services.whatsapp.neonize_store import neonize_module

REPO = Path(__file__).resolve().parent.parent
_PR_SET_PDEATHSIG = 1


# neonize's import leaks a pipe and reconfigures the root logger: import it once, up
# front, through the one function that undoes both (services/whatsapp/neonize_store.py).
neonize_module("neonize")


def pytest_asyncio_loop_factories(
    config: pytest.Config, item: pytest.Item
) -> dict[str, Callable[[], asyncio.AbstractEventLoop]]:
    """In-process tests run on the loop `svc` runs on: uvloop unless SVC_UVLOOP=off
    (ADR 0036), so the embedded server, subprocesses, signals and uvicorn are proven on it."""
    return {"loop": loop_factory()}


@pytest.fixture
async def nats_server(tmp_path: Path) -> AsyncIterator[EmbeddedNats]:
    """A real JetStream nats-server on a free port with a temp store."""
    async with EmbeddedNats(tmp_path / "nats", port=0) as server:
        yield server


@pytest.fixture
async def bus(nats_server: EmbeddedNats, request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """A connection to `nats_server` with every stream and bucket provisioned. When the
    test passes, `svc audit`'s rules must hold over what it left in the log (unless the
    test is marked `audit_violations`: it crafts them on purpose)."""
    async with connect(nats_server.url, name="test", timeout=5) as b:
        await ensure_streams(b.js)
        yield b
        await assert_audit_clean(b, request)


async def assert_audit_clean(bus: Bus, request: pytest.FixtureRequest) -> None:
    """Fail the test if the audit finds a violation in the log it left behind."""
    from services.ops.audit import AUDITED, Scope, audit, render
    from services.runtime.provisioning import missing_streams

    if request.node.get_closest_marker("audit_violations") or _failed(request):
        return
    if len(await missing_streams(bus.js, AUDITED)) == len(AUDITED):
        return  # nothing was provisioned, so nothing was written: no log to judge
    report, elapsed = await audit(bus, Scope())
    assert report.ok, "the audit found violations in this test's log:\n" + render(
        report, elapsed, Scope()
    )


def _failed(request: pytest.FixtureRequest) -> bool:
    report = getattr(request.node, "rep_call", None)
    return report is None or report.failed


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """Keep each phase's report on the item, so fixtures know whether the test passed."""
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report


async def wait_until(
    predicate: Callable[[], Awaitable[bool]] | Callable[[], bool],
    timeout: float = 10.0,
    what: str = "condition",
) -> None:
    """Poll `predicate` until it holds; fail the test with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def free_ports(n: int) -> list[int]:
    """`n` distinct free TCP ports on 127.0.0.1 (bound together, then released), for a
    process that binds them itself (a cluster, HTTP servers of `svc` processes)."""
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


async def raw_publish(
    url: str, subject: bytes, payload: bytes = b"hi", *, headers: bytes = b""
) -> None:
    """What any client on the network can send: a plain PUB (HPUB with `headers`, the raw
    header block after `NATS/1.0`), no client library, so no client-side checks."""
    host, port = url.removeprefix("nats://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        await reader.readline()  # INFO
        writer.write(b'CONNECT {"verbose":false,"pedantic":false,"headers":true}\r\n')
        if headers:
            block = b"NATS/1.0\r\n" + headers + b"\r\n\r\n"
            size = len(block) + len(payload)
            writer.write(b"HPUB %b %d %d\r\n" % (subject, len(block), size))
            writer.write(block + payload + b"\r\n")
        else:
            writer.write(b"PUB " + subject + b" %d\r\n" % len(payload) + payload + b"\r\n")
        writer.write(b"PING\r\n")
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), 5)
        assert line == b"PONG\r\n", line
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def session_board(bus: Bus, account: str) -> SessionStatus | None:
    """What the account's owner last wrote on the session status board, or None."""
    try:
        entry = await (await bus.js.key_value(SESSIONS.name)).get(f"whatsapp.{account}")
    except Exception:  # no bucket yet, or no key
        return None
    return decode(entry.value, SessionStatus) if entry.value else None


async def read_stream(bus: Bus, stream: str, subject: str = ">") -> list[tuple[str, AnyMessage]]:
    """Every message currently stored in `stream` on `subject`, decoded, in order."""
    return [(subj, decode_any(data)) for subj, data, _ in await stream_raw(bus, stream, subject)]


async def stream_raw(
    bus: Bus, stream: str, subject: str = ">"
) -> list[tuple[str, bytes, dict[str, str]]]:
    """Raw (subject, data, headers) of every message in `stream`. Limits streams are read
    with the lossless reader; work queues (where no second consumer may read) by direct
    gets of what is still queued. Any failure fails the test."""
    from services.runtime.reader import queued, read

    info = await bus.js.stream_info(stream)
    work_queue = str(getattr(info.config.retention, "value", info.config.retention))
    reading = queued if work_queue == "workqueue" else read
    return [(s.subject, s.data, s.headers) async for s in reading(bus, stream, subject=subject)]


@asynccontextmanager
async def role(bus: Bus, name: str, **env: str) -> AsyncIterator[None]:
    """Run a role in this process on `bus` (settings from `env`) until the block ends."""
    from services.app import run_role
    from services.runtime.settings import load_settings

    with tempfile.TemporaryDirectory(prefix="svc-role-") as data_dir:
        settings = load_settings({"WHATSAPP_LEASE_TTL": "4", "SVC_DATA_DIR": data_dir, **env})
        stop = asyncio.Event()
        task = asyncio.create_task(run_role(bus, settings, name, stop))  # type: ignore[arg-type]
        try:
            yield
        finally:
            stop.set()
            await task


def die_with_test() -> None:
    """In a test's child before exec: SIGKILL when the test process dies, however it dies
    (an interrupted or killed run leaves no stray `svc` or `nats-server` behind)."""
    if sys.platform == "linux":
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def svc_argv(*args: str) -> list[str]:
    """The argv of a real `svc` process (the console script of this environment)."""
    script = Path(sys.executable).parent / "svc"
    if script.exists():
        return [str(script), *args]
    return [sys.executable, "-m", "services", *args]


class Processes:
    """Real `svc` processes started by a test; all killed at teardown, even on failure."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, Path] = {}

    def env(self, **overrides: str) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if not k.startswith(("NATS_", "SVC_", "WHATSAPP_", "OPENAI_", "SIM_", "OTEL_"))
        }
        env.update({"SVC_DATA_DIR": str(self.tmp_path / "svc-data"), "SVC_LOG_LEVEL": "INFO"})
        env.update(overrides)
        return env

    def start(self, *args: str, **env: str) -> subprocess.Popen[bytes]:
        path = self.tmp_path / f"proc{len(self.procs)}-{'-'.join(args)}.log"
        with path.open("wb") as log:  # the child keeps its own copy of the descriptor
            proc = subprocess.Popen(
                svc_argv(*args),
                env=self.env(**env),
                stdout=subprocess.PIPE,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=self.tmp_path,
                preexec_fn=die_with_test,
            )
        self.logs[proc.pid] = path
        self.procs.append(proc)
        return proc

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        """What the process wrote to stderr so far (its structured logs)."""
        return self.logs[proc.pid].read_text(errors="replace")

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10) -> int:
        """SIGTERM `proc` (its whole group); SIGKILL it if it hangs past `timeout` s."""
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        for pipe in (proc.stdout, proc.stderr):  # a test that failed never read them
            if pipe:
                pipe.close()
        return proc.returncode

    def stop_all(self) -> None:
        """Stop every process in reverse start order (servers last)."""
        for proc in reversed(self.procs):
            self.stop(proc)


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    """Start real svc processes; they are stopped when the test ends, pass or fail."""
    procs = Processes(tmp_path)
    try:
        yield procs
    finally:
        procs.stop_all()


def run_svc(
    *args: str, env: dict[str, str], timeout: float = 60, input_: bytes | None = None
) -> Any:
    """Run `svc ARGS` to completion; return the CompletedProcess."""
    return subprocess.run(
        svc_argv(*args), env=env, capture_output=True, timeout=timeout, input=input_, check=False
    )


async def arun_svc(*args: str, env: dict[str, str], timeout: float = 60) -> Any:
    """`run_svc` off the event loop, so in-process roles and subscriptions keep running."""
    return await asyncio.to_thread(run_svc, *args, env=env, timeout=timeout)


def count_requests(bus: Bus, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The subjects of every request (a round trip) made on `bus` from now on."""
    made: list[str] = []
    original = bus.nc.request

    async def request(subject: str, *args: Any, **kwargs: Any) -> Any:
        made.append(subject)
        return await original(subject, *args, **kwargs)

    monkeypatch.setattr(bus.nc, "request", request)
    return made
