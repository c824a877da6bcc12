"""`svc`: run roles, the demo, a sim chat, the embedded server, provisioning and status."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

import msgspec
import nats.errors
import typer

from services.runtime.bus import Bus
from services.runtime.errors import (
    ConfigError,
    EmbeddedServerExitedError,
    NatsConnectionLostError,
    ServiceError,
)
from services.runtime.logs import setup_logging
from services.runtime.metrics import shutdown_metrics
from services.runtime.settings import ROLES, Settings, load_settings
from services.runtime.telemetry import setup_tracing, shutdown_tracing

T = TypeVar("T")

# Where each role and command lives, so any behaviour is at most two hops from `svc --help`
# (this epilog, then docs/architecture.md). Plain text: typer prints it as written, one
# line each, and it fits an 80-column terminal. tests/test_help.py checks that it names
# every role and command group, and that every path it names exists.
EPILOG = """\
Roles (svc run ROLE; wired in services/app.py):
  core              services/core/ (turns), services/plugins/ (tools)
  whatsapp          services/channel/ + a transport from services/whatsapp/
  whatsapp-egress   services/channel/owner.py, services/channel/egress.py
  whatsapp-ingress  services/channel/ingress.py, services/whatsapp/ (receiver)
  web               services/web/ (console, JSON API, auth)
  all               all roles; no NATS_URL: services/runtime/nats_server.py
  (every role)      services/runtime/ (bus, consumer loop, lease, settings)
Commands:
  run               services/app.py
  demo              services/ops/demo.py
  chat              services/ops/chat.py, services/ops/simclient.py
  status            services/ops/status.py
  nats              services/runtime/nats_server.py
  streams           services/runtime/provisioning.py, contracts/streams.py
  accounts          services/ops/accounts.py
  whatsapp          services/ops/pair.py, services/whatsapp/neonize_store.py
  plugins           services/ops/plugins.py, services/plugins/
  access            services/ops/access.py, projections/access.py
  dlq               services/ops/dlq.py
  replay            services/ops/replay.py, services/ops/explain.py
  audit             services/ops/audit.py, projections/audit.py
  audit explain     services/ops/explain.py, projections/transcript.py
  webhooks          services/ops/webhooks.py, services/web/hooks.py
  users             services/ops/users.py, services/web/identity.py
  tokens            services/ops/users.py, services/web/identity.py
