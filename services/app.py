"""Wiring: which workers a role runs, on which connection. Adapters are chosen here."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, asynccontextmanager
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors

from contracts.streams import PLUGINS
from services.channel.dispatch import EventDispatch
from services.channel.fleet import Fleet, LeaseBoard
from services.channel.ingress import Ingress
from services.channel.owner import AccountOwner
from services.channel.port import Transport
from services.core.llm import LLM, EchoLLM, LLMError, OpenAILLM
from services.core.worker import CoreWorker
from services.plugins.projection import PluginProjection
from services.plugins.registry import discover, manifests
from services.plugins.runner import ToolRunner
from services.plugins.tools import ProjectedTools
from services.runtime.bus import Bus, connect
from services.runtime.errors import ConfigError
from services.runtime.health import READINESS, Flag, connected, tasks_alive
from services.runtime.lease import check_send_cover, new_holder_id
from services.runtime.lifecycle import loop_name
from services.runtime.metrics import LagSampler, projection_running, setup_metrics
from services.runtime.micro import micro_service
from services.runtime.nats_server import EmbeddedNats
from services.runtime.provisioning import ensure_streams, raise_on_conflict, warn_on_differences
from services.runtime.settings import CloudSettings, Role, Settings
from services.runtime.telemetry import setup_tracing
from services.whatsapp.sim import SimTransport, sim_send_timeout

if TYPE_CHECKING:
    from services.runtime.http import HttpServer

log = logging.getLogger(__name__)

BRIDGE_ENV = "SVC_TEST_NEONIZE_BRIDGE"  # services.whatsapp.neonize's test seam
EMBEDDED_PORT = 4222
# How a role's process ends when it cannot go on (see docs/runbook.md, "Exit codes").
EXIT_CONNECTION_LOST = 3  # the NATS connection is closed for good: restart the process
EXIT_EMBEDDED_SERVER_DIED = 4  # the embedded nats-server child died: restart the process


def make_llm(settings: Settings) -> LLM:
    """The LLM adapter SVC_LLM selects."""
    if settings.llm == "echo":
        return EchoLLM(latency=settings.core.echo_latency_ms / 1000)
    try:
        return OpenAILLM(
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key.value,
            model=settings.llm_model,
            timeout=settings.core.llm_timeout,
            retries=settings.core.llm_retries,
        )
    except LLMError as exc:
        raise ConfigError(str(exc)) from None


def plugin_db(settings: Settings) -> Path:
    """Where this process keeps its plugin projection (shared safely by local replicas)."""
    return settings.data_dir / "projections" / "plugins.sqlite"


def make_transport(settings: Settings, bus: Bus) -> Transport:
    """The transport adapter WHATSAPP_TRANSPORT selects."""
    if settings.transport == "sim":
        return SimTransport(bus, settings.sim)
    if settings.transport == "cloud":
        from services.whatsapp.cloud import CloudTransport

        return CloudTransport(bus, cloud_settings(settings))
    # Imported here: only a process that runs neonize loads its Go library.
    from services.whatsapp.neonize import NeonizeTransport, bridge_from_env

    return NeonizeTransport(
        bus, settings.whatsapp_store, settings.neonize, bridge=bridge_from_env()
    )


def cloud_settings(settings: Settings) -> CloudSettings:
    """The Cloud API settings (loaded with WHATSAPP_TRANSPORT=cloud)."""
    if settings.cloud is None:
        raise ConfigError("WHATSAPP_TRANSPORT=cloud but no Cloud API settings were loaded")
    return settings.cloud


def neonize_executor(accounts: int) -> ThreadPoolExecutor:
    """The default executor of a neonize process: every connected or dialing client holds
    one thread for its whole life and every other neonize call runs in a thread too, so
    with fewer threads than accounts all neonize calls starve (two per account, headroom)."""
    return ThreadPoolExecutor(max_workers=2 * accounts + 8, thread_name_prefix="neonize")


@asynccontextmanager
async def nats_url(
    settings: Settings, role: Role, *, embedded_port: int = EMBEDDED_PORT
) -> AsyncIterator[tuple[str, EmbeddedNats | None]]:
    """NATS_URL when set; else role `all` embeds a server (under SVC_DATA_DIR) and the
    other roles connect to the default local server. Yields (url, embedded server)."""
    if settings.nats_url or role != "all":
        yield settings.effective_nats_url, None
        return
    hint = (
        "pick another with 'svc run all --nats-port N' (0 picks a free one),"
        " or point NATS_URL at the running server"
    )
    async with EmbeddedNats(
        settings.data_dir / "nats",
        port=embedded_port,
        port_hint=hint,
        monitor_port=settings.nats_monitor_port,
    ) as server:
        yield server.url, server


async def provision(bus: Bus, settings: Settings) -> None:
    """Ensure every stream and bucket exists; refuse to run on a conflicting one."""
    results = await ensure_streams(bus.js, replicas=settings.stream_replicas)
    raise_on_conflict(results)
    warn_on_differences(results)


# JetStream not answering yet: no JetStream on the server (yet), a cluster still electing
# its meta leader, the connection between servers. Waited out (not ready meanwhile); a
# conflicting stream or a refused permission still ends the process.
_NOT_YET = (
    nats.errors.NoRespondersError,
    nats.errors.TimeoutError,
    nats.js.errors.ServiceUnavailableError,
    TimeoutError,
)
PROVISION_RETRY_MAX = 5.0


async def provision_when_able(bus: Bus, settings: Settings, streams: Flag) -> None:
    """`provision`, retried (backing off to PROVISION_RETRY_MAX s) while JetStream does not
    answer; `streams` says why meanwhile (`/readyz`). Ends if the connection is lost."""
    delay = 0.25
    while True:
        try:
            await provision(bus, settings)
        except _NOT_YET as exc:
            if (denied := bus.permission_error()) is not None:
                raise denied from None  # a refused permission, not a JetStream still starting
            why = f"JetStream is not answering ({type(exc).__name__}: {exc})"
            streams.unmet(f"not provisioned yet: {why}")
            log.warning("streams not provisioned yet; retrying", extra={"error": why})
        else:
            streams.met()
            return
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(bus.lost.wait(), delay)
        if bus.lost.is_set():
            raise bus.lost_error()
        delay = min(delay * 2, PROVISION_RETRY_MAX)


def check_role(settings: Settings, role: Role) -> None:
    """Refuse, before connecting, a role the transport cannot support."""
    if role == "whatsapp-ingress" and settings.transport == "neonize":
        raise ConfigError(
            f"role whatsapp-ingress cannot run with WHATSAPP_TRANSPORT={settings.transport}: "
            "its session has one socket per account, so receiving needs the lease -- "
            "run role whatsapp or whatsapp-egress instead"
        )
    if role == "whatsapp-ingress" and settings.transport == "cloud" and settings.http.port is None:
        raise ConfigError(
            "role whatsapp-ingress with WHATSAPP_TRANSPORT=cloud receives webhooks over HTTP:"
            " set SVC_HTTP_PORT (and SVC_HTTP_HOST, default 127.0.0.1) to the port Meta's"
            " webhook URL reaches"
        )
    if role in ("all", "core"):
        make_llm(settings)
    if role in ("all", "web"):  # outgoing webhooks' settings (h-hooks): one line if bad
        from services.web.hooks import load_hook_settings

        load_hook_settings()
    if role in ("all", "whatsapp", "whatsapp-egress") and settings.transport == "sim":
        check_send_cover(settings.lease_ttl, sim_send_timeout(settings.sim), "sim")
    if role in ("all", "whatsapp", "whatsapp-egress") and settings.transport == "cloud":
        check_send_cover(settings.lease_ttl, cloud_settings(settings).send_timeout, "cloud")
    if role in ("all", "whatsapp", "whatsapp-egress") and settings.transport == "neonize":
        check_send_cover(settings.lease_ttl, settings.neonize.send_timeout, "neonize")
        store = settings.whatsapp_store
        if store.path is not None and store.path.expanduser().is_dir():
            raise ConfigError(
                f"WHATSAPP_STORE={store.shown} is a directory: give the SQLite file's path"
                " (e.g. $SVC_DATA_DIR/whatsapp.sqlite) or a postgres:// DSN"
            )
        if os.environ.get(BRIDGE_ENV):  # refuse a bad test seam before connecting
            from services.whatsapp.neonize import bridge_from_env

            bridge_from_env()


async def run_role(
    bus: Bus,
    settings: Settings,
    role: Role,
    stop: asyncio.Event,
    *,
    watch: Sequence[Callable[[], Awaitable[None]]] = (),
    http: HttpServer | None = None,
) -> None:
    """Run `role`'s workers on `bus` until `stop` is set (then drain). The role ends with
    an error when its connection is closed for good or a `watch` awaitable raises. With
    `http` the role uses that running server (started by `system` before provisioning);
    else it serves its own when SVC_HTTP_PORT is set."""
    try:
        await _run_role(bus, settings, role, stop, watch, http)
    except Exception:
        if bus.lost.is_set():  # whatever failed, the cause is the dead connection
            raise bus.lost_error() from None
        raise


async def _run_role(
    bus: Bus,
    settings: Settings,
    role: Role,
    stop: asyncio.Event,
    watch: Sequence[Callable[[], Awaitable[None]]],
    http: HttpServer | None,
) -> None:
    # Idempotent; makes sure every message published below carries a traceparent even
    # when the caller (a test, an embedding program) did not set tracing up.
    setup_tracing(f"switchboard-{role}")
    setup_metrics(f"switchboard-{role}")
    async with AsyncExitStack() as stack:
        stack.callback(READINESS.add("nats", connected(bus)))
        started = Flag("starting")
        stack.callback(READINESS.add(f"role {role}", started.check))
        tasks: list[asyncio.Task[None]] = []
        # What the role's NATS micro service says about it (ADR 0030): static metadata,
        # and the parts of its live state each worker below adds.
        metadata: dict[str, str] = {}
        live: list[Callable[[], dict[str, Any]]] = []
        if role in ("all", "core"):
            plugins = discover()
            projection = await stack.enter_async_context(
                PluginProjection(bus, plugin_db(settings), manifests(plugins))
            )
            await projection.catch_up()  # the first turn already sees installed plugins
            stack.callback(projection_running("plugins", PLUGINS.name, lambda: projection.position))
            tasks.append(asyncio.create_task(projection.run(stop), name="plugin-projection"))
            # Worker processes for CPU-bound tools, warm before the first turn (ADR 0014).
            runner = await stack.enter_async_context(ToolRunner())
            tools = ProjectedTools(
                bus, plugins, projection, timeout=settings.core.tool_timeout, runner=runner
            )
            worker = CoreWorker(bus, make_llm(settings), settings.core, tools=tools)
            tasks.append(asyncio.create_task(worker.loop.run(stop), name="core"))
            live.append(partial(_core_state, worker))
        if role in ("all", "whatsapp", "whatsapp-egress"):
            if settings.transport == "neonize":
                executor = neonize_executor(len(settings.accounts))
                asyncio.get_running_loop().set_default_executor(executor)
            transport = make_transport(settings, bus)
            holder = new_holder_id(role)
            # A session transport relays what its socket receives; a separate-inbound one
            # (sim) leaves receiving to whatsapp-ingress unless the role is whatsapp/all.
            receive = role != "whatsapp-egress" or transport.inbound is None
            board = await stack.enter_async_context(LeaseBoard(bus))
            fleet = Fleet(bus, holder, settings.accounts, settings.lease_ttl)
            tasks.append(asyncio.create_task(fleet.run(stop), name="fleet"))
            metadata.update(holder=holder, transport=settings.transport)
            live.append(partial(_owner_state, fleet))
            log.info("owner started", extra={"holder": holder, "accounts": list(settings.accounts)})
            for account in settings.accounts:
                owner = AccountOwner(
                    bus,
                    transport,
                    account,
                    holder,
                    lease_ttl=settings.lease_ttl,
                    receive=receive,
                    board=board,
                    fleet=fleet,
                    delivery=settings.delivery,
                    watch=settings.session,
                )
                tasks.append(asyncio.create_task(owner.run(stop), name=f"owner-{account}"))
            if settings.transport == "neonize":
                # Pairing for the console (issue 18): it runs where neonize and the session
                # store are; any replica takes a request (queue group).
                from services.whatsapp.pairing_service import PairingService

                pairing = PairingService(
                    bus,
                    settings.whatsapp_store,
                    new_holder_id("pair"),
                    lease_ttl=settings.lease_ttl,
                    replicas=settings.stream_replicas,
                )
                tasks.append(asyncio.create_task(pairing.run(stop), name="pairing"))
            if settings.transport == "cloud":
                # A reply the network refused later for the 24-hour window gets the
                # account's template (ADR 0028); one shared consumer, any replica.
                from services.whatsapp.cloud_window import CloudWindow

                window = CloudWindow(bus, cloud_settings(settings), transport.channel)
                tasks.append(asyncio.create_task(window.run(stop), name="cloud-window"))
        if role in ("all", "web"):
            # Outgoing webhooks (h-hooks, ADR 0042): shared consumers, any number of replicas.
            from services.web.hooks import Hooks, load_hook_settings

            hooks = Hooks(bus, load_hook_settings())
            tasks.append(asyncio.create_task(hooks.run(stop), name="webhooks"))
        if http is not None:
            watch = [*watch, http.until_failed]
        elif settings.http.port is not None:
            server = await stack.enter_async_context(
                serve_http(settings.http.host, settings.http.port, _http_app(bus, settings, role))
            )
            watch = [*watch, server.until_failed]
        elif serves_webhooks(settings, role):
            log.warning(
                "SVC_HTTP_PORT is not set: this process receives no Cloud API webhooks, so"
                " nothing inbound arrives unless a whatsapp-ingress (or another process with"
                " SVC_HTTP_PORT) serves them",
                extra={"role": role},
            )
        if role == "whatsapp-ingress" and settings.transport != "cloud":
            transport = make_transport(settings, bus)
            inbox = transport.inbound
            if inbox is None:  # refused by check_role before connecting; kept for types
                raise ConfigError(f"transport {transport.name} has no separate inbound path")
            for account in settings.accounts:
                ingress = Ingress(bus, transport.channel, account)
                events = await stack.enter_async_context(
                    EventDispatch(ingress, name=f"{transport.channel}.{account}")
                )
                await stack.enter_async_context(inbox.receiver(account, events))
        # Lag gauges: one consumer-info read per consumer per interval, never per scrape.
        tasks.append(asyncio.create_task(LagSampler(bus).run(stop), name="lag-sampler"))
        stack.callback(READINESS.add("workers", tasks_alive(tasks)))
        if role == "whatsapp-ingress":
            metadata.update(transport=settings.transport)
            live.append(lambda: {"ingress": list(settings.accounts)})
        # Entered last, so unregistered first when the role stops.
        await stack.enter_async_context(
            micro_service(bus, role, metadata=metadata, status=partial(_merged, live))
        )
        started.met()
        log.info("running", extra={"role": role})
        await _supervise(tasks, stop, watchers=[bus.until_lost, *watch])


def _core_state(worker: CoreWorker) -> dict[str, Any]:
    """A core replica's live state: its share of the one durable consumer."""
    loop = worker.loop
    return {
        "core": {
            "stream": loop.spec.stream,
            "consumer": loop.spec.durable,
            "handled": loop.handled,
            "dead_lettered": loop.dead_lettered,
        }
    }


