"""What an operator does through the API reaches the running system (issue 18 items 5-7),
through a real `svc run web` and the sim: a proactive send is delivered on
`sim.whatsapp.<account>.out` as an operator-originated turn that `svc audit` accepts and
`svc audit explain` names; a requeued dead letter reaches the transport; a policy change
is what the next turn sees."""

from __future__ import annotations

import json

import pytest

from contracts import subjects
from contracts.events import (
    DeliveryDeadLettered,
    MessageRefused,
    TurnCompleted,
)
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, arun_svc, read_stream, role, wait_until
from tests.e2e.conftest import SimNetwork, holder_of, job
from tests.web.conftest import add_token, add_user, bearer, json_of, login, start_web

pytestmark = pytest.mark.slow

CHAT = "alice@s.whatsapp.net"
SEND = "/api/v1/accounts/default/messages"


async def _agent(bus: Bus, kind: type) -> list:  # type: ignore[type-arg]
    return [e for _, e in await read_stream(bus, "AGENT") if isinstance(e, kind)]


async def test_a_proactive_send_is_delivered_as_an_operator_turn_the_audit_explains(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "olivia", "operator")
    web = await start_web(processes, nats_server.url)
    session = await login(web, "olivia")
    async with SimNetwork(bus, "default") as net, role(bus, "all"):
        await wait_until(lambda: holder_of(bus, "default"), 30, "the account's owner")
        # When an operator sends a message from the console (cookie + CSRF token)
        async with web.client() as client:
            sent = await client.post(
                "/api/v1/accounts/default/messages",
                json={"chat": CHAT, "text": "Your order has shipped"},
                headers=session.headers(),
            )
            assert sent.status_code == 202, sent.text
            job_id = json_of(sent)["job_id"]
            # Then the sim network delivers it, from the lease holder, like any reply
            await net.wait(lambda: job_id in net.job_ids(), 30, "the operator's send")
            (out,) = [s for s in net.seen if s.job_id == job_id]
            assert (out.chat, out.text) == (CHAT, "Your order has shipped")
            assert out.lease_token > 0
            # And the conversation shows it, as the operator's turn
            shown = await client.get(
                f"/api/v1/accounts/default/chats/{CHAT}/messages", headers=session.headers()
            )
            assert shown.status_code == 200, shown.text
            kinds = [item["kind"] for item in json_of(shown)["items"]]
            assert kinds[:1] == ["turn"]
    # It is recorded as a turn with no inbound message, naming who sent it from where
    (turn,) = await _agent(bus, TurnCompleted)
    assert turn.reply_ids == [job_id]
    assert turn.inbound_id == ""
    assert turn.origin is not None
    assert (turn.origin.actor, turn.origin.kind, turn.origin.via) == ("olivia", "user", "web")
    assert turn.origin.client == "127.0.0.1"
    # `svc audit explain` names the operator (and the bus fixture's audit must be clean)
    env = processes.env(NATS_URL=nats_server.url)
    explained = await arun_svc("audit", "explain", job_id, env=env)
    assert explained.returncode == 0, explained.stderr
    text = explained.stdout.decode()
    assert "operator send by olivia (user) from 127.0.0.1 via web" in text
    assert "inbound message is not on INBOUND" not in text
    audited = await arun_svc("audit", "--json", env=env)
    assert audited.returncode == 0, audited.stdout.decode() + audited.stderr.decode()
    assert json.loads(audited.stdout)["ok"] is True


