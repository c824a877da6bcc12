"""The CLI in a new user's first hour: a wrong role, a taken port, logs a person can read,
where the store is, and `svc chat` when the reply is slow or the connection drops."""

from __future__ import annotations

import asyncio
import os
import pty
import subprocess
import time
from pathlib import Path

import pytest

from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams
from tests.conftest import Processes, arun_svc, die_with_test, role, run_svc, svc_argv

pytestmark = pytest.mark.slow


def test_an_unknown_role_names_the_argument_and_the_valid_roles(processes: Processes) -> None:
    result = run_svc("run", "nosuch", env=processes.env(), timeout=30)
    assert result.returncode == 2
    (line,) = result.stderr.decode().strip().splitlines()
    assert "SVC_ROLE" not in line  # the user never set it
    assert "'nosuch'" in line
    assert "ROLE" in line
    assert "core" in line
    assert "whatsapp-ingress" in line


async def test_a_taken_embedded_port_names_the_option_svc_run_has(
    tmp_path: Path, processes: Processes
) -> None:
    async with EmbeddedNats(tmp_path / "holder", port=0) as holder:
        port = holder.url.rsplit(":", 1)[1]
        result = await arun_svc("run", "all", "--nats-port", port, env=processes.env())
    assert result.returncode == 1
    line = result.stderr.decode().strip().splitlines()[-1]
    assert f"port {port}" in line
    assert "already in use" in line
    assert "--nats-port" in line
    assert "(--port)" not in line


def _start_on_a_terminal(
    processes: Processes, *args: str, **env: str
) -> tuple[subprocess.Popen[bytes], int]:
    """A `svc` process whose stderr is a terminal (a pty); returns it and the pty's reader."""
    reader, writer = pty.openpty()
    proc = subprocess.Popen(
        svc_argv(*args),
        env=processes.env(**env),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=writer,
        cwd=processes.tmp_path,
        start_new_session=True,
        preexec_fn=die_with_test,
    )
    os.close(writer)
    processes.procs.append(proc)
    processes.logs[proc.pid] = processes.tmp_path / "unused.log"
    return proc, reader