Everything else: docs/architecture.md, "Where things live"."""

app = typer.Typer(
    name="svc",
    help="Switchboard: an event-sourced AI-agent runtime for WhatsApp on NATS JetStream.",
    epilog=EPILOG,
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
nats_app = typer.Typer(help="The embedded nats-server.", no_args_is_help=True)
streams_app = typer.Typer(help="Streams and buckets.", no_args_is_help=True)
app.add_typer(nats_app, name="nats")
accounts_app = typer.Typer(help="Account ownership: handover and resume.", no_args_is_help=True)
app.add_typer(streams_app, name="streams")
app.add_typer(accounts_app, name="accounts")
plugins_app = typer.Typer(help="Plugins and tool policy (events on PLUGINS).", no_args_is_help=True)
app.add_typer(plugins_app, name="plugins")
access_app = typer.Typer(
    help="Who may talk to the agent (events on ACCESS): modes, allow/block, approvals.",
    no_args_is_help=True,
)
app.add_typer(access_app, name="access")
whatsapp_app = typer.Typer(help="Real WhatsApp (neonize): pair a number.", no_args_is_help=True)
app.add_typer(whatsapp_app, name="whatsapp")
dlq_app = typer.Typer(help="Dead letters: list, show, requeue, drop.", no_args_is_help=True)
app.add_typer(dlq_app, name="dlq")

replay_app = typer.Typer(
    help="Rebuild state from the log: a projection as of any point, a conversation.",
    no_args_is_help=True,
)
app.add_typer(replay_app, name="replay")
audit_app = typer.Typer(
    help="Check the invariants against the streams; explain a send (`svc audit explain JOB`).",
    invoke_without_command=True,
)
app.add_typer(audit_app, name="audit")
# Outgoing webhooks (h-hooks, ADR 0042); the commands are at the end of this file.
webhooks_app = typer.Typer(
    help="Outgoing webhooks (events on HOOKS): add, ls, rm, test, dead letters.",
    no_args_is_help=True,
)
app.add_typer(webhooks_app, name="webhooks")

JsonOpt = Annotated[bool, typer.Option("--json", help="Print data as JSON.")]


def _fail(message: str, code: int) -> typer.Exit:
    typer.echo(f"svc: {message}", err=True)
    return typer.Exit(code)


def _settings(
    role: str | None = None, *, quiet: bool = False, interactive: bool = False
) -> Settings:
    """Load and validate settings (exit 2 with one line on a bad value); set up logs.
    `interactive`: a conversation owns the terminal, so only errors, as text."""
    try:
        settings = load_settings(role=role)
        setup_tracing(f"switchboard-{settings.role}")
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    if interactive:
        setup_logging("ERROR", "text")
    else:
        setup_logging("WARNING" if quiet else settings.log_level, settings.log_format)
    return settings


def _run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine; turn service errors into one line and an exit code."""
    from services.app import EXIT_CONNECTION_LOST, EXIT_EMBEDDED_SERVER_DIED
    from services.runtime.lifecycle import loop_factory

    try:
        # uvloop unless SVC_UVLOOP=off (ADR 0036); a bad value is one line, exit 2.
        with asyncio.Runner(loop_factory=loop_factory()) as runner:
            return runner.run(main())
    except ConfigError as exc:  # includes a refused login or TLS handshake
        raise _fail(str(exc), 2) from None
    except NatsConnectionLostError as exc:
        raise _fail(str(exc), EXIT_CONNECTION_LOST) from None
    except EmbeddedServerExitedError as exc:
        raise _fail(str(exc), EXIT_EMBEDDED_SERVER_DIED) from None
    except ServiceError as exc:
        raise _fail(str(exc), 1) from None
    except nats.errors.Error as exc:  # the server answered something we did not expect
        raise _fail(f"NATS error: {type(exc).__name__}: {exc}", 1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    finally:
        shutdown_tracing()
        shutdown_metrics()


@app.command()
def run(
    role: Annotated[
        str | None,
        typer.Argument(help=f"One of: {', '.join(ROLES)} (default: $SVC_ROLE, else all)."),
    ] = None,
    nats_port: Annotated[
        int,
        typer.Option(
            min=0,
            max=65535,
            help="Role all without NATS_URL: the embedded server's port (0: a free one).",
        ),
    ] = 4222,
) -> None:
    """Run a role until SIGTERM/SIGINT (then drain in-flight work and exit 0).

    Exit codes: 0 stopped; 1 failed; 2 bad configuration or a refused login/TLS;
    3 the NATS connection closed for good; 4 the embedded nats-server died.
    A supervisor should restart on 1, 3 and 4."""
    from services.app import system
    from services.runtime.lifecycle import install_stop_signals

    settings = _settings(role)

    async def main() -> None:
        async with system(settings, settings.role, embedded_port=nats_port) as (_, stop, task):
            install_stop_signals(stop)
            await asyncio.wait([task])
            if task.exception() is not None:
                raise task.exception()  # type: ignore[misc]

    _run(main)


@app.command()
def demo(
    chats: Annotated[int, typer.Option(min=1, max=50, help="How many sim chats.")] = 3,
    messages: Annotated[int, typer.Option(min=1, max=100, help="Messages per chat.")] = 2,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for every reply.")] = 30.0,
) -> None:
    """One-shot end-to-end proof: all roles in one process, sim chats, transcript, timings."""
    from services.ops.demo import run_demo

    settings = _settings("all", quiet=True)
    ok = _run(lambda: run_demo(settings, chats=chats, messages=messages, timeout=timeout))
    if not ok:
        raise _fail("demo failed: some replies are missing (see above)", 1)


@app.command()
def chat(
    account: Annotated[
        str | None, typer.Option(help="Account to talk to (default: the first configured).")
    ] = None,
    chat_jid: Annotated[str, typer.Option("--chat", help="Your chat JID.")] = "me@s.whatsapp.net",
    wait: Annotated[float, typer.Option(help="Seconds to wait for replies.")] = 10.0,
) -> None:
    """Talk to the running system through the sim transport (reads lines from stdin)."""
    from contracts.subjects import check_account
    from services.ops.chat import run_chat

    settings = _settings(interactive=True)
    target = account or settings.accounts[0]
    try:
        check_account(target)
    except ValueError as exc:
        raise _fail(f"--account: {exc}", 2) from None

    async def main() -> int:
        async with _connect(settings, "svc-chat") as bus:
            return await run_chat(bus, target, chat_jid, wait=wait)

    if _run(main):
        raise typer.Exit(1)


@app.command()
def status(as_json: JsonOpt = False) -> None:
    """Streams, consumers (pending / ack pending / redelivered), leases, accounts, live
    workers (NATS micro: owner, standbys, core replicas), dead letters."""
    from services.ops.status import collect_status, render_status, to_json

    settings = _settings(quiet=True)

    async def main() -> str:
        async with _connect(settings, "svc-status") as bus:
            result = await collect_status(bus)
        return to_json(result) if as_json else render_status(result)

    typer.echo(_run(main))
    if not as_json:
        # A relative SVC_DATA_DIR resolves against where svc runs: say which store that is.
        typer.echo(f"local data dir: {settings.data_dir.resolve()}")


@nats_app.command("serve")
def nats_serve(
    port: Annotated[int, typer.Option(help="Client port (0 picks a free one).")] = 4222,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    store_dir: Annotated[
        Path | None, typer.Option(help="JetStream store (default: $SVC_DATA_DIR/nats).")
    ] = None,
    monitor_port: Annotated[
        int | None,
        typer.Option(
            min=0,
            max=65535,
            help="Open the server's HTTP monitoring port (/varz, /jsz; 0 picks a free one)."
            " Default: $SVC_NATS_MONITOR_PORT, else closed.",
        ),
    ] = None,
) -> None:
    """Run the embedded JetStream nats-server in the foreground until SIGTERM/SIGINT."""
    from services.runtime.lifecycle import install_stop_signals
    from services.runtime.nats_server import EmbeddedNats

    settings = _settings()

    async def main() -> None:
        stop = asyncio.Event()
        async with EmbeddedNats(
            store_dir or settings.data_dir / "nats",
            host=host,
            port=port,
            monitor_port=settings.nats_monitor_port if monitor_port is None else monitor_port,
        ) as server:
            install_stop_signals(stop)
            typer.echo(f"nats-server ready at {server.url} (store {server.store_dir})")
            if server.monitor_url:
                typer.echo(f"monitoring at {server.monitor_url}")
            typer.echo(f"log at {server.log_path}")
            sys.stdout.flush()
            # The server is our child: if it dies (kill -9, a crash) we exit with it
            # rather than stand in front of nothing (exit 4; ADR 0012).
            stopped = asyncio.ensure_future(stop.wait())
            exited = asyncio.ensure_future(server.until_exited())
            await asyncio.wait([stopped, exited], return_when=asyncio.FIRST_COMPLETED)
            stopped.cancel()
            exited.cancel()
            if exited.done() and not exited.cancelled() and exited.exception() is not None:
                raise exited.exception()  # type: ignore[misc]

    _run(main)


@streams_app.command("ensure")
def streams_ensure(
    update: Annotated[
        bool,
        typer.Option(
            "--update",
            help="Apply tunables that differ (replicas from SVC_STREAM_REPLICAS, limits).",
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Create missing streams and buckets; report tunables that differ (--update applies
    them) and (exit 1) any stream whose semantics conflict (never changed)."""
    from dataclasses import asdict

    import msgspec

    from services.runtime.provisioning import Provisioned, ensure_streams

    settings = _settings(quiet=True)

    async def main() -> list[Provisioned]:
        async with _connect(settings, "svc-streams") as bus:
            return await ensure_streams(bus.js, replicas=settings.stream_replicas, update=update)

    results = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode([asdict(r) for r in results]).decode())
    else:
        for r in results:
            detail = f"  {r.detail}" if r.detail else ""
            typer.echo(f"{r.kind:<7} {r.name:<12} {r.action}{detail}")
    if any(r.action == "conflict" for r in results):
        raise _fail("some streams conflict with the expected config (left unchanged)", 1)
    if any(r.action == "failed" for r in results):
        raise _fail("the server refused some updates (see above)", 1)


@accounts_app.command("handover")
def accounts_handover(
    account: Annotated[str, typer.Argument(help="The account to hand over.")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the owner.")] = 30.0,
    as_json: JsonOpt = False,
) -> None:
    """Ask the account's owner to finish its in-flight send and release the lease."""
    from services.ops.accounts import handover

    settings = _settings(quiet=True)
    _check_account(account)

    async def main() -> str:
        async with _connect(settings, "svc-accounts") as bus:
            reply = await handover(bus, account, timeout=timeout)
        if as_json:
            return msgspec.json.encode(reply).decode()
        state = "released by" if reply.released else "was no longer held by"
        return f"{account}: {state} {reply.holder} (token {reply.token}); a standby takes over"

    typer.echo(_run(main))


@accounts_app.command("resume")
def accounts_resume(
    account: Annotated[str, typer.Argument(help="The parked account.")],
    reason: Annotated[str, typer.Option(help="Why (recorded in AccountResumed).")] = "",
) -> None:
    """Clear a parked account (logged out, replaced, banned) so a worker takes it over."""
    import getpass

    from services.ops.accounts import resume

    settings = _settings(quiet=True)
    _check_account(account)

    async def main() -> str:
        async with _connect(settings, "svc-accounts") as bus:
            was = await resume(bus, account, actor=getpass.getuser(), reason=reason)
        return f"{account}: resumed (was parked: {was})"

    typer.echo(_run(main))


@whatsapp_app.command("pair")
def whatsapp_pair(
    account: Annotated[str, typer.Argument(help="The account to link a number to.")],
    phone: Annotated[
        str | None,
        typer.Option(help="Pair by code instead of QR: the number in E.164, e.g. +15550000001."),
    ] = None,
    timeout: Annotated[
        float, typer.Option(min=1, max=3600, help="Seconds to wait for the phone.")
    ] = 180.0,
    force: Annotated[
        bool, typer.Option(help="Re-pair a paired account: removes its old device.")
    ] = False,
) -> None:
    """Link a WhatsApp number: print the QR as it rotates (or a pairing code), wait for
    the phone, record the device for every host (store: WHATSAPP_STORE)."""
    import getpass

    from services.ops.pair import check_phone, pair
    from services.runtime.lease import new_holder_id

    settings = _settings(quiet=True)
    _check_account(account)
    if phone is not None:
        try:
            check_phone(phone)
        except ValueError as exc:
            raise _fail(str(exc), 2) from None

    async def main() -> str:
        async with _connect(settings, "svc-whatsapp-pair") as bus:
            paired = await pair(
                bus,
                settings.whatsapp_store,
                account,
                holder=new_holder_id("pair"),
                lease_ttl=settings.lease_ttl,
                timeout=timeout,
                phone=phone,
                force=force,
                actor=getpass.getuser(),
                replicas=settings.stream_replicas,
                show=typer.echo,
            )
        return paired.line()

    typer.echo(_run(main))


@dlq_app.command("ls")
def dlq_ls(
    show_all: Annotated[bool, typer.Option("--all", help="Include requeued and dropped.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """List dead letters (open ones unless --all): sequence, age, source, job, reason."""
    from services.ops.dlq import dropped, letters

    settings = _settings(quiet=True)

    async def main() -> tuple[list[dict[str, Any]], int]:
        async with _connect(settings, "svc-dlq") as bus:
            found = await letters(bus)
            gone = await dropped(bus)
        return [x.summary() for x in found.values() if show_all or x.state == "open"], gone

    rows, gone = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    if gone:  # the stream's limits (max age / bytes) discarded the oldest letters
        typer.echo(f"{gone} older dead letters were dropped by the DEADLETTER limits")
    if not rows:
        typer.echo("no dead letters" if show_all else "no open dead letters")
        return
    typer.echo(f"{'SEQ':>6}  {'AT':<25} {'STATE':<9} {'TRIES':>5}  SOURCE / JOB / REASON")
    for r in rows:
        typer.echo(
            f"{r['seq']:>6}  {r['at']:<25} {r['state']:<9} {r['attempts']:>5}  {r['source']}"
        )
        job = f"job {r['job_id']}: " if r["job_id"] else ""
        typer.echo(f"{'':>6}  {job}{r['reason']}")


_LETTER_HELP = "The dead letter's sequence, or a unique prefix of its job id."


@dlq_app.command("show")
def dlq_show(seq: Annotated[str, typer.Argument(help=_LETTER_HELP)]) -> None:
    """Print one dead letter: payload, every attempt's error, actions taken (JSON)."""
    from services.ops.dlq import details, one

    settings = _settings(quiet=True)

    async def main() -> dict[str, Any]:
        async with _connect(settings, "svc-dlq") as bus:
            return details(await one(bus, seq))

    typer.echo(msgspec.json.format(msgspec.json.encode(_run(main))).decode())


@dlq_app.command("requeue")
def dlq_requeue(
    seq: Annotated[str, typer.Argument(help=_LETTER_HELP)],
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
    force: Annotated[bool, typer.Option(help="Requeue even if already handled.")] = False,
) -> None:
    """Send a dead letter back; a job gets a new id linked to the original."""
    import getpass

    from services.ops.dlq import requeue

    settings = _settings(quiet=True)

    async def main() -> str:
        async with _connect(settings, "svc-dlq") as bus:
            return await requeue(bus, seq, actor=getpass.getuser(), reason=reason, force=force)

    typer.echo(f"requeued dead letter {seq} as {_run(main)}")


@dlq_app.command("drop")
def dlq_drop(
    seq: Annotated[str, typer.Argument(help=_LETTER_HELP)],
    reason: Annotated[str, typer.Option(help="Why (required, recorded with who).")],
) -> None:
    """Discard a dead letter, recording who and why."""
    import getpass

    from services.ops.dlq import drop

    settings = _settings(quiet=True)

    async def main() -> int:
        async with _connect(settings, "svc-dlq") as bus:
            return await drop(bus, seq, actor=getpass.getuser(), reason=reason)

    typer.echo(f"dropped dead letter {_run(main)}")


ChannelOpt = Annotated[
    str | None, typer.Option("--channel", help="Scope: a channel (e.g. whatsapp).")
]
AccountOpt = Annotated[str | None, typer.Option("--account", help="Scope: one account.")]
ConfigOpt = Annotated[list[str] | None, typer.Option("--config", help="KEY=VALUE (repeatable).")]


def _plugins(
    settings: Settings, work: Callable[[Bus], Coroutine[Any, Any, T]], *, write: bool = False
) -> T:
    """Run a plugin command: a write provisions the streams first (a fresh server works on
    first use); a read on a server without PLUGINS says so in one line and shows defaults."""
    from services.ops.plugins import missing_note
    from services.runtime.provisioning import ensure_streams, raise_on_conflict

    async def main() -> T:
        async with _connect(settings, "svc-plugins") as bus:
            if write:
                raise_on_conflict(await ensure_streams(bus.js, replicas=settings.stream_replicas))
            elif note := await missing_note(bus):
                typer.echo(f"svc: {note}", err=True)
            return await work(bus)

    return _run(main)


def _recorded(event: Any, seq: int, as_json: bool) -> None:
    if as_json:
        typer.echo(msgspec.json.encode({"seq": seq, "event": event}).decode())
    else:
        typer.echo(f"recorded {type(event).__name__} (PLUGINS seq {seq})")


@plugins_app.command("ls")
def plugins_ls(as_json: JsonOpt = False) -> None:
    """Available plugins, and what is installed in which scope."""
    from services.ops.plugins import listing

    data = _plugins(_settings(quiet=True), listing)
    if as_json:
        typer.echo(msgspec.json.encode(data).decode())
        return
    typer.echo("AVAILABLE")
    for p in data["available"]:
        tools = ", ".join(f"{p['name']}.{t['name']}" for t in p["tools"])
        flags = " preinstalled" if p["preinstalled"] else ""
        typer.echo(
            f"  {p['name']:<12} {p['version']:<8} default {p['default_policy']}{flags}: {tools}"
        )
    typer.echo("INSTALLED (scope: * global, <channel>, <channel>/<account>)")
    if not data["installed"]:
        typer.echo("  (nothing beyond the preinstalled plugins)")
    for r in data["installed"]:
        config = r["config"] or ""
        typer.echo(f"  {r['scope']:<20} {r['name']:<12} {r['state']:<9} {r['version']:<8} {config}")
    typer.echo("POLICIES")
    for pol in data["policies"] or [{"scope": "-", "allow": [], "deny": []}]:
        typer.echo(f"  {pol['scope']:<20} allow {pol['allow']} deny {pol['deny']}")


@plugins_app.command("install")
def plugins_install(
    name: Annotated[str, typer.Argument(help="The plugin.")],
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Install a plugin globally, for a channel, or for one account."""
    from services.ops.plugins import install

    _write(channel, account, as_json, lambda bus, scope: install(bus, name, scope, config or []))


@plugins_app.command("config")
def plugins_config(
    name: Annotated[str, typer.Argument(help="The plugin.")],
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Change an installed plugin's configuration in a scope."""
    from services.ops.plugins import configure

    _write(channel, account, as_json, lambda bus, scope: configure(bus, name, scope, config or []))


@plugins_app.command("uninstall")
def plugins_uninstall(
    name: Annotated[str, typer.Argument(help="The plugin.")],
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Uninstall a plugin from a scope (preinstalled ones too)."""
    from services.ops.plugins import uninstall

    _write(channel, account, as_json, lambda bus, scope: uninstall(bus, name, scope))


@plugins_app.command("policy")
def plugins_policy(
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    allow: Annotated[
        list[str] | None, typer.Option("--allow", help="plugin.tool glob (repeatable).")
    ] = None,
    deny: Annotated[
        list[str] | None, typer.Option("--deny", help="plugin.tool glob (repeatable).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Set a scope's allow/deny patterns (no --channel: global). Replaces its rules."""
    from services.ops.plugins import policy

    _write(
        channel, account, as_json, lambda bus, scope: policy(bus, scope, allow or [], deny or [])
    )


@plugins_app.command("resolve")
def plugins_resolve(
    channel: Annotated[str, typer.Option("--channel", help="The channel.")] = "whatsapp",
    account: Annotated[str, typer.Option("--account", help="The account.")] = "default",
    as_json: JsonOpt = False,
) -> None:
    """The tools a turn for (channel, account) gets, and which rule decided each."""
    from services.ops.plugins import resolution

    rows = _plugins(_settings(quiet=True), lambda bus: resolution(bus, channel, account))
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    for r in rows:
        typer.echo(f"{'ALLOW' if r['allowed'] else 'DENY ':<6} {r['tool']:<24} {r['rule']}")


def _write(
    channel: str | None,
    account: str | None,
    as_json: bool,
    work: Callable[[Bus, Any], Coroutine[Any, Any, tuple[Any, int]]],
) -> None:
    """Validate the scope, run a validated plugin write, print what was recorded."""
    from services.ops.plugins import scope_of

    settings = _settings(quiet=True)
    try:
        scope = scope_of(channel, account)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None
    event, seq = _plugins(settings, lambda bus: work(bus, scope), write=True)
    _recorded(event, seq, as_json)


# --- svc access ------------------------------------------------------------------------


def _access(
    settings: Settings, work: Callable[[Bus], Coroutine[Any, Any, T]], *, write: bool = False
) -> T:
    """Run an access command: a write provisions the streams first (a fresh server works on
    first use); a read replays ACCESS (an empty policy -- everyone open -- if missing)."""
    from services.runtime.provisioning import ensure_streams, raise_on_conflict

    async def main() -> T:
        async with _connect(settings, "svc-access") as bus:
            if write:
                raise_on_conflict(await ensure_streams(bus.js, replicas=settings.stream_replicas))
            return await work(bus)

    return _run(main)


def _access_scope(channel: str | None, account: str | None) -> tuple[str, str]:
    from services.ops.access import scope

    try:
        return scope(channel, account)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None


def _access_recorded(event: Any, seq: int, as_json: bool) -> None:
    if as_json:
        typer.echo(msgspec.json.encode({"seq": seq, "event": event}).decode())
    else:
        typer.echo(f"recorded {type(event).__name__} (ACCESS seq {seq})")


@access_app.command("mode")
def access_mode(
    mode: Annotated[str, typer.Argument(help="open | allowlist | approval")],
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Set the access mode of a channel (default whatsapp) or of one account."""
    from services.ops.access import set_mode

    settings = _settings(quiet=True)
    ch, acct = _access_scope(channel, account)
    event, seq = _access(settings, lambda bus: set_mode(bus, mode, ch, acct), write=True)
    _access_recorded(event, seq, as_json)


def _access_rule(
    kind: Literal["allow", "block"],
    patterns: list[str],
    channel: str | None,
    account: str | None,
    as_json: bool,
    *,
    remove: bool = False,
) -> None:
    from services.ops.access import add_rule, check_pattern, remove_rule

    settings = _settings(quiet=True)
    ch, acct = _access_scope(channel, account)
    try:
        for pattern in patterns:
            check_pattern(pattern)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None

    async def work(bus: Bus) -> list[tuple[Any, int]]:
        change = remove_rule if remove else add_rule
        return [await change(bus, kind, p, ch, acct) for p in patterns]

    for event, seq in _access(settings, work, write=True):
        _access_recorded(event, seq, as_json)


PatternsArg = Annotated[
    list[str], typer.Argument(help="JIDs, phone numbers or globs ('1555*', '*@g.us').")
]


@access_app.command("allow")
def access_allow(
    patterns: PatternsArg,
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Let senders (or groups, by group JID) matching PATTERN talk to the agent."""
    _access_rule("allow", patterns, channel, account, as_json)


@access_app.command("block")
def access_block(
    patterns: PatternsArg,
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Refuse senders or groups matching PATTERN, whatever else allows them."""
    _access_rule("block", patterns, channel, account, as_json)


@access_app.command("unallow")
def access_unallow(
    patterns: PatternsArg,
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take allow patterns out of a scope."""
    _access_rule("allow", patterns, channel, account, as_json, remove=True)


@access_app.command("unblock")
def access_unblock(
    patterns: PatternsArg,
    channel: ChannelOpt = None,
    account: AccountOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Take block patterns out of a scope."""
    _access_rule("block", patterns, channel, account, as_json, remove=True)


@access_app.command("pending")
def access_pending(account: AccountOpt = None, as_json: JsonOpt = False) -> None:
    """Senders waiting for approval (under `approval`), with how many messages wait."""
    from services.ops.access import pending

    rows = _access(_settings(quiet=True), lambda bus: pending(bus, account))
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    if not rows:
        typer.echo("nobody is waiting for approval")
    for r in rows:
        typer.echo(
            f"{r['account']:<16} {r['jid']:<40} {r['messages']} waiting since {r['first_at']}"
        )


@access_app.command("approve")
def access_approve(
    jid: Annotated[str, typer.Argument(help="The sender (or group) JID to approve.")],
    account: Annotated[str, typer.Option("--account", help="The account.")],
    channel: ChannelOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Approve a sender on an account; its waiting messages are then answered, in order."""
    from services.ops.access import approve, check_approvable

    settings = _settings(quiet=True)
    ch, acct = _access_scope(channel, account)
    try:
        check_approvable(jid)
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    event, seq, released = _access(settings, lambda bus: approve(bus, jid, ch, acct), write=True)
    if as_json:
        typer.echo(msgspec.json.encode({"seq": seq, "event": event}).decode())
        return
    typer.echo(
        f"recorded AccessApproved (ACCESS seq {seq}); {len(released)} waiting message(s)"
        " sent back to be answered"
    )


@access_app.command("ls")
def access_ls(as_json: JsonOpt = False) -> None:
    """Modes, allow/block patterns, approved senders and who is pending."""
    from services.ops.access import listing

    data = _access(_settings(quiet=True), listing)
    if as_json:
        typer.echo(msgspec.json.encode(data).decode())
        return
    typer.echo("MODES (default open)")
    for m in data["modes"] or [{"scope": "-", "mode": "open"}]:
        typer.echo(f"  {m['scope']:<30} {m['mode']}")
    typer.echo("RULES (a block always wins)")
    for r in data["rules"] or [{"scope": "-", "kind": "", "pattern": ""}]:
        typer.echo(f"  {r['scope']:<30} {r['kind']:<6} {r['pattern']}")
    typer.echo("APPROVED")
    for a in data["approved"] or [{"channel": "-", "account": "", "jid": ""}]:
        typer.echo(f"  {a['channel']}/{a['account']:<24} {a['jid']}")
    typer.echo("PENDING")
    for p in data["pending"] or [{"channel": "-", "account": "", "jid": "", "messages": 0}]:
        typer.echo(f"  {p['channel']}/{p['account']:<24} {p['jid']} ({p['messages']} waiting)")


# --- svc replay projection -------------------------------------------------------------


@replay_app.command("projection")
def replay_projection(
    name: Annotated[str, typer.Argument(help="The projection to rebuild (known: plugins).")],
    to_seq: Annotated[
        int | None, typer.Option("--to-seq", help="Stop after this stream sequence.")
    ] = None,
    at: Annotated[
        str | None,
        typer.Option(
            "--at", help="Stop at the last event stored at or before then (RFC 3339, or 2h ago)."
        ),
    ] = None,
    out: Annotated[
        Path | None,
        typer.Option("--out", help="Write a new file here (default: swap into the live one)."),
    ] = None,
    force: Annotated[
        bool,
        typer.Option(help="Replace an existing --out file; let the live file go back in time."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Rebuild a projection from its stream (as of a sequence or time) into a fresh file."""
    from projections.replay import parse_when
    from services.ops.replay import Request, replay

    try:
        request = Request(
            name, to_seq=to_seq, at=parse_when(at) if at else None, out=out, force=force
        )
        request.check()
    except ValueError as exc:
        raise _fail(f"--at: {exc}", 2) from None
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None
    settings = _settings(quiet=True)

    async def main() -> Any:
        async with _connect(settings, "svc-replay") as bus:
            return await replay(bus, settings, request)

    summary = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode(summary.to_builtins()).decode())
    else:
        typer.echo(summary.render())


# --- svc replay conversation / svc audit explain -----------------------------------------


@replay_app.command("conversation")
def replay_conversation(
    account: Annotated[str, typer.Option("--account", help="The account.")],
    chat: Annotated[str, typer.Option("--chat", help="The chat JID (or its subject token).")],
    channel: Annotated[str, typer.Option("--channel", help="The channel.")] = "whatsapp",
    as_json: JsonOpt = False,
) -> None:
    """One chat's transcript: messages, turns (tools), sends, failures, receipts, facts."""
    from contracts.errors import ContractError
    from contracts.subjects import check_channel
    from projections.transcript import transcript_lines
    from services.ops.explain import check_chat, conversation

    _check_account(account)
    try:
        check_channel(channel)
        jid = check_chat(chat)
    except ContractError as exc:
        raise _fail(str(exc), 2) from None
    settings = _settings(quiet=True)

    async def main() -> list[Any]:
        async with _connect(settings, "svc-replay") as bus:
            return await conversation(bus, channel, account, jid)

    entries = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode(entries).decode())
    elif not entries:
        typer.echo(f"no events for {channel}/{account} chat {jid}")
    else:
        typer.echo(f"{channel}/{account}  {jid}  ({len(entries)} events, times UTC)")
        typer.echo("\n".join(transcript_lines(entries)))


@audit_app.command("explain")
def audit_explain(
    job_id: Annotated[str, typer.Argument(help="The outbound job id (SendMessage.job_id).")],
    as_json: JsonOpt = False,
) -> None:
    """Why a job was sent: inbound, turn (tools, policy then), attempts, send, receipts."""
    from contracts.errors import ContractError
    from contracts.subjects import send_key
    from projections.transcript import chain_lines
    from services.ops.explain import explain

    try:
        send_key("x", job_id)
    except ContractError as exc:
        raise _fail(str(exc), 2) from None
    settings = _settings(quiet=True)

    async def main() -> Any:
        async with _connect(settings, "svc-audit") as bus:
            return await explain(bus, job_id)

    chain = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode(chain).decode())
    else:
        typer.echo("\n".join(chain_lines(chain)))


# --- svc audit ---------------------------------------------------------------------------


@audit_app.callback()
def audit(
    ctx: typer.Context,
    account: Annotated[str | None, typer.Option(help="Audit one account only.")] = None,
    since: Annotated[
        str | None, typer.Option(help="Judge what happened from then (RFC 3339, or 2h, 7d ago).")
    ] = None,
    until: Annotated[str | None, typer.Option(help="... up to then (same forms).")] = None,
    grace: Annotated[
        float,
        typer.Option(min=0, help="Seconds before a message or job without an outcome is lost."),
    ] = 60.0,
    replay: Annotated[
        bool | None,
        typer.Option(
            "--replay/--no-replay",
            help="Rebuild the plugin projection twice and compare (default: if PLUGINS is"
            " at most 100,000 events).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Check every invariant of DESIGN.md against the streams; exit 1 on a violation."""
    if ctx.invoked_subcommand is not None:
        return
    from projections.replay import parse_when
    from services.ops.audit import Scope, render, to_builtins
    from services.ops.audit import audit as run_audit

    if account is not None:
        _check_account(account)
    try:
        scope = Scope(
            account=account,
            since=parse_when(since) if since else None,
            until=parse_when(until) if until else None,
            grace=grace,
            replay=replay,
        )
    except ValueError as exc:
        raise _fail(f"--since/--until: {exc}", 2) from None
    settings = _settings(quiet=True)

    def progress(stream: str, n: int) -> None:  # only on a terminal: one updating line
        typer.echo(f"\raudit: reading {stream:<10} {n:>12,} events\x1b[K", err=True, nl=False)

    async def main() -> tuple[Any, float]:
        async with _connect(settings, "svc-audit") as bus:
            return await run_audit(bus, scope, progress=progress if sys.stderr.isatty() else None)

    report, elapsed = _run(main)
    if sys.stderr.isatty():
        typer.echo("\r\x1b[K", err=True, nl=False)
    if as_json:
        typer.echo(msgspec.json.encode(to_builtins(report, elapsed, scope)).decode())
    else:
        typer.echo(render(report, elapsed, scope))
    if not report.ok:
        raise _fail(f"{len(report.violations)} violation(s) found (see above)", 1)


# --- svc users / svc tokens (h-web, ADR 0040) ---------------------------------------------

users_app = typer.Typer(help="Console users (stored hashed in JetStream).", no_args_is_help=True)
app.add_typer(users_app, name="users")
tokens_app = typer.Typer(help="API bearer tokens (stored hashed).", no_args_is_help=True)
app.add_typer(tokens_app, name="tokens")
WebRoleOpt = Annotated[str, typer.Option("--role", help="viewer | operator | admin")]


def _identity(settings: Settings, work: Callable[[Bus], Coroutine[Any, Any, T]]) -> T:
    """Run a users/tokens command; the streams and buckets are provisioned first (a fresh
    server works on first use). A refused change is one line and exit 1."""
    from services.runtime.provisioning import ensure_streams, raise_on_conflict

    async def main() -> T:
        async with _connect(settings, "svc-users") as bus:
            raise_on_conflict(await ensure_streams(bus.js, replicas=settings.stream_replicas))
            return await work(bus)

    return _run(main)


def _check_web(name: str, role: str | None = None) -> None:
    from contracts.web import WebContractError, check_name, check_role

    try:
        check_name(name)
        if role is not None:
            check_role(role)
    except WebContractError as exc:
        raise _fail(str(exc), 2) from None


@users_app.command("add")
def users_add(
    name: Annotated[str, typer.Argument(help="The user name (letters, digits, _ and -).")],
    role: WebRoleOpt,
    password_stdin: Annotated[
        bool, typer.Option("--password-stdin", help="Read the password from stdin (required).")
    ] = False,
) -> None:
    """Add a console user; the password is read from stdin and stored as an argon2id hash."""
    import getpass

    from services.ops.users import add_user
    from services.web.identity import IdentityError, check_password

    _check_web(name, role)
    if not password_stdin:
        raise _fail("give the password on stdin with --password-stdin", 2)
    password = sys.stdin.read().removesuffix("\n").removesuffix("\r")
    try:
        check_password(password)
    except IdentityError as exc:
        raise _fail(str(exc), 2) from None
    settings = _settings(quiet=True)
    _identity(settings, lambda bus: add_user(bus, name, role, password, actor=getpass.getuser()))
    typer.echo(f"added user {name} ({role})")


@users_app.command("ls")
def users_ls(as_json: JsonOpt = False) -> None:
    """Console users: name, role, created (never a password hash)."""
    from services.ops.users import list_users

    rows = _identity(_settings(quiet=True), list_users)
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    if not rows:
        typer.echo("no users: add one with 'svc users add NAME --role admin --password-stdin'")
    for r in rows:
        typer.echo(f"{r['name']:<24} {r['role']:<9} {r['created_at']}")


@users_app.command("rm")
def users_rm(name: Annotated[str, typer.Argument(help="The user to remove.")]) -> None:
    """Remove a console user and end their sessions on every replica."""
    import getpass

    from services.ops.users import remove_user

    _check_web(name)
    ended = _identity(
        _settings(quiet=True), lambda bus: remove_user(bus, name, actor=getpass.getuser())
    )
    typer.echo(f"removed user {name} ({ended} session(s) ended)")


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Argument(help="A name for the token (unique).")],
    role: WebRoleOpt,
) -> None:
    """Create an API token and print it once (only its sha256 is stored)."""
    import getpass

    from services.ops.users import create_token

    _check_web(name, role)
    row, secret = _identity(
        _settings(quiet=True), lambda bus: create_token(bus, name, role, actor=getpass.getuser())
    )
    typer.echo(secret)
    typer.echo(
        f"token {row['id']} ({name}, {role}): shown once, store it now;"
        " send it as 'Authorization: Bearer <token>'",
        err=True,
    )


@tokens_app.command("ls")
def tokens_ls(as_json: JsonOpt = False) -> None:
    """API tokens: id, name, role, created, last used (never the secret)."""
    from services.ops.users import list_tokens

    rows = _identity(_settings(quiet=True), list_tokens)
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    if not rows:
        typer.echo("no tokens")
    for r in rows:
        used = r["last_used"] or "never used"
        typer.echo(f"{r['id']}  {r['name']:<24} {r['role']:<9} {r['created_at']}  {used}")


@tokens_app.command("revoke")
def tokens_revoke(ref: Annotated[str, typer.Argument(help="The token's id or name.")]) -> None:
    """Revoke a token: every replica refuses it from now on."""
    import getpass

    from services.ops.users import revoke_token

    row = _identity(
        _settings(quiet=True), lambda bus: revoke_token(bus, ref, actor=getpass.getuser())
    )
    typer.echo(f"revoked token {row['id']} ({row['name']})")


def _check_account(account: str) -> None:
    from contracts.subjects import check_account

    try:
        check_account(account)
    except ValueError as exc:
        raise _fail(str(exc), 2) from None


# --- svc webhooks (h-hooks, ADR 0042) -------------------------------------------------------


@webhooks_app.command("add")
def webhooks_add(
    url: Annotated[str, typer.Argument(help="Where to POST: http(s)://host[:port]/path.")],
    events: Annotated[
        str, typer.Option("--events", help="Comma-separated event names, e.g. MessageReceived.")
    ],
    secret_stdin: Annotated[
        bool, typer.Option("--secret-stdin", help="Read the signing secret from stdin.")
    ] = False,
    description: Annotated[str, typer.Option(help="A note for operators.")] = "",
    as_json: JsonOpt = False,
) -> None:
    """Subscribe URL to events; bodies are signed with the secret (HMAC-SHA256)."""
    import getpass

    from services.ops.webhooks import add
    from services.web.hooks import load_hook_settings

    if not secret_stdin:
        raise _fail(
            "a webhook needs a signing secret: pipe it in with --secret-stdin"
            " (e.g. openssl rand -hex 32 | svc webhooks add URL --events E --secret-stdin)",
            2,
        )
    secret = sys.stdin.readline().rstrip("\r\n")
    settings = _settings(quiet=True)
    try:
        hooks = load_hook_settings()
    except ConfigError as exc:
        raise _fail(str(exc), 2) from None

    async def main() -> Any:
        async with _connect(settings, "svc-webhooks") as bus:
            return await add(
                bus,
                url,
                events.split(","),
                secret,
                settings=hooks,
                actor=getpass.getuser(),
                description=description,
            )

    added = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode(added).decode())
        return
    typer.echo(f"added webhook {added.id}: {added.url} <- {', '.join(added.events)}")


@webhooks_app.command("ls")
def webhooks_ls(as_json: JsonOpt = False) -> None:
    """Live subscriptions: id, URL, events (never the secret)."""
    from services.ops.webhooks import ls

    settings = _settings(quiet=True)

    async def main() -> Any:
        async with _connect(settings, "svc-webhooks") as bus:
            return await ls(bus)

    rows = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    if not rows:
        typer.echo("no webhooks")
        return
    typer.echo(f"{'ID':<17} {'SINCE':<26} {'SECRET':<7} URL / EVENTS")
    for r in rows:
        since = r.since.isoformat(timespec="seconds")
        typer.echo(f"{r.id:<17} {since:<26} {r.secret:<7} {r.url}")
        typer.echo(f"{'':<17} {', '.join(r.events)}")


@webhooks_app.command("rm")
def webhooks_rm(
    webhook: Annotated[str, typer.Argument(help="The webhook's id (svc webhooks ls).")],
    reason: Annotated[str, typer.Option(help="Why (recorded).")] = "",
) -> None:
    """Remove a subscription: nothing more is delivered to it."""
    import getpass

    from services.ops.webhooks import rm

    settings = _settings(quiet=True)

    async def main() -> Any:
        async with _connect(settings, "svc-webhooks") as bus:
            return await rm(bus, webhook, actor=getpass.getuser(), reason=reason)

    removed = _run(main)
    typer.echo(f"removed webhook {removed.id} ({removed.url})")


@webhooks_app.command("test")
def webhooks_test(
    webhook: Annotated[str, typer.Argument(help="The webhook's id (svc webhooks ls).")],
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the attempt.")] = 15.0,
    as_json: JsonOpt = False,
) -> None:
    """Send a test delivery (WebhookTestRequested) and say how its first attempt went."""
    import getpass

    from services.ops.webhooks import send_test

    settings = _settings(quiet=True)

    async def main() -> Any:
        async with _connect(settings, "svc-webhooks") as bus:
            return await send_test(bus, webhook, actor=getpass.getuser(), wait=timeout)

    result = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode(result).decode())
    elif result.outcome == "delivered":
        typer.echo(
            f"delivered test {result.delivery}: HTTP {result.status} in {result.latency_ms:g} ms"
        )
    if result.outcome != "delivered":
        if not as_json:
            typer.echo(f"svc: test {result.delivery} {result.outcome}: {result.error}", err=True)
        raise typer.Exit(1)


@webhooks_app.command("deadletters")
def webhooks_deadletters(
    webhook: Annotated[str | None, typer.Argument(help="Only this webhook's.")] = None,
    as_json: JsonOpt = False,
) -> None:
    """Deliveries given up, with every attempt's error."""
    from services.ops.webhooks import dead_letters

    settings = _settings(quiet=True)

    async def main() -> Any:
        async with _connect(settings, "svc-webhooks") as bus:
            return await dead_letters(bus, webhook)

    rows = _run(main)
    if as_json:
        typer.echo(msgspec.json.encode(rows).decode())
        return
    if not rows:
        typer.echo("no webhook dead letters")
        return
    for r in rows:
        typer.echo(
            f"{r.at.isoformat(timespec='seconds')} {r.subscription} {r.event_type} {r.delivery}"
        )
        for e in r.errors:
            typer.echo(f"    attempt {e.attempt}: {e.error}")


def _connect(settings: Settings, name: str) -> AbstractAsyncContextManager[Bus]:
    from services.runtime.bus import connect

    return connect(
        settings.effective_nats_url,
        name=name,
        timeout=settings.connect_timeout,
        security=settings.nats_security,
    )


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
