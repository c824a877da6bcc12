"""The shipped per-role NATS users (deploy/nats/auth.conf, ADR 0031) on a real nats-server:
each role works as its own user, and each is refused outside its rights.

The server runs the shipped files themselves: the test rewrites only the ports, the
store dir and the passwords (passwords.conf, generated per deployment), so it breaks
when the files do."""

from __future__ import annotations

import asyncio
import re
import secrets
import shutil
import subprocess
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client

from contracts import subjects
from contracts.events import DeliveryDeadLettered, DeliveryReceipt, MessageReceived
from services.ops.simclient import SimUser
from services.runtime.bus import Bus, connect
from services.runtime.nats_server import EmbeddedNats, nats_server_binary
from services.runtime.settings import NatsSecurity, Secret
from tests.conftest import (
    REPO,
    Processes,
    assert_audit_clean,
    read_stream,
    run_svc,
    wait_until,
)
from tests.e2e.conftest import consumers_ready
from tests.e2e.test_cloud_ingress import ACCOUNT as CLOUD_ACCOUNT
from tests.e2e.test_cloud_ingress import SECRET as CLOUD_SECRET
from tests.e2e.test_cloud_ingress import cloud_env, listening_url
from tests.whatsapp.fake_graph import (
    DEFAULT_PHONE_NUMBER_ID,
    WebhookClient,
    message_body,
    status_body,
)

pytestmark = pytest.mark.slow

DEPLOY = REPO / "deploy" / "nats"
ROLE_USERS = ("core", "whatsapp", "whatsapp-ingress", "whatsapp-egress", "web", "operator")
_USER_RE = re.compile(r"user:\s*([\w-]+)\s*\n\s*password:\s*\$(\w+)")


def shipped_users() -> dict[str, str]:
    """user -> the variable passwords.conf must define for it, as auth.conf declares."""
    return dict(_USER_RE.findall((DEPLOY / "auth.conf").read_text()))


def _rewrite(text: str, pattern: str, replacement: str) -> str:
    new, count = re.subn(pattern, replacement, text, flags=re.M)
    assert count == 1, f"the shipped config no longer has exactly one {pattern!r}"
    return new


@dataclass
class SecuredServer:
    """A nats-server running a shipped config, and each user's generated password."""

    url: str
    passwords: dict[str, str]
    log: Path

    def security(self, user: str) -> NatsSecurity:
        return NatsSecurity(user=user, password=Secret(self.passwords[user]))

    def env(self, processes: Processes, user: str, **more: str) -> dict[str, str]:
        return processes.env(
            NATS_URL=self.url, NATS_USER=user, NATS_PASSWORD=self.passwords[user], **more
        )

    def violations(self) -> list[str]:
        return [line for line in self.log.read_text().splitlines() if "Violation" in line]


def write_config(tmp_path: Path, shipped: str, passwords: dict[str, str]) -> Path:
    """`shipped` (a deploy/nats file) with free ports and a temp store, beside auth.conf
    and a passwords.conf holding `passwords`."""
    conf_dir = tmp_path / "conf"
    conf_dir.mkdir(exist_ok=True)
    text = (DEPLOY / shipped).read_text()
    text = _rewrite(text, r"^listen: .*$", "listen: 127.0.0.1:-1")
    text = _rewrite(text, r"^http: .*$", "http: 127.0.0.1:-1")
    # The store dir is given on the command line (EmbeddedNats; two would be an error).
    text = _rewrite(text, r"^  store_dir: .*$", "  # store_dir: on the command line")
    assert re.search(r'^include "auth.conf"$', text, re.M), f"{shipped} does not include auth"
    (conf_dir / shipped).write_text(text)
    shutil.copy(DEPLOY / "auth.conf", conf_dir / "auth.conf")
    users = shipped_users()
    (conf_dir / "passwords.conf").write_text(
        "".join(f'{users[user]}: "{password}"\n' for user, password in passwords.items())
    )
    return conf_dir / shipped


@pytest.fixture
async def secured(tmp_path: Path) -> AsyncIterator[SecuredServer]:
    """The shipped single.conf with every role's user, on a free port."""
    assert set(shipped_users()) == set(ROLE_USERS), "auth.conf must ship one user per role"
    passwords = {user: secrets.token_urlsafe(16) for user in ROLE_USERS}
    conf = write_config(tmp_path, "single.conf", passwords)
    log = tmp_path / "server.log"
    # --log after -c: the server's own log, read for permission violations.
    args = ("-c", str(conf), "--log", str(log))
    async with EmbeddedNats(tmp_path / "store", port=0, extra_args=args) as server:
        yield SecuredServer(server.url, passwords, log)


@pytest.fixture
async def operator(
    secured: SecuredServer, processes: Processes, request: pytest.FixtureRequest
) -> AsyncIterator[Bus]:
    """Streams provisioned by `svc streams ensure` as operator; a test client as operator
    (the audit must find no violation in what the test left in the log)."""
    ensured = run_svc("streams", "ensure", env=secured.env(processes, "operator"))
    assert ensured.returncode == 0, ensured.stderr.decode()
    async with connect(
        secured.url, name="test-operator", security=secured.security("operator")
    ) as bus:
        yield bus
        await assert_audit_clean(bus, request)


