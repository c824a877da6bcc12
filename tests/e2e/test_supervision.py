"""Real processes and a real nats-server: a process whose connection is gone for good, or
whose embedded server died, exits non-zero with one line; a refused login or TLS
handshake is reported at once (not as a timeout)."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest

from services.app import EXIT_CONNECTION_LOST, EXIT_EMBEDDED_SERVER_DIED
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, arun_svc, raw_publish, wait_until
from tests.e2e.conftest import children, cmdline, read_url
from tests.runtime.test_connection import BAD_SUBJECT

pytestmark = pytest.mark.slow

# Generous bounds for a loaded 2-core box; measured figures are in docs/runbook.md.
EXIT_BOUND = 30.0
REFUSAL_BOUND = 10.0  # with NATS_CONNECT_TIMEOUT=60: a refusal must not wait for it


def last_line(processes: Processes, proc: subprocess.Popen[bytes]) -> str:
    lines = processes.log(proc).strip().splitlines()
    return lines[-1] if lines else ""


async def exited(proc: subprocess.Popen[bytes], processes: Processes) -> int:
    await wait_until(
        lambda: proc.poll() is not None, EXIT_BOUND, f"exit of {proc.args}: {processes.log(proc)}"
    )
    return proc.returncode


@asynccontextmanager
async def configured_server(tmp_path: Path, config: str) -> AsyncIterator[EmbeddedNats]:
    """A JetStream nats-server on a free port with `config` (auth, TLS) in a file."""
    conf = tmp_path / "server.conf"
    write_config(conf, config)
    async with EmbeddedNats(
        tmp_path / "nats-conf", port=0, name=SERVER_NAME, extra_args=("-c", str(conf))
    ) as server:
        yield server


SERVER_NAME = "svc-test"


def write_config(path: Path, config: str) -> None:
    # A reload compares the file with the running options: the name must be in it too.
    path.write_text(f"server_name: {SERVER_NAME}\n{config}")


async def test_a_role_whose_connection_is_closed_for_good_exits_3_with_one_line(
    tmp_path: Path, processes: Processes
) -> None:
    # Given `svc run core` connected to a server without auth
    async with configured_server(tmp_path, "# no auth yet\n") as server:
        core = processes.start("run", "core", NATS_URL=server.url)
        await wait_until(lambda: '"running"' in processes.log(core), 60, "core running")
        # When the server's config starts requiring a login and is reloaded: the server
        # answers -ERR 'Authorization Violation' and nats-py closes the client for good
        write_config(tmp_path / "server.conf", "authorization { user: u, password: p }\n")
        assert server.pid is not None
        started = time.monotonic()
        os.kill(server.pid, signal.SIGHUP)
        # Then the process exits 3 with one line naming the cause (no zombie)
        code = await exited(core, processes)
        elapsed = time.monotonic() - started
    assert code == EXIT_CONNECTION_LOST, processes.log(core)
    line = last_line(processes, core)
    assert line.startswith("svc: NATS connection closed for good"), line
    assert "authorization" in line.lower()
    assert elapsed < EXIT_BOUND


async def test_svc_nats_serve_exits_4_when_its_server_is_killed(processes: Processes) -> None:
    serve = processes.start("nats", "serve", "--port", "0")
    read_url(serve)
    (child,) = children(serve.pid)
    os.kill(child, signal.SIGKILL)
    assert await exited(serve, processes) == EXIT_EMBEDDED_SERVER_DIED
    line = last_line(processes, serve)
    assert "embedded nats-server" in line, line
    assert "SIGKILL" in line, line


async def test_svc_run_all_exits_4_when_its_embedded_server_is_killed(
    processes: Processes,
) -> None:
    run_all = processes.start("run", "all", "--nats-port", "0")
    await wait_until(lambda: '"running"' in processes.log(run_all), 60, "role all running")
    (child,) = [p for p in children(run_all.pid) if "nats-server" in cmdline(p)]
    os.kill(child, signal.SIGKILL)
    assert await exited(run_all, processes) == EXIT_EMBEDDED_SERVER_DIED
    line = last_line(processes, run_all)
    assert line.startswith("svc: the embedded nats-server"), line
    assert "SIGKILL" in line


@pytest.mark.parametrize(
    ("config", "wrong", "right"),
    [
        (
            "authorization { user: alice, password: s3cret-pass }\n",
            {"NATS_USER": "alice", "NATS_PASSWORD": "not-the-pass"},
            {"NATS_USER": "alice", "NATS_PASSWORD": "s3cret-pass"},
        ),
        (
            "authorization { token: s3cret-token }\n",
            {"NATS_TOKEN": "not-the-token"},
            {"NATS_TOKEN": "s3cret-token"},
        ),
    ],
    ids=["user-password", "token"],
)
async def test_a_refused_login_fails_at_once_naming_authorization_and_the_right_one_works(
    tmp_path: Path,
    processes: Processes,
    config: str,
    wrong: dict[str, str],
    right: dict[str, str],
) -> None:
    async with configured_server(tmp_path, config) as server:
        env = processes.env(NATS_URL=server.url, NATS_CONNECT_TIMEOUT="60", **wrong)
        started = time.monotonic()
        refused = await arun_svc("streams", "ensure", env=env)
        elapsed = time.monotonic() - started
        ok = await arun_svc("streams", "ensure", env={**env, **right})
        # A role refuses the same way (exit 2: fix the configuration, do not restart)
        role = await arun_svc("run", "core", env=env)
    lines = refused.stderr.decode().strip().splitlines()
    assert refused.returncode == 2, lines
    assert len(lines) == 1, lines
    assert "authorization" in lines[0], lines
    assert "Timeout" not in lines[0]
    assert elapsed < REFUSAL_BOUND, f"took {elapsed:.1f}s: waited for the timeout"
    for secret in [*wrong.values(), *right.values()]:
        if secret != "alice":
            assert secret not in refused.stderr.decode()
    assert ok.returncode == 0, ok.stderr.decode()
    assert role.returncode == 2
    assert "authorization" in role.stderr.decode().strip().splitlines()[-1]


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def make_certs(where: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1: (ca, cert, key)."""
    where.mkdir()
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "1",
             "-subj", "/CN=svc-test-ca", cwd=where)  # fmt: skip
    _openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr",
             "-subj", "/CN=127.0.0.1", cwd=where)  # fmt: skip
    (where / "san.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    _openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
             "-CAcreateserial", "-out", "server.pem", "-days", "1", "-extfile", "san.ext",
             cwd=where)  # fmt: skip
    return where / "ca.pem", where / "server.pem", where / "server.key"