async def test_a_send_with_an_idempotency_key_is_one_job_and_bad_sends_are_refused(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    token = await add_token(bus, "crm", "operator")
    web = await start_web(processes, nats_server.url)
    async with SimNetwork(bus, "default") as net, role(bus, "all"):
        await wait_until(lambda: holder_of(bus, "default"), 30, "the account's owner")
        async with web.client() as client:
            headers = {**bearer(token), "Idempotency-Key": "order-42"}
            body = {"chat": CHAT, "text": "shipped"}
            first = await client.post(
                "/api/v1/accounts/default/messages", json=body, headers=headers
            )
            again = await client.post(
                "/api/v1/accounts/default/messages", json=body, headers=headers
            )
            assert first.status_code == again.status_code == 202
            assert json_of(first) == json_of(again)
            await net.wait(lambda: json_of(first)["job_id"] in net.job_ids(), 30, "the send")
            for path, bad, status, code in [
                ("/api/v1/accounts/nobody/messages", body, 404, "unknown_account"),
                (SEND, {"chat": CHAT, "text": " "}, 422, "empty_text"),
                (SEND, {"chat": "a b", "text": "x"}, 422, "invalid_chat"),
                (SEND, {"text": "x"}, 400, "bad_request"),
                ("/api/v1/accounts/bad.name/messages", body, 422, "invalid_account"),
            ]:  # fmt: skip
                refused = await client.post(path, json=bad, headers=bearer(token))
                assert refused.status_code == status, (path, bad, refused.text)
                error = json_of(refused)
                assert error["error"] == code
                assert "\n" not in error["detail"]
    turns = await _agent(bus, TurnCompleted)
    assert len(turns) == 1
    assert turns[0].origin is not None
    assert turns[0].origin.kind == "token"
    assert [s.job_id for s in net.seen].count(json_of(first)["job_id"]) == 1


async def test_an_operator_requeues_a_dead_letter_and_it_reaches_the_transport(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    token = await add_token(bus, "ops", "operator")
    viewer = await add_token(bus, "look", "viewer")
    web = await start_web(processes, nats_server.url)
    original = job("default", CHAT, 1)
    # Given a job dead-lettered by a network that failed every attempt
    async with role(bus, "whatsapp", SIM_FAILURE_RATE="1", DELIVERY_BACKOFF="0.01,0.01"):
        await bus.publish(subjects.outbound("whatsapp", "default", CHAT), original)

        async def dead() -> bool:
            delivery = await read_stream(bus, "DELIVERY")
            return any(isinstance(e, DeliveryDeadLettered) for _, e in delivery)

        await wait_until(dead, 30, "the dead letter")
    async with web.client() as client:
        listed = await client.get("/api/v1/deadletters", headers=bearer(viewer))
        (letter,) = json_of(listed)["items"]
        assert letter["job_id"] == original.job_id
        shown = await client.get(f"/api/v1/deadletters/{letter['seq']}", headers=bearer(viewer))
        assert json_of(shown)["payload"]["text"] == original.text
        missing = await client.get("/api/v1/deadletters/999", headers=bearer(viewer))
        assert (missing.status_code, json_of(missing)["error"]) == (404, "not_found")
        # When the network is fine again and an operator requeues it through the API
        async with SimNetwork(bus, "default") as net, role(bus, "whatsapp"):
            requeued = await client.post(
                f"/api/v1/deadletters/{letter['seq']}/requeue",
                json={"reason": "network back"},
                headers=bearer(token),
            )
            assert requeued.status_code == 200, requeued.text
            # Then it is delivered, as a new job linked to the original
            await net.wait(lambda: len(net.seen) == 1, 30, "the requeued job sent")
        (sent,) = net.seen
        assert sent.text == original.text
        assert sent.job_id != original.job_id
        assert sent.job_id in json_of(requeued)["requeued_as"]
        # A second requeue is a conflict; the letter is no longer open
        again = await client.post(
            f"/api/v1/deadletters/{letter['seq']}/requeue", headers=bearer(token)
        )
        assert (again.status_code, json_of(again)["error"]) == (409, "conflict")
        assert (
            json_of(await client.get("/api/v1/deadletters", headers=bearer(viewer)))["items"] == []
        )
    queued = [e for _, e in await read_stream(bus, "DEADLETTER") if hasattr(e, "actor")]
    assert [e.actor for e in queued] == ["ops"]  # type: ignore[attr-defined]


async def test_a_policy_change_through_the_api_is_what_the_next_turn_sees(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    admin = await add_token(bus, "root", "admin")
    web = await start_web(processes, nats_server.url)
    async with role(bus, "all"), SimUser(bus, "default") as user, web.client() as client:
        await wait_until(lambda: holder_of(bus, "default"), 30, "the account's owner")
        # Given a tool policy and an access mode set through the API
        policy = await client.put(
            "/api/v1/plugins/policy",
            json={"channel": "whatsapp", "account": "default", "deny": ["clock.*"]},
            headers=bearer(admin),
        )
        assert policy.status_code == 200, policy.text
        resolved = await client.get(
            "/api/v1/plugins/resolve?account=default", headers=bearer(admin)
        )
        clock = [r for r in json_of(resolved) if r["tool"].startswith("clock.")]
        assert clock
        assert not any(r["allowed"] for r in clock)
        mode = await client.put(
            "/api/v1/access/mode",
            json={"mode": "allowlist", "account": "default"},
            headers=bearer(admin),
        )
        assert mode.status_code == 200, mode.text
        # When a stranger writes next
        await user.send("stranger@s.whatsapp.net", "hello?")

        async def refused() -> bool:
            return bool(await _agent(bus, MessageRefused))

        await wait_until(refused, 30, "the refusal")
    # Then the next turn saw the new access policy: refused, never reached the model
    (refusal,) = await _agent(bus, MessageRefused)
    assert refusal.sender == "stranger@s.whatsapp.net"
    assert refusal.rule.startswith("access")
    assert not await _agent(bus, TurnCompleted)
