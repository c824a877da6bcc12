"""The real system for a bench: role `all` (sim transport, echo LLM) in this process on a
fresh embedded nats-server, with a sim user of account `default`."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from services.app import system
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from services.runtime.settings import load_settings


@asynccontextmanager
async def sim_system() -> AsyncIterator[tuple[Bus, SimUser]]:
    """(bus, sim user) of the running system; everything stopped on exit, even on error.
    Chats are not rate-limited: the benches flood them by design."""
    with tempfile.TemporaryDirectory() as tmp:
        async with EmbeddedNats(Path(tmp) / "nats", port=0) as server:
            env = {
                "NATS_URL": server.url,
                "SVC_LOG_LEVEL": "ERROR",
                "SVC_DATA_DIR": tmp,
                "SVC_CHAT_RATE": "off",
            }
            async with (
                system(load_settings(env), "all") as (bus, _, _task),
                SimUser(bus, "default") as user,
            ):
                yield bus, user