@pytest.mark.skipif(shutil.which("openssl") is None, reason="no openssl CLI to make test certs")
async def test_a_tls_failure_fails_at_once_naming_tls_and_the_right_ca_works(
    tmp_path: Path, processes: Processes
) -> None:
    ca, cert, key = make_certs(tmp_path / "certs")
    config = f'tls {{ cert_file: "{cert}", key_file: "{key}" }}\n'
    async with configured_server(tmp_path, config) as server:
        env = processes.env(NATS_URL=server.url, NATS_CONNECT_TIMEOUT="60")
        started = time.monotonic()
        refused = await arun_svc("streams", "ensure", env=env)  # no CA: not trusted
        elapsed = time.monotonic() - started
        ok = await arun_svc("streams", "ensure", env={**env, "NATS_TLS_CA": str(ca)})
    lines = refused.stderr.decode().strip().splitlines()
    assert refused.returncode == 2, lines
    assert len(lines) == 1, lines
    assert "TLS" in lines[0], lines
    assert elapsed < REFUSAL_BOUND, f"took {elapsed:.1f}s: waited for the timeout"
    assert ok.returncode == 0, ok.stderr.decode()


async def test_a_missing_tls_file_is_a_config_error_naming_the_variable(
    processes: Processes,
) -> None:
    result = await arun_svc("status", env=processes.env(NATS_TLS_CA="/nonexistent/ca.pem"))
    assert result.returncode == 2
    (line,) = result.stderr.decode().strip().splitlines()
    assert "NATS_TLS_CA" in line
    assert "no such file" in line


async def test_real_roles_keep_serving_after_a_non_utf8_inbound_subject_and_audit_finishes(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    core = processes.start("run", "core", NATS_URL=url)
    processes.start("run", "whatsapp", NATS_URL=url)
    await wait_until(lambda: '"consuming"' in processes.log(core), 60, "core consuming")
    # Given a raw client stores a subject that is not UTF-8 on INBOUND
    await raw_publish(url, BAD_SUBJECT)
    # When a valid message follows, then it is answered, and no process lost its connection
    async with SimUser(bus, "default") as user:
        await user.send("alice@s.whatsapp.net", "still there?")
        assert await user.wait_replies(30), processes.log(core)
    assert all(p.poll() is None for p in processes.procs)
    # And `svc audit` reads the stream to the end instead of hanging on it
    audited = await arun_svc("audit", env=processes.env(NATS_URL=url), timeout=120)
    assert audited.returncode == 0, audited.stdout.decode() + audited.stderr.decode()
