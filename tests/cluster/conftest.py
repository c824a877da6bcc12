"""A real 3-node JetStream cluster on loopback: start, kill -9 / restart one node, find the
leader of a stream. Every wait is on a condition; every node is killed at teardown."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import nats
import pytest

from services.runtime.bus import Bus, connect
from services.runtime.nats_server import nats_server_binary
from tests.conftest import assert_audit_clean, die_with_test, wait_until

CLUSTER_NAME = "switchboard-test"


def _free_ports(count: int) -> list[int]:
    """`count` distinct free loopback ports (held open together, so no duplicates). A
    restarted node must come back on the same ports, so they are fixed up front."""
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


@dataclass
class Node:
    """One nats-server of the cluster: its own client port, cluster port, store dir."""

    name: str
    port: int
    cluster_port: int
    home: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def config(self, routes: list[str]) -> str:
        return json.dumps(
            {
                "server_name": self.name,
                "listen": f"127.0.0.1:{self.port}",
                "jetstream": {"store_dir": str(self.home / "store")},
                "cluster": {
                    "name": CLUSTER_NAME,
                    "listen": f"127.0.0.1:{self.cluster_port}",
                    "routes": routes,
                },
            },
            indent=2,
        )


@dataclass
class Cluster:
    """Three nodes with routes to each other; `urls` is the comma list clients get."""

    nodes: list[Node]
    binary: str = field(default_factory=nats_server_binary)

    @property
    def urls(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def node(self, name: str) -> Node:
        (found,) = [n for n in self.nodes if n.name == name]
        return found

    def start_node(self, node: Node) -> None:
        assert not node.running, f"{node.name} is already running"
        routes = [f"nats-route://127.0.0.1:{n.cluster_port}" for n in self.nodes]
        conf = node.home / "node.conf"
        conf.write_text(node.config(routes))
        with (node.home / "server.log").open("ab") as log:
            node.proc = subprocess.Popen(
                [self.binary, "-c", str(conf)],
                stdout=log,
                stderr=log,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                preexec_fn=die_with_test,
            )

    def kill(self, node: Node) -> None:
        """kill -9: no shutdown, no stepdown, no flush (the Raft peers find out by silence)."""
        assert node.proc is not None
        with contextlib.suppress(ProcessLookupError):
            os.kill(node.proc.pid, signal.SIGKILL)
        node.proc.wait()

    def stop_all(self) -> None:
        for node in self.nodes:
            if node.proc is not None and node.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.pid, signal.SIGKILL)
                node.proc.wait()

    def log(self, node: Node) -> str:
        return (node.home / "server.log").read_text(errors="replace")

    async def wait_ready(self, node: Node, timeout: float = 30) -> None:
        """Until `node` answers the JetStream API (it has joined and knows a meta leader)."""
        await wait_until(
            lambda: _jetstream_answers(node.url),
            timeout=timeout,
            what=f"{node.name} serving JetStream in the cluster",
        )

    async def leader(self, bus: Bus, stream: str) -> Node:
        """The node leading `stream`'s Raft group ($JS.API.STREAM.INFO cluster.leader)."""
        name = ""

        async def known() -> bool:
            nonlocal name
            with contextlib.suppress(Exception):  # no responders / timeout mid-election
                # A short timeout of our own (the JetStream context's is 5 s), so the time
                # a new leader is first seen is close to when it was elected.
                reply = await bus.nc.request(f"$JS.API.STREAM.INFO.{stream}", b"", timeout=0.5)
                name = json.loads(reply.data).get("cluster", {}).get("leader", "")
            return bool(name)

        await wait_until(known, timeout=30, what=f"a leader for {stream}")
        return self.node(name)

    async def wait_current(self, bus: Bus, stream: str, timeout: float = 60) -> None:
        """Until `stream` has a leader and every replica is online and current."""

        async def current() -> bool:
            try:
                info = await bus.js.stream_info(stream)
            except Exception:
                return False
            cluster = info.cluster
            if cluster is None or not cluster.leader:
                return False
            replicas = cluster.replicas or []
            return len(replicas) == len(self.nodes) - 1 and all(
                r.current and not r.offline for r in replicas
            )

        await wait_until(current, timeout=timeout, what=f"every replica of {stream} current")


async def _quiet(exc: Exception) -> None:
    """A node that is not up yet refuses the probe: that is the answer, not an error."""


async def _jetstream_answers(url: str) -> bool:
    try:
        nc = await nats.connect(
            url, connect_timeout=1, allow_reconnect=False, error_cb=_quiet, max_reconnect_attempts=0
        )
    except Exception:
        return False
    try:
        reply = await nc.request("$JS.API.INFO", b"", timeout=1)
        return "error" not in json.loads(reply.data)
    except Exception:
        return False
    finally:
        with contextlib.suppress(Exception):
            await nc.close()


@pytest.fixture
async def cluster(tmp_path: Path) -> AsyncIterator[Cluster]:
    """A formed 3-node JetStream cluster with an elected meta leader; always torn down."""
    ports = _free_ports(6)
    nodes = []
    for i in range(3):
        home = tmp_path / f"n{i + 1}"
        home.mkdir()
        nodes.append(Node(f"n{i + 1}", ports[2 * i], ports[2 * i + 1], home))
    c = Cluster(nodes)
    try:
        for node in nodes:
            c.start_node(node)
        started = time.monotonic()
        await asyncio.gather(*(c.wait_ready(n) for n in nodes))
        print(f"\ncluster formed in {time.monotonic() - started:.2f}s")
        yield c
    finally:
        c.stop_all()


@pytest.fixture
async def cluster_bus(cluster: Cluster, request: pytest.FixtureRequest) -> AsyncIterator[Bus]:
    """A test client given all three URLs; the audit must be clean over the log at the end."""
    async with connect(cluster.urls, name="cluster-test", timeout=10) as bus:
        yield bus
        await assert_audit_clean(bus, request)