async def raw_client(server: SecuredServer, user: str) -> tuple[Client, list[str]]:
    """A plain nats-py client logged in as `user`, collecting the errors the server sends."""
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        server.url,
        user=user,
        password=server.passwords[user],
        error_cb=on_error,
        allow_reconnect=False,
    )
    return nc, errors


async def assert_denied(server: SecuredServer, user: str, subject: str) -> None:
    """A raw client of `user` publishing on `subject` gets a permissions violation."""
    nc, errors = await raw_client(server, user)
    try:
        await nc.publish(subject, b"{}")
        await nc.flush()
        await wait_until(
            lambda: any("permissions violation" in e for e in errors),
            what=f"a permissions violation for {user} publishing to {subject}",
        )
    finally:
        await nc.close()
    assert any(f'publish to "{subject.lower()}"' in e for e in errors), errors


async def test_each_role_runs_as_its_own_user_and_a_message_is_answered(
    secured: SecuredServer, operator: Bus, processes: Processes
) -> None:
    # Given streams made by the operator, an access policy and a plugin recorded (so the
    # core's projections read ACCESS and PLUGINS), and each role started as its own user
    for command in (("access", "mode", "open"), ("plugins", "install", "memory")):
        done = run_svc(*command, env=secured.env(processes, "operator"))
        assert done.returncode == 0, done.stderr.decode()
    # (the sim refuses sends to one chat for good, and confirms the others with receipts)
    faults = {"SIM_FAILING_CHATS": "doomed@s.whatsapp.net", "SIM_AUTO_RECEIPTS": "1"}
    roles = {
        role: processes.start("run", role, **secured.env(processes, role, **faults))
        for role in ("core", "whatsapp-ingress", "whatsapp-egress")
    }
    await wait_until(
        lambda: consumers_ready(
            operator,
            ("SIM", "sim-in-default"),
            ("INBOUND", "core"),
            ("OUTBOUND", "egress-whatsapp-default"),
        ),
        timeout=30,
        what="the core, ingress and egress consumers",
    )
    # When a simulated user writes
    async with SimUser(operator, "default") as user:
        exchange = await user.send("alice@s.whatsapp.net", "hello, least privilege")
        # Then the reply comes back through all three roles
        answered = await user.wait_replies(30)
        logs = "\n".join(processes.log(proc) for proc in roles.values())
        assert answered, logs
        # And a reply the network refuses for good is dead-lettered
        await user.send("doomed@s.whatsapp.net", "nobody will get this")
        await wait_until(
            lambda: _dead_lettered(operator), timeout=30, what="the refused reply dead-lettered"
        )
    assert exchange.reply is not None
    assert exchange.reply.text == "echo: hello, least privilege"
    job_id = exchange.reply.job_id
    await wait_until(
        lambda: _receipted(operator, job_id), timeout=30, what="the sim's receipts recorded"
    )
    for role, proc in roles.items():
        assert processes.stop(proc) == 0, f"{role}: {processes.log(proc)}"
    # And nothing any role did was outside its permissions
    assert secured.violations() == []
    audit = run_svc("audit", env=secured.env(processes, "operator"))
    assert audit.returncode == 0, audit.stdout.decode() + audit.stderr.decode()


async def _dead_lettered(bus: Bus) -> bool:
    events = [e for _, e in await read_stream(bus, "DELIVERY")]
    return any(isinstance(e, DeliveryDeadLettered) for e in events)


async def _receipted(bus: Bus, job_id: str) -> bool:
    events = [e for _, e in await read_stream(bus, "DELIVERY")]
    return any(isinstance(e, DeliveryReceipt) and e.job_id == job_id for e in events)


async def test_the_combined_whatsapp_role_runs_as_its_own_user(
    secured: SecuredServer, operator: Bus, processes: Processes
) -> None:
    core = processes.start("run", "core", **secured.env(processes, "core"))
    whatsapp = processes.start("run", "whatsapp", **secured.env(processes, "whatsapp"))
    await wait_until(lambda: consumers_ready(operator), timeout=30, what="core and owner")
    async with SimUser(operator, "default") as user:
        await user.send("bob@s.whatsapp.net", "one process for the account")
        assert await user.wait_replies(30), processes.log(core) + processes.log(whatsapp)
    assert processes.stop(whatsapp) == 0, processes.log(whatsapp)
    assert processes.stop(core) == 0, processes.log(core)
    assert secured.violations() == []


