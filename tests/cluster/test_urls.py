"""Clients given every node's URL (NATS_URL as a comma list) connect and move to another
node when theirs dies."""

from __future__ import annotations

import pytest
from nats.js.api import StorageType, StreamConfig

from services.runtime.bus import Bus, connect
from services.runtime.settings import load_settings
from tests.cluster.conftest import Cluster
from tests.conftest import wait_until

pytestmark = pytest.mark.cluster


async def test_a_url_list_written_with_spaces_around_the_commas_connects(
    cluster: Cluster,
) -> None:
    # Given NATS_URL as an operator writes a list by hand (settings accept the spaces)
    written = " , ".join(node.url for node in cluster.nodes)
    settings = load_settings({"NATS_URL": written})
    # When a role connects with it, then it is connected (not "cannot reach NATS")
    async with connect(settings.effective_nats_url, name="spaced", timeout=5) as bus:
        assert bus.nc.is_connected
        await bus.js.account_info()


async def test_a_client_given_every_url_moves_to_another_node_when_its_node_dies(
    cluster: Cluster, cluster_bus: Bus
) -> None:
    bus = cluster_bus
    # Given an R3 stream and a client connected to one of the three nodes
    await bus.js.add_stream(
        StreamConfig(name="T", subjects=["t.>"], storage=StorageType.FILE, num_replicas=3)
    )
    port = bus.nc.connected_url.port if bus.nc.connected_url else None
    (mine,) = [n for n in cluster.nodes if n.port == port]
    # When that node is killed with SIGKILL
    cluster.kill(mine)

    # Then the client reconnects to a surviving node, stays open, and stores again
    def moved() -> bool:
        url = bus.nc.connected_url
        return bus.nc.is_connected and url is not None and url.port != mine.port

    await wait_until(moved, timeout=30, what="a reconnect to a surviving node")

    async def stores() -> bool:
        try:
            await bus.js.publish("t.after", b"x", timeout=1)
        except Exception:  # 503 / timeout while T elects a new leader
            return False
        return True

    await wait_until(stores, timeout=30, what="a publish stored after the node's loss")
    assert not bus.lost.is_set()
    # ... and the node comes back into the cluster (a meta leader known on every node)
    cluster.start_node(mine)
    for node in cluster.nodes:
        await cluster.wait_ready(node)