def _owner_state(fleet: Fleet) -> dict[str, Any]:
    """A whatsapp worker's live state: the accounts it holds now and the ones it stands
    by for (all of them on a standby)."""
    owned = sorted(fleet.owned)
    return {
        "accounts": list(fleet.accounts),
        "owned": owned,
        "standby": [a for a in fleet.accounts if a not in owned],
        "workers": fleet.workers,
    }


def _merged(parts: Sequence[Callable[[], dict[str, Any]]]) -> dict[str, Any]:
    merged: dict[str, Any] = {}
    for part in parts:
        merged.update(part())
    return merged


def serves_webhooks(settings: Settings, role: Role) -> bool:
    """Whether `role` receives the Cloud API's webhooks (when SVC_HTTP_PORT is set)."""
    return settings.transport == "cloud" and role in ("all", "whatsapp", "whatsapp-ingress")


def _http_routes(bus: Bus, settings: Settings, role: Role) -> list[Any]:
    """What the role's HTTP server serves besides /healthz."""
    if not serves_webhooks(settings, role):
        return []
    # Imported here: only a process that serves webhooks loads the Cloud API modules.
    from services.whatsapp.cloud_webhook import CloudWebhooks, webhook_routes

    hooks = CloudWebhooks(bus, cloud_settings(settings), max_bytes=settings.http.webhook_max_bytes)
    return [webhook_routes(hooks)]


