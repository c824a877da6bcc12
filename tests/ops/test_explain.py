"""`svc audit explain` and `svc replay conversation` against the whole system running in
process on a real nats-server: the causal chain of a sent and of a dead-lettered job
(policy as of the turn, lease proof, receipts, requeues), a chat's transcript in order,
and one-line errors on bad input."""

from __future__ import annotations

from typing import Any

import msgspec

from contracts import subjects
from contracts.events import (
    AnyMessage,
    DeadLettered,
    DeadLetterRequeued,
    DeliveryDeadLettered,
    DeliveryFailed,
    DeliveryReceipt,
    FactRemembered,
    LeaseAcquired,
    MessageReceived,
    MessageSent,
    PluginInstalled,
    Scope,
    ToolPolicySet,
    TurnCompleted,
)
from projections.transcript import chain_lines, transcript_lines
from services.ops.dlq import letters, requeue
from services.ops.explain import conversation, explain
from services.ops.simclient import SimUser, first_reply_job_id
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, arun_svc, read_stream, role, run_svc, wait_until

WHATSAPP = Scope(channel="whatsapp")
# Receipts for every send; replies quote the message they answer (1:1 chats too), so a
# chain shows the quote it was sent with.
RECEIPTS = {"SIM_AUTO_RECEIPTS": "1", "SVC_QUOTE_REPLIES": "always"}


async def _delivery(bus: Bus, kind: type[Any], job_id: str | None = None) -> list[AnyMessage]:
    return [
        e
        for _, e in await read_stream(bus, "DELIVERY")
        if isinstance(e, kind) and (job_id is None or getattr(e, "job_id", None) == job_id)
    ]


async def _policy(bus: Bus, deny: list[str]) -> int:
    ack = await bus.publish(
        subjects.PLUGIN_POLICY_SUBJECT, ToolPolicySet(scope=WHATSAPP, deny=deny, actor="test")
    )
    return int(ack.seq)


async def _exchange(bus: Bus, user: SimUser, chat: str, text: str) -> str:
    """Send one message, wait for its reply and the reply's receipt; its job id."""
    asked = await user.send(chat, text)
    assert await user.wait_replies(20), f"no reply to {text!r}"
    job_id = first_reply_job_id("default", asked.message_id)

    async def receipted() -> bool:
        return bool(await _delivery(bus, DeliveryReceipt, job_id))

    await wait_until(receipted, what=f"the receipt of the reply to {text!r}")
    return job_id


