"""The WhatsApp Cloud API end to end, through real `svc` processes (issue 15).

A fleet: `svc run core`, two `svc run whatsapp-ingress` replicas (each its own
SVC_HTTP_PORT, as behind a load balancer) and two `svc run whatsapp-egress` (owner and
standby), all with WHATSAPP_TRANSPORT=cloud and two numbers from
WHATSAPP_CLOUD_ACCOUNTS_FILE: `acme` (with a message template for the 24-hour window) and
`bare` (without). This test process plays Meta: a fake Graph API on 127.0.0.1 takes the
sends (`tests/whatsapp/fake_graph.py`, WHATSAPP_CLOUD_API_URL points at it) and a
webhook client posts signed webhooks to the replicas, alternating.

Judged from what the fake Graph API received and from the event streams; the `served`
fixture runs `svc audit` over the log at the end.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import time
import urllib.parse
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest

from contracts.events import (
    DeliveryFailed,
    DeliveryReceipt,
    DeliveryUncertain,
    LeaseAcquired,
    MessageReceived,
    MessageSent,
    TurnCompleted,
)
from services.runtime.bus import Bus, connect
from tests.conftest import (
    Processes,
    assert_audit_clean,
    free_ports,
    read_stream,
    stream_raw,
    wait_until,
)
from tests.e2e.conftest import consumers_ready, holder_of, pid_of, read_url, turn_records
from tests.whatsapp.fake_graph import (
    DEFAULT_TOKEN,
    FakeGraph,
    GraphRequest,
    Reply,
    WebhookClient,
    error,
    graph_error,
    message_body,
    ok,
    rate_limited,
    sign,
    status_body,
    status_error,
)

pytestmark = pytest.mark.slow

ACME, BARE = "acme", "bare"
NUMBERS = {ACME: "1000000000001", BARE: "1000000000002"}  # Phone number IDs
APP_SECRET = "e2e-app-secret-not-a-secret"
VERIFY_TOKEN = "e2e-verify-token-not-a-secret"
TEMPLATE = "reengage_v1"
GROUP = "120363000000000001"  # a Cloud API group id
API_VERSION = "v21.0"
MAX_BODY = 4096  # SVC_WEBHOOK_MAX_BYTES: small, so an oversize body is cheap to build

_SEND_PATH = re.compile(r"^/(v\d+\.\d+)/([^/]+)/messages$")


class Graph(FakeGraph):
    """The fake Graph API for several numbers (one per account, one token), whose default
    answer can be slow: a send in flight when its sender is killed is then likely."""

    def __init__(self, numbers: dict[str, str], *, delay: float = 0.0) -> None:
        super().__init__(phone_number_id=next(iter(numbers.values())), token=DEFAULT_TOKEN)
        self.numbers = dict(numbers)
        self.delay = delay

    def _answer(self, method: str, path: str, headers: dict[str, str], body: Any) -> Reply:
        match = _SEND_PATH.match(urllib.parse.urlsplit(path).path)
        if method != "POST" or match is None:
            return Reply(400, graph_error(100, message="Unknown path components"))
        if headers.get("authorization") != f"Bearer {self.token}":
            return error(190)
        if match.group(2) not in self.numbers.values():
            return Reply(400, graph_error(100, details=f"Unknown phone number id {match.group(2)}"))
        if not isinstance(body, dict) or body.get("messaging_product") != "whatsapp":
            return Reply(400, graph_error(100, details="messaging_product must be whatsapp"))
        return self._next_reply(body.get("to"))

    def _next_reply(self, recipient: str | None) -> Reply:
        reply = super()._next_reply(recipient)
        return replace(reply, delay=self.delay) if self.delay and reply == ok() else reply

    def __enter__(self) -> Graph:
        super().__enter__()
        return self

    def account_of(self, request: GraphRequest) -> str:
        match = _SEND_PATH.match(urllib.parse.urlsplit(request.path).path)
        assert match is not None, request.path
        return next(a for a, n in self.numbers.items() if n == match.group(2))

    def to(self, user: str, *, accepted: bool = True) -> list[GraphRequest]:
        """The send requests to `user` (digits), in arrival order (only 200s: `accepted`)."""
        with self._lock:
            return [r for r in self.requests if r.to == user and (r.status == 200 or not accepted)]


def wamid_of(request: GraphRequest) -> str:
    """The message id the fake answered a send with."""
    return str(request.answer["messages"][0]["id"])


def text_of(request: GraphRequest) -> str:
    return str(request.body.get("text", {}).get("body", ""))


def cloud_env(url: str, graph: FakeGraph, tmp_path: Path, **extra: str) -> dict[str, str]:
    """The environment every process of the fleet shares (as a deployment's env file)."""
    accounts = tmp_path / "cloud-accounts.json"
    accounts.write_text(
        json.dumps(
            {
                ACME: {"phone_number_id": NUMBERS[ACME], "token": DEFAULT_TOKEN,
                       "template": TEMPLATE, "language": "en_US"},
                BARE: {"phone_number_id": NUMBERS[BARE], "token": DEFAULT_TOKEN},
            }
        )
    )  # fmt: skip
    return {
        "NATS_URL": url,
        "WHATSAPP_TRANSPORT": "cloud",
        "WHATSAPP_ACCOUNTS": f"{ACME},{BARE}",
        "WHATSAPP_CLOUD_ACCOUNTS_FILE": str(accounts),
        # One Meta app: its app secret and verify token serve both numbers (the fallback).
        "WHATSAPP_CLOUD_APP_SECRET": APP_SECRET,
        "WHATSAPP_CLOUD_VERIFY_TOKEN": VERIFY_TOKEN,
        "WHATSAPP_CLOUD_API_URL": graph.url,
        "WHATSAPP_CLOUD_API_VERSION": API_VERSION,
        "SVC_WEBHOOK_MAX_BYTES": str(MAX_BODY),
        # Every reply quotes the message it answers: the send body's context is checked.
        "SVC_QUOTE_REPLIES": "always",
        "DELIVERY_BACKOFF": "1,1,2,5,10",
        # A send bounded at 3 s; TTL 8 proves 6.4 s, two sends' worth (the default 30 s
        # would make the kill -9 takeover slow). A new owner waits 5 s for a status.
        "WHATSAPP_CLOUD_SEND_TIMEOUT": "3",
        "WHATSAPP_LEASE_TTL": "8",
        "WHATSAPP_CLOUD_CONFIRM_WAIT": "5",
        **extra,
    }


@dataclass
class Fleet:
    """The running processes and a webhook client per ingress replica."""

    hooks: list[WebhookClient]
    egress: list[int]

    def hook(self, n: int) -> WebhookClient:
        """Replica n mod 2: what a load balancer in front of them does."""
        return self.hooks[n % len(self.hooks)]


async def _handshake_ok(client: WebhookClient) -> bool:
    try:
        answer = await client.verify(ACME, "subscribe", VERIFY_TOKEN, "ready?")
    except OSError:
        return False  # not listening yet
    return answer.status == 200 and answer.body == b"ready?"


async def start_fleet(processes: Processes, bus: Bus, env: dict[str, str]) -> Fleet:
    """core + two ingress replicas + owner and standby egress; returns once each ingress
    answers the handshake and both accounts have an owner pulling their jobs."""
    processes.start("run", "core", **env)
    ports = free_ports(2)
    for port in ports:
        processes.start("run", "whatsapp-ingress", **env, SVC_HTTP_PORT=str(port))
    egress = [processes.start("run", "whatsapp-egress", **env).pid for _ in range(2)]
    hooks = [WebhookClient(f"http://127.0.0.1:{port}", APP_SECRET, timeout=30) for port in ports]
    for client in hooks:
        await wait_until(
            lambda c=client: _handshake_ok(c), timeout=60, what=f"ingress at {client.base_url}"
        )
    # Fair share settled: each egress owns one account (a rebalance later would move an
    # account under the test's feet)
    await wait_until(lambda: _one_each(bus), timeout=60, what="one account owned by each egress")
    await wait_until(
        lambda: consumers_ready(
            bus,
            ("INBOUND", "core"),
            ("OUTBOUND", f"egress-whatsapp-{ACME}"),
            ("OUTBOUND", f"egress-whatsapp-{BARE}"),
        ),
        timeout=60,
        what="the core and both egress consumers",
    )
    return Fleet(hooks=hooks, egress=egress)


async def _one_each(bus: Bus) -> bool:
    holders = {await holder_of(bus, ACME), await holder_of(bus, BARE)}
    return None not in holders and len(holders) == 2


def user(n: int) -> str:
    """A WhatsApp user's number (the `wa_id`; the chat is `<digits>@s.whatsapp.net`)."""
    return f"1555300{n:04d}"


def jid(digits: str) -> str:
    return f"{digits}@s.whatsapp.net"


async def write(
    fleet: Fleet, n: int, account: str, wamid: str, from_: str, text: str, **kw: Any
) -> None:
    """A user's message delivered by Meta to replica n mod 2; answered 200 (persisted)."""
    answer = await fleet.hook(n).post(
        account, message_body(NUMBERS[account], wamid, from_, text, **kw)
    )
    assert answer.status == 200, (answer.status, answer.body)


async def report(fleet: Fleet, n: int, account: str, wamid: str, status: str, **kw: Any) -> None:
    """Meta's status webhook for our message `wamid`, through replica n mod 2."""
    answer = await fleet.hook(n).post(account, status_body(NUMBERS[account], wamid, status, **kw))
    assert answer.status == 200, (answer.status, answer.body)


async def events(bus: Bus, stream: str, kind: type) -> list[Any]:
    return [e for _, e in await read_stream(bus, stream) if isinstance(e, kind)]


async def sent_once_to(graph: Graph, digits: str, count: int = 1) -> list[GraphRequest]:
    await wait_until(
        lambda: len(graph.to(digits)) >= count, timeout=60, what=f"{count} send(s) to {digits}"
    )
    return graph.to(digits)


@pytest.mark.timeout(300)
async def test_cloud_messages_statuses_templates_and_retries_through_real_processes(
    processes: Processes, served: tuple[str, Bus], tmp_path: Path
) -> None:
    url, bus = served
    with Graph(NUMBERS) as graph:
        fleet = await start_fleet(processes, bus, cloud_env(url, graph, tmp_path))

        # -- A signed message is answered through the Graph API with the right body -------
        alice = user(1)
        await write(fleet, 0, ACME, "wamid.in.alice.1", alice, "hello there",
                    context_id="wamid.out.earlier")  # fmt: skip
        (reply,) = await sent_once_to(graph, alice)
        assert reply.path == f"/{API_VERSION}/{NUMBERS[ACME]}/messages"
        assert reply.headers["authorization"] == f"Bearer {DEFAULT_TOKEN}"
        assert reply.body["type"] == "text"
        assert reply.body["text"] == {"body": "echo: hello there"}
        assert reply.body["context"] == {"message_id": "wamid.in.alice.1"}  # the quote
        job_id = reply.body["biz_opaque_callback_data"]
        (received,) = [
            e for e in await events(bus, "INBOUND", MessageReceived) if e.chat == jid(alice)
        ]
        assert (received.account, received.sender, received.message_id, received.quoted_id) == (
            ACME,
            jid(alice),
            "wamid.in.alice.1",
            "wamid.out.earlier",
        )
        assert received.sender_name == "Test User"
        await wait_until(lambda: _sent(bus, job_id), timeout=30, what="MessageSent of the reply")
        (sent,) = [e for e in await events(bus, "DELIVERY", MessageSent) if e.job_id == job_id]
        assert sent.transport_message_id == wamid_of(reply)
        assert (sent.account, sent.chat) == (ACME, jid(alice))

        # -- Statuses, out of order and duplicated, become one linked receipt each --------
        wamid = wamid_of(reply)
        for n, (status, with_job) in enumerate(
            [
                ("read", True),
                ("sent", True),
                ("delivered", False),  # no biz_opaque_callback_data: found by its wamid
                ("read", True),
                ("sent", True),
                ("delivered", True),
            ]
        ):
            await report(fleet, n, ACME, wamid, status, job_id=job_id if with_job else None,
                         recipient_id=alice)  # fmt: skip
        # 200 means stored: nothing to wait for
        receipts = [e for e in await events(bus, "DELIVERY", DeliveryReceipt) if e.job_id == job_id]
        assert sorted(r.status for r in receipts) == ["delivered", "read", "sent"]
        assert {(r.transport_message_id, r.chat, r.account) for r in receipts} == {
            (wamid, jid(alice), ACME)
        }

        # -- failed 131047: the template where the account has one; else recorded only ----
        bob, carol = user(2), user(3)
        await write(fleet, 1, ACME, "wamid.in.bob.1", bob, "are you there?")
        await write(fleet, 0, BARE, "wamid.in.carol.1", carol, "anyone?")
        (to_bob,) = await sent_once_to(graph, bob)
        (to_carol,) = await sent_once_to(graph, carol)
        bob_job = to_bob.body["biz_opaque_callback_data"]
        carol_job = to_carol.body["biz_opaque_callback_data"]
        await wait_until(lambda: _sent(bus, bob_job), timeout=30, what="bob's reply recorded")
        await wait_until(lambda: _sent(bus, carol_job), timeout=30, what="carol's reply recorded")
        # Meta later reports both undeliverable: outside the 24-hour window
        await report(fleet, 1, ACME, wamid_of(to_bob), "failed", job_id=bob_job,
                     errors=[status_error(131047)], recipient_id=bob)  # fmt: skip
        await report(fleet, 0, BARE, wamid_of(to_carol), "failed", job_id=carol_job,
                     errors=[status_error(131047)], recipient_id=carol)  # fmt: skip
        failed = {e.job_id: e for e in await events(bus, "DELIVERY", DeliveryFailed)}
        for job, account, digits in ((bob_job, ACME, bob), (carol_job, BARE, carol)):
            outcome = (failed[job].attempt, failed[job].permanent, failed[job].code)
            assert outcome == (0, True, 131047)
            assert (failed[job].account, failed[job].chat) == (account, jid(digits))
            assert failed[job].error.startswith("131047")
        # acme has a template: one template send for bob's job, as a job of its own
        to_bob_again = await sent_once_to(graph, bob, 2)
        template = to_bob_again[1]
        assert template.body["type"] == "template"
        assert template.body["template"] == {"name": TEMPLATE, "language": {"code": "en_US"}}
        template_job = template.body["biz_opaque_callback_data"]
        assert template_job not in (bob_job, "")
        await wait_until(
            lambda: _sent(bus, template_job), timeout=30, what="the template's MessageSent"
        )
        # bare has none: once the window follow-up and bare's egress have nothing left,
        # carol got no further request
        last = (await bus.js.stream_info("DELIVERY")).state.last_seq
        await wait_until(
            lambda: _drained(bus, "DELIVERY", "cloud-window", last),
            timeout=30,
            what="the cloud-window follow-up past the failures",
        )
        await wait_until(
            lambda: _drained(bus, "OUTBOUND", f"egress-whatsapp-{BARE}", 0),
            timeout=30,
            what="bare's egress idle",
        )
        assert [r.body.get("type") for r in graph.to(carol, accepted=False)] == ["text"]
        assert await stream_raw(bus, "OUTBOUND", f"outbound.whatsapp.{BARE}.*") == []

        # -- 429 then success: the reply is retried in place and the chat's order holds ---
        dave = user(4)
        graph.script_for(dave, rate_limited())
        await write(fleet, 0, ACME, "wamid.in.dave.1", dave, "first")
        await write(fleet, 1, ACME, "wamid.in.dave.2", dave, "second")
        await sent_once_to(graph, dave, 2)
        attempts = [(r.status, text_of(r)) for r in graph.to(dave, accepted=False)]
        assert attempts == [(429, "echo: first"), (200, "echo: first"), (200, "echo: second")]
        to_dave = graph.to(dave)
        dave_jobs = [r.body["biz_opaque_callback_data"] for r in to_dave]
        for job in dave_jobs:
            await wait_until(lambda j=job: _sent(bus, j), timeout=30, what="dave's replies")
        retried = [e for e in await events(bus, "DELIVERY", DeliveryFailed)
                   if e.job_id == dave_jobs[0]]  # fmt: skip
        assert retried, "the 429 is recorded as a failed attempt"
        assert not any(e.permanent for e in retried)
        sent_order = [
            e.job_id for e in await events(bus, "DELIVERY", MessageSent) if e.chat == jid(dave)
        ]
        assert sent_order == dave_jobs

        # -- A group message (Cloud API groups carry no mentions): recorded, not answered
        # under SVC_GROUP_REPLIES=mention (the default)
        member = user(8)
        body = message_body(NUMBERS[ACME], "wamid.in.group.1", member, "hello group")
        body["entry"][0]["changes"][0]["value"]["messages"][0]["group_id"] = GROUP
        assert (await fleet.hook(1).post(ACME, body)).status == 200
        (in_group,) = [
            e
            for e in await events(bus, "INBOUND", MessageReceived)
            if e.message_id == "wamid.in.group.1"
        ]
        assert (in_group.chat, in_group.sender, in_group.is_group, in_group.mentioned) == (
            f"{GROUP}@g.us",
            jid(member),
            True,
            False,
        )
        await wait_until(
            lambda: _has_turn(bus, in_group.id), timeout=30, what="the group's turn record"
        )
        turn = await _turn_of(bus, in_group.id)
        assert turn is not None
        assert turn.skipped
        assert turn.reply_ids == []
        assert not [r for r in graph.requests if r.to in (member, GROUP)]

        # -- Refusals through the real processes: nothing stored, the server keeps serving -
        before = await _stored(bus)
        body = message_body(NUMBERS[ACME], "wamid.in.mallory.1", user(9), "let me in")
        raw = json.dumps(body).encode()
        answers = {
            "bad signature": await fleet.hook(0).post(
                ACME, raw, signature=sign("not-the-app-secret", raw)
            ),
            "missing signature": await fleet.hook(1).post(ACME, raw, sign=False),
            "malformed": await fleet.hook(0).post(ACME, b'{"object": "whatsapp_business_'),
            "not the Graph shape": await fleet.hook(1).post(ACME, b'{"entry": 7}'),
            "a number no account has": await fleet.hook(0).post(
                ACME, message_body("1000000000099", "wamid.in.mallory.2", user(9), "hi")
            ),
            "oversize": await fleet.hook(1).post(
                ACME, message_body(NUMBERS[ACME], "wamid.in.mallory.3", user(9), "x" * MAX_BODY)
            ),
            "unknown account": await fleet.hook(0).post("nobody", raw),
            "wrong verify token": await fleet.hook(1).verify(
                ACME, "subscribe", "guess", "never-echoed-1"
            ),
            "wrong mode": await fleet.hook(0).verify(
                ACME, "unsubscribe", VERIFY_TOKEN, "never-echoed-2"
            ),
        }
        statuses = {what: answer.status for what, answer in answers.items()}
        assert statuses == {
            "bad signature": 403,
            "missing signature": 401,
            "malformed": 400,
            "not the Graph shape": 400,
            "a number no account has": 400,
            "oversize": 413,
            "unknown account": 404,
            "wrong verify token": 403,
            "wrong mode": 403,
        }
        assert not any(b"never-echoed" in a.body for a in answers.values())
        assert await _stored(bus) == before
        # ...and both replicas still serve: a good message is answered
        for n in range(2):
            erin = user(5 + n)
            await write(fleet, n, ACME, f"wamid.in.erin.{n}", erin, f"still there? {n}")
            (answered,) = await sent_once_to(graph, erin)
            assert text_of(answered) == f"echo: still there? {n}"
            await wait_until(
                lambda r=answered: _sent(bus, r.body["biz_opaque_callback_data"]),
                timeout=30,
                what="the reply recorded",
            )
        # No secret reached a log
        for proc in processes.procs:
            log = processes.log(proc)
            assert APP_SECRET not in log
            assert DEFAULT_TOKEN not in log
            assert VERIFY_TOKEN not in log


async def _turn_of(bus: Bus, inbound_id: str) -> TurnCompleted | None:
    found = [e for e in await events(bus, "AGENT", TurnCompleted) if e.inbound_id == inbound_id]
    return found[0] if found else None


async def _has_turn(bus: Bus, inbound_id: str) -> bool:
    return await _turn_of(bus, inbound_id) is not None


async def _sent(bus: Bus, job_id: str) -> bool:
    return any(e.job_id == job_id for e in await events(bus, "DELIVERY", MessageSent))


async def _drained(bus: Bus, stream: str, durable: str, upto: int) -> bool:
    """The durable consumer has been handed everything up to stream seq `upto` and holds
    nothing unacknowledged."""
    info = await bus.js.consumer_info(stream, durable)
    return (
        info.num_pending == 0
        and info.num_ack_pending == 0
        and (info.delivered.stream_seq or 0) >= upto
    )


async def _stored(bus: Bus) -> tuple[int, ...]:
    """How much the webhook path has stored: INBOUND, DELIVERY, and the webhooks bucket."""
    counts = []
    for stream in ("INBOUND", "DELIVERY", "KV_webhooks"):
        counts.append(len(await stream_raw(bus, stream)))
    return tuple(counts)


# -- kill -9 of the owner mid-traffic ------------------------------------------------


class Meta:
    """What Meta does after accepting a send: a `sent` status webhook for it (echoing the
    job id), through the replicas in turn. It runs while the test runs."""

    def __init__(self, graph: Graph, fleet: Fleet) -> None:
        self.graph = graph
        self.fleet = fleet
        self.reported: set[int] = set()  # indexes into graph.requests
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        n = 0
        while True:
            with self.graph._lock:
                todo = [
                    (i, r)
                    for i, r in enumerate(self.graph.requests)
                    if i not in self.reported and r.status == 200
                ]
            for i, request in todo:
                account = self.graph.account_of(request)
                answer = await self.fleet.hook(n).post(
                    account,
                    status_body(
                        NUMBERS[account],
                        wamid_of(request),
                        "sent",
                        job_id=request.body["biz_opaque_callback_data"],
                        recipient_id=str(request.to),
                    ),
                )
                n += 1
                if answer.status == 200:
                    self.reported.add(i)  # else Meta retries it later
            await asyncio.sleep(0.05)  # polling the fake's log, as a webhook sender would

    def caught_up(self) -> bool:
        return len(self.reported) == len(self.graph.sends())

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[Meta]:
        self._task = asyncio.create_task(self._run())
        try:
            yield self
        finally:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


CHATS = 6
PER_CHAT = 4  # half before the kill, half after


def chat_user(c: int) -> str:
    return f"1555400{c:04d}"


@pytest.mark.timeout(300)
async def test_kill_9_of_the_owner_every_message_is_answered_once_in_order(
    processes: Processes, served: tuple[str, Bus], tmp_path: Path
) -> None:
    url, bus = served
    # Each send takes 0.2 s at the Graph API, so replies of several chats are in flight
    with Graph(NUMBERS, delay=0.2) as graph:
        fleet = await start_fleet(processes, bus, cloud_env(url, graph, tmp_path))
        async with Meta(graph, fleet).running() as meta:
            posted: dict[str, list[str]] = {}

            async def users_write(rounds: range) -> None:
                n = 0
                for k in rounds:
                    for c in range(CHATS):
                        text = f"chat {c} message {k}"
                        await write(fleet, n, ACME, f"wamid.in.{c}.{k}", chat_user(c), text)
                        posted.setdefault(chat_user(c), []).append(f"echo: {text}")
                        n += 1

            # Given traffic flowing through both replicas to the owner of acme
            first = await holder_of(bus, ACME)
            assert first is not None
            await users_write(range(PER_CHAT // 2))
            await wait_until(
                lambda: len(graph.sends()) >= 4, timeout=60, what="the first replies going out"
            )
            # When the Graph API takes the next sends but answers late (Meta has them: their
            # status webhooks come), and the owner is killed with them in flight
            taken = len(graph.requests)
            graph.delay = 30.0
            await wait_until(
                lambda: len(graph.requests) > taken, timeout=60, what="a send in flight"
            )
            os.kill(pid_of(first), signal.SIGKILL)
            killed_at = time.monotonic()
            graph.delay = 0.2
            # ...and users keep writing
            await users_write(range(PER_CHAT // 2, PER_CHAT))

            # Then the standby takes acme over...
            await wait_until(
                lambda: _new_holder(bus, first), timeout=60, what="the standby taking over"
            )
            # ...and every message is answered
            expected = {text for texts in posted.values() for text in texts}
            await wait_until(
                lambda: {text_of(r) for r in graph.sends()} >= expected,
                timeout=120,
                what="a reply to every message",
            )
            total = CHATS * PER_CHAT
            await wait_until(
                lambda: _count(bus, MessageSent, total), timeout=60, what="every reply recorded"
            )
            await wait_until(meta.caught_up, timeout=60, what="a status for every send")

    sends = graph.sends()
    # Each reply reached the Graph API exactly once: an uncertain send was settled by its
    # status webhook (the job id in biz_opaque_callback_data), never sent twice
    assert Counter(text_of(r) for r in sends) == Counter(expected)
    # ...in each chat's order
    for digits, texts in posted.items():
        assert [text_of(r) for r in sends if r.to == digits] == texts
    # Every MessageSent names the one send of its job (a resolved uncertain one too)
    wamid_of_job = {r.body["biz_opaque_callback_data"]: wamid_of(r) for r in sends}
    sent = await events(bus, "DELIVERY", MessageSent)
    assert len({e.job_id for e in sent}) == len(sent) == total
    for e in sent:
        assert e.transport_message_id == wamid_of_job[e.job_id]
    # The sends in flight at the kill were recorded uncertain by the new owner and
    # resolved by their status webhooks (the MessageSent above carry their wamids)
    uncertain = {e.job_id for e in await events(bus, "DELIVERY", DeliveryUncertain)}
    in_flight = {r.body["biz_opaque_callback_data"] for r in graph.requests[taken:]
                 if r.time < killed_at and r.status == 200}  # fmt: skip
    assert in_flight
    assert in_flight <= uncertain <= set(wamid_of_job)
    # Every message had its turn, once
    turns = await turn_records(bus, total, timeout=60)
    assert len({t.inbound_id for t in turns}) == total
    # The lease passed from the dead owner to the standby, with a higher token
    acquired = [e for e in await events(bus, "ACCOUNTS", LeaseAcquired) if e.account == ACME]
    theirs = [e for e in acquired if e.holder == first][-1]
    assert acquired[-1].holder != first
    assert acquired[-1].token > theirs.token


async def _new_holder(bus: Bus, old: str) -> bool:
    holder = await holder_of(bus, ACME)
    return holder is not None and holder != old


async def _count(bus: Bus, kind: type, n: int) -> bool:
    return len(await events(bus, "DELIVERY", kind)) >= n


# -- NATS down --------------------------------------------------------------------------


@pytest.mark.timeout(300)
async def test_nats_down_the_ingress_answers_503_and_meta_s_retry_is_stored_once(
    processes: Processes, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    # Given a real nats-server, the core and one webhook replica
    nats = processes.start("nats", "serve", "--port", "0")
    url = read_url(nats)
    port = url.rsplit(":", 1)[1]
    async with connect(url, name="e2e-test") as bus:
        with Graph(NUMBERS) as graph:
            env = cloud_env(url, graph, tmp_path)
            processes.start("run", "core", **env)
            (http_port,) = free_ports(1)
            processes.start("run", "whatsapp-ingress", **env, SVC_HTTP_PORT=str(http_port))
            hook = WebhookClient(f"http://127.0.0.1:{http_port}", APP_SECRET, timeout=30)
            await wait_until(lambda: _handshake_ok(hook), timeout=60, what="the ingress")
            first = message_body(NUMBERS[ACME], "wamid.in.nats.1", user(7), "before")
            assert (await hook.post(ACME, first)).status == 200

            # When the NATS server goes away
            processes.stop(nats)
            later = message_body(NUMBERS[ACME], "wamid.in.nats.2", user(7), "during")
            began = time.monotonic()
            refused = await hook.post(ACME, later)
            took = time.monotonic() - began
            # Then the webhook is refused with 503 (Meta retries it), within Meta's 10 s
            assert refused.status == 503, refused
            assert took < 10, f"503 after {took:.1f} s"
            # ...and the server keeps serving: once NATS is back, Meta's retry is stored,
            # and a second retry of the same body is answered 200 and not stored again
            processes.start("nats", "serve", "--port", port)
            await wait_until(
                lambda: _answered(hook, later),
                timeout=60,
                what="the retry stored after NATS came back",
            )
            assert (await hook.post(ACME, later)).status == 200
            await wait_until(
                lambda: _received_count(bus, 2), timeout=30, what="both messages on INBOUND"
            )
            received = [e.message_id for e in await events(bus, "INBOUND", MessageReceived)]
            assert sorted(received) == ["wamid.in.nats.1", "wamid.in.nats.2"]
            await turn_records(bus, 2, timeout=60)
        await assert_audit_clean(bus, request)


async def _answered(hook: WebhookClient, body: dict[str, Any]) -> bool:
    return (await hook.post(ACME, body)).status == 200


async def _received_count(bus: Bus, n: int) -> bool:
    try:
        return len(await events(bus, "INBOUND", MessageReceived)) >= n
    except Exception:  # the test client still reconnecting
        return False