def serves_web(settings: Settings, role: Role) -> bool:
    """Whether the process serves the console and API (ADR 0040): role web always (port
    8080 unless SVC_HTTP_PORT says otherwise), role all only when SVC_HTTP_PORT is set."""
    return role == "web" or (role == "all" and settings.http.port is not None)


def _http_app(bus: Bus, settings: Settings, role: Role) -> Any:
    """The role's Litestar app (imported only by a process that serves HTTP)."""
    routes = _http_routes(bus, settings, role)
    if serves_web(settings, role):
        from services.web.app import web_app  # h-web

        return web_app(bus, settings.web, public=routes)
    from services.runtime.http import http_app

    return http_app(routes)


@asynccontextmanager
async def serve_http(host: str, port: int, app: Any) -> AsyncIterator[HttpServer]:
    """The role's HTTP server, serving `app` (a Litestar app)."""
    from services.runtime.http import serve

    async with serve(app, host, port) as server:
        yield server


async def _supervise(
    tasks: list[asyncio.Task[None]],
    stop: asyncio.Event,
    *,
    watchers: Sequence[Callable[[], Awaitable[None]]] = (),
) -> None:
    """Wait for stop; a worker that dies, or a watcher that raises (the connection is
    closed for good, the embedded server died), takes the process down: the supervisor
    restarts it. A zombie that looks alive and does nothing is never an outcome."""
    stopper = asyncio.create_task(stop.wait())
    watching = [asyncio.ensure_future(watcher()) for watcher in watchers]
    try:
        done, _ = await asyncio.wait(
            [stopper, *watching, *tasks], return_when=asyncio.FIRST_COMPLETED
        )
        # A watcher's cause first: a worker that failed because the connection died
        # would otherwise hide why.
        for task in sorted(done, key=lambda t: t not in watching):
            if task is not stopper and task.exception() is not None:
                raise task.exception()  # type: ignore[misc]
    finally:
        stop.set()
        stopper.cancel()
        for watcher_task in watching:
            watcher_task.cancel()
        await asyncio.gather(*tasks, *watching, return_exceptions=True)