async def test_explain_shows_the_whole_chain_of_a_sent_job_with_the_policy_of_its_turn(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    # Given a channel policy denying clock.* before the turn
    before = await _policy(bus, ["clock.*"])
    text = '!tool calculator.evaluate {"expression": "6*7"}'
    async with role(bus, "all", **RECEIPTS), SimUser(bus, "default") as user:
        job_id = await _exchange(bus, user, "bo@s.whatsapp.net", text)
    # ... and a policy replacing it after the turn (deny calculator.*, allow clock again)
    after = await _policy(bus, ["calculator.*"])

    # When the job is explained
    chain = await explain(bus, job_id)

    # Then every link is there: inbound -> turn -> policy -> job -> sent + lease -> receipt
    assert chain.outcome == "sent"
    assert chain.inbound is not None
    assert chain.turn is not None
    inbound, turn = chain.inbound.event, chain.turn.event
    assert isinstance(inbound, MessageReceived)
    assert isinstance(turn, TurnCompleted)
    assert (inbound.chat, inbound.text, chain.inbound.stream) == (
        "bo@s.whatsapp.net",
        text,
        "INBOUND",
    )
    assert turn.inbound_id == inbound.id
    assert job_id in turn.reply_ids
    assert turn.model == "echo"
    (call,) = turn.tools_called
    assert (call.name, call.arguments, call.error) == (
        "calculator.evaluate",
        {"expression": "6*7"},
        None,
    )
    # the policy is the one in force at the turn, not the current one
    assert chain.policy is not None
    assert before <= chain.policy.plugins_seq < after
    assert chain.policy.basis == "projection"
    then = {d.tool: d.allowed for d in chain.policy.decisions}
    assert then["clock.now"] is False
    assert then["calculator.evaluate"] is True
    now = {d.tool: d.allowed for d in chain.policy.changed_since}
    assert now == {"clock.now": True, "calculator.evaluate": False}
    # the job, its send and the lease that granted the send's token
    assert (chain.job.job_id, chain.job.chat) == (job_id, "bo@s.whatsapp.net")
    assert chain.job.text == "echo: calculator.evaluate -> 42"
    assert chain.job.reply_to == inbound.message_id
    assert chain.job.job_seq > 0
    assert (chain.job.part, chain.job.parts) == (1, 1)
    (sent_step,) = chain.sent
    sent = sent_step.event
    assert isinstance(sent, MessageSent)
    assert sent.job_seq == chain.job.job_seq
    assert sent.sent_at is not None
    assert chain.lease is not None
    assert chain.lease.stream == "ACCOUNTS"
    lease = chain.lease.event
    assert isinstance(lease, LeaseAcquired)
    assert (lease.holder, lease.token) == (sent.holder, sent.lease_token)
    assert lease.at <= sent.sent_at
    (receipt,) = chain.receipts
    assert isinstance(receipt.event, DeliveryReceipt)
    assert receipt.event.status == "delivered"
    assert chain.dead_lettered is None
    assert chain.letter is None
    assert chain.notes == []

    # And the CLI prints the same chain, as lines and as JSON
    env = processes.env(NATS_URL=nats_server.url)
    shown = await arun_svc("audit", "explain", job_id, env=env)
    assert shown.returncode == 0, shown.stderr
    out = shown.stdout.decode()
    assert out == "\n".join(chain_lines(chain)) + "\n"
    assert "DENY  clock.now" in out
    assert "since changed: calculator.evaluate is now DENIED" in out
    assert f"LeaseAcquired by {sent.holder}, token {sent.lease_token}" in out
    # A unique prefix of the job id names the same job (issue 11 item 18)
    abbreviated = await arun_svc("audit", "explain", job_id[:8], env=env)
    assert abbreviated.returncode == 0, abbreviated.stderr
    assert abbreviated.stdout.decode() == out
    as_json = await arun_svc("audit", "explain", job_id, "--json", env=env)
    assert as_json.returncode == 0, as_json.stderr
    doc = msgspec.json.decode(as_json.stdout)
    assert doc["outcome"] == "sent"
    assert doc["inbound"]["event"]["type"] == "MessageReceived"
    assert doc["turn"]["stream"] == "AGENT"
    assert doc["turn"]["seq"] == chain.turn.seq
    assert doc["sent"][0]["event"]["lease_token"] == sent.lease_token
    assert doc["lease"]["event"]["type"] == "LeaseAcquired"


async def test_a_dead_lettered_job_and_its_requeue_explain_to_the_dead_letters(
    bus: Bus,
) -> None:
    chat = "gone@s.whatsapp.net"
    async with role(bus, "all", SIM_FAILING_CHATS=chat), SimUser(bus, "default") as user:
        asked = await user.send(chat, "anyone there?")
        job_id = first_reply_job_id("default", asked.message_id)

        async def dead(n: int) -> bool:
            return len(await _delivery(bus, DeliveryDeadLettered)) >= n

        await wait_until(lambda: dead(1), what="the job dead-lettered")
        (letter_seq,) = await letters(bus)
        # an operator requeues it; the chat still fails, so it is dead-lettered again
        await requeue(bus, letter_seq, actor="tester", reason="try again")
        await wait_until(lambda: dead(2), what="the requeued job dead-lettered")

    chain = await explain(bus, job_id)
    assert chain.outcome == "dead-lettered"
    assert chain.sent == []
    assert chain.lease is None
    assert chain.turn is not None
    assert chain.inbound is not None
    (attempt,) = chain.attempts
    assert isinstance(attempt.event, DeliveryFailed)
    assert attempt.event.permanent
    assert chain.dead_lettered is not None
    assert isinstance(chain.dead_lettered.event, DeliveryDeadLettered)
    assert chain.dead_lettered.event.job_seq == chain.job.job_seq > 0
    assert chain.letter is not None
    assert chain.letter.seq == letter_seq
    letter = chain.letter.event
    assert isinstance(letter, DeadLettered)
    assert [e.attempt for e in letter.errors] == [1]
    assert f"{chat} is not on WhatsApp" in letter.errors[0].error
    (requeued,) = chain.requeued_as
    assert isinstance(requeued.event, DeadLetterRequeued)
    new_job_id = requeued.event.new_job_id
    assert new_job_id is not None
    lines = "\n".join(chain_lines(chain))
    assert "-> DEAD-LETTERED" in lines
    assert "is not on WhatsApp" in lines

    # The requeued job explains back to the original
    again = await explain(bus, new_job_id)
    assert again.outcome == "dead-lettered"
    assert again.job.requeued_from == job_id
    assert again.requeued_by is not None
    assert again.requeued_by.seq == requeued.seq
    assert again.original is not None
    assert again.original.job.job_id == job_id
    assert again.original.outcome == "dead-lettered"
    assert again.job.text == chain.job.text == "echo: anyone there?"


async def test_a_conversation_of_three_exchanges_is_in_order_with_turns_sends_receipts(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    chat = "ana@s.whatsapp.net"
    await bus.publish(subjects.plugins("memory"), PluginInstalled(name="memory", version="1.0.0"))
    texts = ["hello", '!tool memory.remember {"key": "name", "value": "Ana"}', "bye"]
    async with role(bus, "all", **RECEIPTS), SimUser(bus, "default") as user:
        jobs = [await _exchange(bus, user, chat, t) for t in texts]
        await user.send("someone-else@s.whatsapp.net", "not in Ana's transcript")
        assert await user.wait_replies(20)

    entries = await conversation(bus, "whatsapp", "default", chat)

    exchange = ["inbound", "turn", "sent", "receipt"]
    assert [e.kind for e in entries] == [
        *exchange,
        "inbound",
        "fact_remembered",
        *exchange[1:],
        *exchange,
    ]
    received = [e.event.text for e in entries if isinstance(e.event, MessageReceived)]
    assert received == texts
    sent = [e.event for e in entries if isinstance(e.event, MessageSent)]
    assert [s.job_id for s in sent] == jobs
    assert [s.text for s in sent] == [
        "echo: hello",
        "echo: memory.remember -> remembered name",
        "echo: bye",
    ]
    (fact,) = [e.event for e in entries if isinstance(e.event, FactRemembered)]
    assert (fact.key, fact.value) == ("name", "Ana")
    assert all(e.stream and e.seq > 0 for e in entries)

    env = processes.env(NATS_URL=nats_server.url)
    human = await arun_svc(
        "replay", "conversation", "--account", "default", "--chat", chat, env=env
    )
    assert human.returncode == 0, human.stderr
    out = human.stdout.decode()
    assert out.splitlines()[1:] == transcript_lines(entries)
    assert "user > hello" in out
    assert "bot  < echo: hello   [sent by " in out
    assert "receipt delivered" in out
    assert "memory: remember name = Ana" in out
    assert "turn (echo, 1 tool: memory.remember" in out
    as_json = await arun_svc(
        "replay", "conversation", "--account", "default", "--chat", chat, "--json", env=env
    )
    assert as_json.returncode == 0, as_json.stderr
    doc = msgspec.json.decode(as_json.stdout)
    assert [d["kind"] for d in doc] == [e.kind for e in entries]
    assert {"kind", "at", "stream", "seq", "event"} <= set(doc[0])
    assert doc[0]["event"]["type"] == "MessageReceived"
    assert doc[0]["stream"] == "INBOUND"
    # the chat token as `nats stream view` shows it names the same chat
    token = subjects.encode_chat(chat)
    by_token = await arun_svc(
        "replay", "conversation", "--account", "default", "--chat", token, "--json", env=env
    )
    assert msgspec.json.decode(by_token.stdout) == doc


async def test_bad_input_gets_one_line_and_the_right_exit_code(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    env = processes.env(NATS_URL=nats_server.url)
    unknown = run_svc("audit", "explain", "0123456789abcdef", env=env)
    assert unknown.returncode == 1
    assert unknown.stderr.decode().splitlines() == [
        "svc: no job 0123456789abcdef: not on DELIVERY, OUTBOUND or DEADLETTER,"
        " and no turn lists it among its replies"
    ]
    malformed = run_svc("audit", "explain", "not a job", env=env)
    assert malformed.returncode == 2
    assert len(malformed.stderr.decode().splitlines()) == 1
    bad_account = run_svc("replay", "conversation", "--account", "no!", "--chat", "a@b", env=env)
    assert bad_account.returncode == 2
    assert bad_account.stderr.decode().splitlines() == [
        "svc: account 'no!' is invalid: use 1-64 of A-Z a-z 0-9 _ -"
    ]
    bad_chat = run_svc("replay", "conversation", "--account", "default", "--chat", "", env=env)
    assert bad_chat.returncode == 2
    assert len(bad_chat.stderr.decode().splitlines()) == 1
    nothing = run_svc(
        "replay", "conversation", "--account", "default", "--chat", "x@s.whatsapp.net", env=env
    )
    assert nothing.returncode == 0, nothing.stderr
    assert nothing.stdout.decode() == "no events for whatsapp/default chat x@s.whatsapp.net\n"


async def test_records_made_before_the_audit_fields_explain_with_defaults(bus: Bus) -> None:
    # Given a turn and a send recorded before plugins_seq / text / job_seq / sent_at existed
    chat = "old@s.whatsapp.net"
    inbound = MessageReceived(account="default", chat=chat, sender=chat, message_id="m1", text="hi")
    turn = TurnCompleted(
        account="default", chat=chat, inbound_id=inbound.id, model="echo", reply_ids=["j1"]
    )
    sent = MessageSent(
        job_id="j1",
        account="default",
        chat=chat,
        holder="h1",
        lease_token=7,
        transport_message_id="sim-1",
    )
    await bus.publish(subjects.inbound("whatsapp", "default", chat), inbound)
    await bus.publish(subjects.agent("whatsapp", "default", chat), turn)
    await bus.publish(subjects.delivery("whatsapp", "default", chat), sent)
    # a policy recorded since must not count as the turn's
    await _policy(bus, ["calculator.*"])

    chain = await explain(bus, "j1")

    assert chain.outcome == "sent"
    assert chain.job.text is None
    assert chain.job.job_seq == 0
    assert chain.job.reply_to == "m1"  # the first reply answers the message
    assert chain.policy is not None
    assert chain.policy.basis == "defaults"
    assert {d.tool: d.allowed for d in chain.policy.decisions}["calculator.evaluate"] is True
    assert chain.lease is None
    assert chain.notes == [
        "no LeaseAcquired for holder h1 token 7 on ACCOUNTS:"
        " the token was never recorded as granted"
    ]
    lines = "\n".join(chain_lines(chain))
    assert "(text not recorded)" in lines
    assert "plugin defaults" in lines
    (bot,) = [e for e in await conversation(bus, "whatsapp", "default", chat) if e.kind == "sent"]
    assert "bot  < (text not recorded)" in transcript_lines([bot])[1]