@pytest.mark.parametrize(
    ("user", "subject", "stream"),
    [
        ("core", f"$KV.leases.{subjects.lease_key('whatsapp', 'default')}", "KV_leases"),
        ("whatsapp-ingress", "outbound.whatsapp.default.x", "OUTBOUND"),
        ("whatsapp-ingress", "$KV.leases.whatsapp.default", "KV_leases"),
        ("web", "$KV.leases.whatsapp.default", "KV_leases"),
        ("web", "$JS.API.CONSUMER.CREATE.OUTBOUND", None),
        ("core", "$JS.API.STREAM.CREATE.INBOUND", None),
        ("whatsapp", "$JS.API.STREAM.DELETE.INBOUND", None),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
async def test_each_role_is_refused_outside_its_rights(
    secured: SecuredServer, operator: Bus, user: str, subject: str, stream: str | None
) -> None:
    # When a plain client with the role's credentials publishes where it may not
    await assert_denied(secured, user, subject)
    # Then the server refused it, and nothing was stored
    if stream is not None:
        assert (await operator.js.stream_info(stream)).state.messages == 0
    assert (await operator.js.stream_info("INBOUND")).config.name == "INBOUND"


async def test_a_role_denied_what_it_needs_exits_with_one_line_naming_it(
    secured: SecuredServer, operator: Bus, processes: Processes
) -> None:
    # Given the ingress started with the core's user, which may not consume SIM
    result = await asyncio.to_thread(
        run_svc,
        "run",
        "whatsapp-ingress",
        env=secured.env(processes, "core"),
        timeout=60,
    )
    # Then it exits non-zero with one line naming the denial, not a bare timeout
    lines = [ln for ln in result.stderr.decode().splitlines() if ln.startswith("svc:")]
    assert result.returncode == 2  # configuration: a restart cannot help
    assert len(lines) == 1, result.stderr.decode()
    assert "NATS denied NATS user 'core' permission to publish to" in lines[0]
    assert "$js.api.consumer" in lines[0]
    assert secured.passwords["core"] not in result.stderr.decode()


async def test_a_role_does_not_create_streams_and_says_who_does(
    secured: SecuredServer, processes: Processes
) -> None:
    # Given a fresh server (no `svc streams ensure` yet)
    result = await asyncio.to_thread(
        run_svc, "run", "core", env=secured.env(processes, "core"), timeout=60
    )
    # Then the core exits with one line: run `svc streams ensure` as the operator
    lines = [ln for ln in result.stderr.decode().splitlines() if ln.startswith("svc:")]
    assert result.returncode == 2
    assert len(lines) == 1, result.stderr.decode()
    assert "svc streams ensure' as the operator" in lines[0]


async def test_the_cloud_ingress_stores_webhooks_as_its_own_user(
    secured: SecuredServer, operator: Bus, processes: Processes
) -> None:
    # Given a Cloud API ingress run as whatsapp-ingress
    env = cloud_env(secured.url, SVC_HTTP_PORT="0")
    env.pop("NATS_URL")
    ingress = processes.start(
        "run", "whatsapp-ingress", **env, **secured.env(processes, "whatsapp-ingress")
    )
    client = WebhookClient(await listening_url(processes, ingress), CLOUD_SECRET)
    # When Meta delivers a message and a status of one of our sends
    bodies = [
        message_body(DEFAULT_PHONE_NUMBER_ID, "wamid.LP1", "15550004444", "hello"),
        status_body(DEFAULT_PHONE_NUMBER_ID, "wamid.S1", "delivered", job_id="job-lp-1"),
    ]
    answers = [await client.post(CLOUD_ACCOUNT, body) for body in bodies]
    # Then both are stored (before the 200s), with nothing outside the user's permissions
    assert [a.status for a in answers] == [200, 200], [a.body for a in answers]
    inbound = [
        e for _, e in await read_stream(operator, "INBOUND") if isinstance(e, MessageReceived)
    ]
    assert [m.message_id for m in inbound] == ["wamid.LP1"]
    receipts = [
        e for _, e in await read_stream(operator, "DELIVERY") if isinstance(e, DeliveryReceipt)
    ]
    assert [r.job_id for r in receipts] == ["job-lp-1"]
    assert processes.stop(ingress) == 0, processes.log(ingress)
    assert secured.violations() == []


@pytest.mark.parametrize("node", ["cluster-node1.conf", "cluster-node2.conf", "cluster-node3.conf"])
def test_each_cluster_node_carries_the_same_users_and_keeps_its_routes(
    tmp_path: Path, node: str
) -> None:
    text = (DEPLOY / node).read_text()
    assert re.search(r"^cluster \{", text, re.M), f"{node} lost its cluster block"
    assert text.count("nats-route://") == 3
    passwords = {user: secrets.token_urlsafe(8) for user in ROLE_USERS}
    conf = write_config(tmp_path, node, passwords)
    checked = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, check=False
    )
    assert checked.returncode == 0, checked.stderr.decode()
    # Without a passwords.conf the server refuses to start (no default passwords).
    (conf.parent / "passwords.conf").unlink()
    refused = subprocess.run(
        [nats_server_binary(), "-t", "-c", str(conf)], capture_output=True, check=False
    )
    assert refused.returncode != 0
    assert "passwords.conf" in refused.stderr.decode() + refused.stdout.decode()