@asynccontextmanager
async def system(
    settings: Settings, role: Role, *, embedded_port: int = EMBEDDED_PORT, client_name: str = "svc"
) -> AsyncIterator[tuple[Bus, asyncio.Event, asyncio.Task[None]]]:
    """Start `role` (with an embedded server if NATS_URL is unset); yield (bus, stop, task)."""
    check_role(settings, role)
    setup_metrics(f"switchboard-{role}")  # a missing OTLP exporter is refused before connecting
    # A relative SVC_DATA_DIR resolves against the working directory: say which one.
    log.info(
        "starting",
        extra={
            "role": role,
            "data_dir": str(settings.data_dir.resolve()),
            "loop": loop_name(),  # uvloop unless SVC_UVLOOP=off (ADR 0036)
        },
    )
    async with (
        nats_url(settings, role, embedded_port=embedded_port) as (url, server),
        connect(
            url,
            name=f"{client_name}-{role}",
            timeout=settings.connect_timeout,
            security=settings.nats_security,
        ) as bus,
        AsyncExitStack() as stack,
    ):
        # Served from before provisioning, so /readyz can say what is missing (ADR 0029).
        stack.callback(READINESS.add("nats", connected(bus)))
        streams = Flag("not provisioned yet")
        stack.callback(READINESS.add("streams", streams.check))
        # Unmet until run_role replaces it with the role's own check (same name): without
        # it, /readyz would say ready between provisioning and the role's first step.
        stack.callback(READINESS.add(f"role {role}", Flag("starting").check))
        http = None
        if settings.http.port is not None:
            http = await stack.enter_async_context(
                serve_http(settings.http.host, settings.http.port, _http_app(bus, settings, role))
            )
        await provision_when_able(bus, settings, streams)
        stop = asyncio.Event()
        watch = [server.until_exited] if server is not None else []
        task = asyncio.create_task(
            run_role(bus, settings, role, stop, watch=watch, http=http), name=f"role-{role}"
        )
        try:
            yield bus, stop, task
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