def _read_all(fd: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:  # EIO: the other side is closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode(errors="replace")


def test_logs_are_text_on_a_terminal_and_json_otherwise(processes: Processes) -> None:
    # NATS_URL points at nothing: the role logs its start, then fails to connect.
    env = {"NATS_URL": "nats://127.0.0.1:9", "NATS_CONNECT_TIMEOUT": "0.5"}
    proc, fd = _start_on_a_terminal(processes, "run", "core", **env)
    proc.wait(60)
    on_terminal = _read_all(fd)
    assert " INFO    services.app: starting role=core" in on_terminal, on_terminal
    assert '{"ts"' not in on_terminal
    piped = run_svc("run", "core", env=processes.env(**env), timeout=60)
    assert piped.stderr.decode().startswith('{"ts"')
    asked = run_svc("run", "core", env=processes.env(SVC_LOG_FORMAT="text", **env), timeout=60)
    assert " INFO    services.app: starting" in asked.stderr.decode()


def test_the_absolute_data_dir_is_logged_at_start_and_shown_by_status(
    processes: Processes,
) -> None:
    env = processes.env(
        SVC_DATA_DIR="relative-store", NATS_URL="nats://127.0.0.1:9", NATS_CONNECT_TIMEOUT="0.5"
    )
    result = subprocess.run(
        svc_argv("run", "core"), env=env, cwd=processes.tmp_path, capture_output=True, timeout=60
    )
    assert f'"data_dir": "{processes.tmp_path / "relative-store"}"' in result.stderr.decode()


async def test_status_names_the_local_data_dir(
    processes: Processes, nats_server: EmbeddedNats
) -> None:
    env = processes.env(SVC_DATA_DIR="relative-store", NATS_URL=nats_server.url)
    result = await asyncio.to_thread(
        subprocess.run,
        svc_argv("status"),
        env=env,
        cwd=processes.tmp_path,
        capture_output=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr.decode()
    assert f"local data dir: {processes.tmp_path / 'relative-store'}" in result.stdout.decode()


class Chat:
    """`svc chat` on a terminal: a pty for stdin, its stdout and stderr read line by line."""

    def __init__(self, processes: Processes, url: str, wait: float) -> None:
        self.master, slave = pty.openpty()
        self.proc = subprocess.Popen(
            svc_argv("chat", "--wait", str(wait)),
            env=processes.env(NATS_URL=url),
            stdin=slave,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=processes.tmp_path,
            start_new_session=True,
            preexec_fn=die_with_test,
        )
        os.close(slave)
        processes.procs.append(self.proc)
        self.out = ""
        self.err = ""

    def type(self, line: str) -> None:
        os.write(self.master, line.encode() + b"\n")

    async def until(
        self, needle: str, *, stream: str = "out", timeout: float = 60, after: int = 0
    ) -> None:
        """Read until `needle` appears (past position `after`: a prompt printed again)."""
        pipe = self.proc.stdout if stream == "out" else self.proc.stderr
        assert pipe is not None
        deadline = time.monotonic() + timeout
        while needle not in (self.out if stream == "out" else self.err)[after:]:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                pytest.fail(f"no {needle!r} on std{stream}: {self.out!r} {self.err!r}")
            chunk = await asyncio.wait_for(
                asyncio.to_thread(os.read, pipe.fileno(), 4096), remaining
            )
            if not chunk:
                pytest.fail(f"std{stream} closed before {needle!r}: {self.out!r} {self.err!r}")
            if stream == "out":
                self.out += chunk.decode(errors="replace")
            else:
                self.err += chunk.decode(errors="replace")

    def quit(self) -> int:
        os.write(self.master, b"\x04")  # Ctrl-D
        code = self.proc.wait(60)
        os.close(self.master)
        for pipe in (self.proc.stdout, self.proc.stderr):
            assert pipe is not None
            rest = pipe.read().decode(errors="replace")
            if pipe is self.proc.stdout:
                self.out += rest
            else:
                self.err += rest
            pipe.close()
        return code


async def test_chat_says_when_no_reply_came_and_prints_the_late_one_on_its_own_line(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    # Given no core running, a chat on a terminal waiting 1 s for each reply
    chat = Chat(processes, nats_server.url, wait=1)
    await chat.until("you> ")
    chat.type("hello")
    # Then after the wait it says so in one line, and prompts again
    await chat.until("(no reply yet after 1s")
    said = chat.out.index("(no reply yet after 1s")
    await chat.until("you> ", timeout=10, after=said)
    prompt_at = chat.out.rindex("you> ")
    # When a core starts, the reply comes late: on its own line, labelled, prompt again
    async with role(bus, "all"):
        await chat.until("bot (late)> echo: hello")
        late = chat.out.index("bot (late)> ")
        assert chat.out[late - 1] == "\n"  # not glued to the prompt
        assert late > prompt_at
        await chat.until("you> ", timeout=10, after=late)
        chat.type("again")
        await chat.until("echo: again")  # on time or late, on a loaded box
        assert chat.quit() == 0, chat.err


async def test_chat_shows_a_lost_connection_as_one_human_line_not_json_logs(
    tmp_path: Path, processes: Processes
) -> None:
    server = EmbeddedNats(tmp_path / "nats", port=0)
    await server.start()
    try:
        async with _provisioned(server.url):
            pass
        chat = Chat(processes, server.url, wait=1)
        await chat.until("you> ")
    finally:
        await server.stop()
    await chat.until("(lost the connection to NATS; reconnecting...)", stream="err")
    chat.quit()
    assert "{" not in chat.err, chat.err
    assert "{" not in chat.out, chat.out


def _provisioned(url: str) -> object:
    from contextlib import asynccontextmanager

    from services.runtime.bus import connect

    @asynccontextmanager
    async def go():  # type: ignore[no-untyped-def]
        async with connect(url, name="t") as b:
            await ensure_streams(b.js)
            yield b

    return go()
