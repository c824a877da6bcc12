"""The embedded nats-server: starts on a free port, reports a taken port, cleans up."""

from __future__ import annotations

import os
from pathlib import Path

import nats
import pytest

from services.runtime.errors import EmbeddedServerError
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, run_svc


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_starts_with_jetstream_on_a_free_port_and_stops_cleanly(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "store", port=0) as server:
        pid = server.pid
        assert pid is not None
        nc = await nats.connect(server.url)
        info = await nc.jetstream().account_info()
        await nc.close()
        assert info.limits is not None
    assert not _alive(pid)
    assert (tmp_path / "store" / "jetstream").is_dir()


async def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    async with EmbeddedNats(tmp_path / "a", port=0) as first:
        port = int(first.url.rsplit(":", 1)[1])
        with pytest.raises(EmbeddedServerError, match=f"port {port} .* already in use"):
            async with EmbeddedNats(tmp_path / "b", port=port):
                pass


async def test_svc_nats_serve_reports_a_taken_port_in_one_line(
    tmp_path: Path, processes: Processes
) -> None:
    async with EmbeddedNats(tmp_path / "a", port=0) as first:
        port = first.url.rsplit(":", 1)[1]
        result = run_svc("nats", "serve", "--port", port, env=processes.env(), timeout=30)
    assert result.returncode == 1
    lines = result.stderr.decode().strip().splitlines()
    assert len(lines) == 1
    assert "already in use" in lines[0]
