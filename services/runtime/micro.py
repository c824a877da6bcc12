"""Every role answers as a NATS micro service `switchboard-<role>` (ADR 0030).

A running role registers with nats-py's `nats.micro`: the built-in `$SRV.PING|INFO|STATS`
verbs (so `nats micro ls|info|stats` list it) carry its version and metadata (role, host,
pid, and the holder id where the role holds leases), and one endpoint, `status`, answers
the process's live state (the accounts it holds now, the core's consumer counts...) as
JSON. Its subject is per instance, under the `$SRV` prefix the control verbs already use
(`$SRV.STATUS.<name>.<id>`), so one permission (`$SRV.>`) covers all of micro.

`discover` is the other side: a scatter request on `$SRV.INFO` gathers every live
`switchboard-*` instance (standbys and replicas included), then each one's `status`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import json
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.micro.request import Request, ServiceError
from nats.micro.service import Service, ServiceConfig

from services.runtime.bus import Bus

log = logging.getLogger(__name__)

NAME_PREFIX = "switchboard-"
STATUS_ENDPOINT = "status"
# Seconds a stopping role gives the micro subscriptions to drain.
_STOP_TIMEOUT = 2.0

# What a status handler returns: plain data, encoded as JSON.
StatusSource = Callable[[], Mapping[str, Any]]


def service_name(role: str) -> str:
    """The micro service name of `role`: `switchboard-<role>`."""
    return f"{NAME_PREFIX}{role}"


def status_subject(name: str, instance: str) -> str:
    """Where one instance's `status` endpoint listens."""
    return f"$SRV.STATUS.{name}.{instance}"


def package_version() -> str:
    """The installed switchboard version (a semantic version, as micro requires)."""
    try:
        return importlib.metadata.version("switchboard")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree
        return "0.0.0+unknown"


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


@asynccontextmanager
async def micro_service(
    bus: Bus,
    role: str,
    *,
    metadata: Mapping[str, str] | None = None,
    status: StatusSource | None = None,
) -> AsyncIterator[Service]:
    """Register `switchboard-<role>` on `bus` until the block ends (then unregister).
    `metadata` is static (role, host and pid are always added); `status()` is called for
    every request to the `status` endpoint and must return JSON-able data."""
    name = service_name(role)
    meta = {"role": role, "host": socket.gethostname(), "pid": str(os.getpid())}
    meta.update(metadata or {})
    service = Service(
        bus.nc,
        ServiceConfig(
            name=name,
            version=package_version(),
            description=f"Switchboard role {role}",
            metadata=meta,
        ),
    )
    started = _now()
    source: StatusSource = status or (lambda: {})

    async def answer(request: Request) -> None:
        try:
            live = dict(source())
        except Exception as exc:
            # Counted as an endpoint error (STATS); the details stay in this log, never
            # in the answer (they could name a secret).
            log.error("micro status failed", exc_info=exc, extra={"service": name})
            raise ServiceError("500", "status unavailable: see the worker's log") from None
        body = {
            "name": name,
            "id": service.id,
            "version": package_version(),
            "started": started,
            **meta,
            **live,
        }
        await request.respond(msgspec.json.encode(body))

    await service.start()
    try:
        await service.add_endpoint(
            name=STATUS_ENDPOINT,
            subject=status_subject(name, service.id),
            handler=answer,
            metadata={"answers": "this instance's live state as JSON"},
        )
        log.info("micro service registered", extra={"service": name, "id": service.id})
        yield service
    finally:
        await _stop(service, bus.nc)
        log.info("micro service stopped", extra={"service": name, "id": service.id})


async def _stop(service: Service, nc: Client) -> None:
    """Unsubscribe every micro subject; a connection already gone has nothing to stop."""
    if not nc.is_connected:
        return
    try:
        await asyncio.wait_for(service.stop(), _STOP_TIMEOUT)
    except (nats.errors.Error, TimeoutError) as exc:
        log.warning("micro service did not stop cleanly", extra={"error": repr(exc)})


@dataclass(frozen=True)
class Found:
    """One live instance as `$SRV.INFO` described it."""

    name: str
    id: str
    version: str
    metadata: dict[str, str]
    endpoints: list[dict[str, Any]]


async def scatter(
    nc: Client, subject: str, *, first: float = 1.0, stall: float = 0.3, limit: float = 3.0
) -> list[bytes]:
    """Every answer to one request on `subject` from any number of responders: wait up
    to `first` s for the first, then until `stall` s pass without another (at most
    `limit` s in all). Like `nats micro ls`, a responder slower than that is missed."""
    answers: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def collect(msg: Msg) -> None:
        # The server's "no responders" status (503): nobody listens, so nothing will come.
        none = (msg.headers or {}).get("Status") == "503" and not msg.data
        answers.put_nowait(None if none else msg.data)

    inbox = nc.new_inbox()
    sub = await nc.subscribe(inbox, cb=collect)
    found: list[bytes] = []
    try:
        await nc.publish(subject, b"", reply=inbox)
        await nc.flush()
        deadline = asyncio.get_running_loop().time() + limit
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                data = await asyncio.wait_for(
                    answers.get(), min(remaining, stall if found else first)
                )
            except TimeoutError:
                break
            if data is None:
                break
            found.append(data)
    finally:
        with contextlib.suppress(nats.errors.Error):
            await sub.unsubscribe()
    return found


async def discover(nc: Client, **timing: float) -> list[Found]:
    """Every live `switchboard-*` micro instance, by `$SRV.INFO` (sorted by name, id)."""
    found: dict[str, Found] = {}
    for data in await scatter(nc, "$SRV.INFO", **timing):
        try:
            info = json.loads(data)
            name, instance = str(info["name"]), str(info["id"])
        except (ValueError, KeyError, TypeError):
            continue  # another program's answer on $SRV: not ours to judge
        if not name.startswith(NAME_PREFIX):
            continue
        found[instance] = Found(
            name=name,
            id=instance,
            version=str(info.get("version", "")),
            metadata={str(k): str(v) for k, v in (info.get("metadata") or {}).items()},
            endpoints=list(info.get("endpoints") or []),
        )
    return sorted(found.values(), key=lambda f: (f.name, f.id))


async def live_status(nc: Client, found: Found, *, timeout: float = 2.0) -> dict[str, Any] | None:
    """What one instance's `status` endpoint answers now (None: no answer, or an error)."""
    subject = next(
        (e.get("subject") for e in found.endpoints if e.get("name") == STATUS_ENDPOINT), None
    )
    if not subject:
        return None
    try:
        msg = await nc.request(str(subject), b"", timeout=timeout)
    except (nats.errors.Error, TimeoutError):
        return None
    if (msg.headers or {}).get("Nats-Service-Error-Code"):
        return None
    try:
        body = json.loads(msg.data)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None
