"""Bad input never stops a role (issue 11 items 1, 6, 7): real `svc run` replicas on a
real server; each bad message is dead-lettered, every replica keeps serving, and valid
traffic sent afterwards is answered."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from contracts import subjects
from contracts.codec import encode
from contracts.events import DeadLettered, MessageReceived, SendMessage, new_id
from contracts.payloads import SimInbound
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from tests.conftest import Processes, read_stream, wait_until
from tests.core.test_openai import completion
from tests.e2e.conftest import SimNetwork, consumers_ready, holder_of

pytestmark = pytest.mark.slow

ACCOUNT = "default"
VICTIM = "4915100000001@s.whatsapp.net"
ATTACKER = "4915100000666@s.whatsapp.net"


async def _ready(bus: Bus, *consumers: tuple[str, str]) -> bool:
    return await consumers_ready(bus, *consumers) and await holder_of(bus, ACCOUNT) is not None


async def _letters(bus: Bus) -> list[tuple[str, DeadLettered]]:
    return [(s, e) for s, e in await read_stream(bus, "DEADLETTER") if isinstance(e, DeadLettered)]


def _all_alive(procs: list[subprocess.Popen[bytes]]) -> bool:
    return all(p.poll() is None for p in procs)


async def test_a_4000_character_chat_id_is_dead_lettered_and_both_whatsapp_replicas_serve(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    workers = [processes.start("run", "whatsapp", NATS_URL=url) for _ in range(2)]
    processes.start("run", "core", NATS_URL=url)
    await wait_until(
        lambda: _ready(bus, ("SIM", "sim-in-default"), ("INBOUND", "core")),
        timeout=60,
        what="an owner and the core",
    )
    # Given a sim message whose chat id would make every derived subject pass the
    # server's 4,096-byte control line (it closed each receiver's connection in turn)
    long_chat = "1" * 4000 + "@s.whatsapp.net"
    poison = SimInbound(chat=long_chat, sender=long_chat, text="hi", message_id=new_id())
    await bus.js.publish(subjects.sim_in(ACCOUNT), encode(poison))
    # Then it is dead-lettered from SIM, with the reason in one line
    await wait_until(
        lambda: _letters(bus), timeout=60, what="the long chat id dead-lettered from SIM"
    )
    ((subject, letter),) = await _letters(bus)
    assert (subject, letter.source_stream) == ("deadletter.sim.whatsapp.default.in", "SIM")
    assert "too long: at most 256 characters" in letter.reason
    assert "\n" not in letter.reason
    assert len(letter.reason) < 300
    # And valid messages sent afterwards are answered, with both replicas still running
    async with SimUser(bus, ACCOUNT) as user:
        for i in range(3):
            await user.send(f"49151000000{i}@s.whatsapp.net", f"after {i}")
        assert await user.wait_replies(60), "valid messages after the long id went unanswered"
    assert _all_alive(workers)
    # Every replica can still take over the account: stop the holder, the other answers
    holder = await holder_of(bus, ACCOUNT)
    owner = next(w for w in workers if f"-{w.pid}-" in str(holder))
    processes.stop(owner)
    async with SimUser(bus, ACCOUNT) as user:
        await user.send(VICTIM, "after the handover")
        assert await user.wait_replies(60), "the other replica did not take over and answer"
    assert _all_alive([w for w in workers if w is not owner])


async def test_jobs_naming_another_account_or_no_chat_are_dead_lettered_and_jobs_behind_sent(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    workers = [processes.start("run", "whatsapp", NATS_URL=url) for _ in range(2)]
    await wait_until(
        lambda: _ready(bus, ("OUTBOUND", f"egress-whatsapp-{ACCOUNT}")),
        timeout=60,
        what="an egress owner",
    )

    def job(chat: str, text: str, **overrides: str) -> SendMessage:
        job_id = new_id()
        fields = {"account": ACCOUNT, "chat": chat, **overrides}
        return SendMessage(id=job_id, job_id=job_id, text=text, **fields)  # type: ignore[arg-type]

    # Given, on one chat's queue: a job whose payload names another account (it was sent
    # through this account's session and recorded for the other), a job with no chat and
    # one with an invalid account (their dead-letter hook raised and wedged the chat),
    # then a valid job behind them
    queue = subjects.outbound("whatsapp", ACCOUNT, VICTIM)
    forged = job(VICTIM, "forged", account="acct2")
    no_chat = job("", "no chat")
    bad_account = job(VICTIM, "bad account", account="not valid!")
    behind = job(VICTIM, "behind")
    async with SimNetwork(bus, ACCOUNT) as net:
        for j in (forged, no_chat, bad_account, behind):
            await bus.publish(queue, j)
        # Then the valid job is sent, and none of the bad ones
        await net.wait(lambda: behind.job_id in net.job_ids(), 60, "the job behind them")
        await wait_until(lambda: _count(bus, 3), timeout=30, what="three dead letters")
        assert net.job_ids() == {behind.job_id}
    letters = {letter.job_id: letter for _, letter in await _letters(bus)}
    assert set(letters) == {forged.job_id, no_chat.job_id, bad_account.job_id}
    assert "subject and payload disagree" in letters[forged.job_id].reason
    assert all(not letter.hook_error for letter in letters.values())
    assert _all_alive(workers)


async def _count(bus: Bus, n: int) -> bool:
    return len(await _letters(bus)) >= n


async def test_an_inbound_message_naming_another_chat_is_dead_lettered_by_both_core_replicas(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    processes.start("run", "whatsapp", NATS_URL=url)
    cores = [processes.start("run", "core", NATS_URL=url) for _ in range(2)]
    await wait_until(
        lambda: _ready(bus, ("SIM", "sim-in-default"), ("INBOUND", "core")),
        timeout=60,
        what="an owner and the core",
    )
    async with SimNetwork(bus, ACCOUNT) as net, SimUser(bus, ACCOUNT) as user:
        await user.send(VICTIM, "my secret")
        assert await user.wait_replies(60)
        # Given a forged inbound on the victim's subject whose payload names the attacker
        # (its reply, with the victim's history, went to the attacker)
        forged = MessageReceived(
            account=ACCOUNT, chat=ATTACKER, sender=ATTACKER, message_id=new_id(), text="hi"
        )
        await bus.publish(subjects.inbound("whatsapp", ACCOUNT, VICTIM), forged)
        # and one whose subject carries a chat token far over the bound (its derived
        # subjects would pass the server's control line)
        long_subject = "inbound.whatsapp.default." + "9" * 3990
        await bus.nc.publish(long_subject, encode(forged))
        # Then both are dead-lettered
        await wait_until(lambda: _count(bus, 2), timeout=60, what="two dead letters")
        # And the victim's chat and other chats keep being answered by the replicas
        await user.send(VICTIM, "still there?")
        await user.send(ATTACKER, "hello")
        assert await user.wait_replies(60), "valid messages after the forged ones unanswered"
    assert not [s for s in net.seen if s.chat == ATTACKER and "secret" in s.text]
    assert [s.text for s in net.seen if s.chat == ATTACKER] == ["echo: hello"]
    by_subject = {subject: letter for subject, letter in await _letters(bus)}
    assert set(by_subject) == {
        f"deadletter.{subjects.inbound('whatsapp', ACCOUNT, VICTIM)}",
        "deadletter._invalid.INBOUND",
    }
    assert _all_alive(cores)


class CrashingModel:
    """A stand-in OpenAI endpoint: answers every prompt, except that a prompt holding
    CRASH makes it SIGKILL the core process that asked (the message is then in hand)."""

    def __init__(self) -> None:
        self.core_pid = 0
        self.crashes = 0
        model = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))))
                text = str(body["messages"][-1]["content"])
                if "CRASH" in text:
                    model.crashes += 1
                    os.kill(model.core_pid, signal.SIGKILL)
                    return
                data = json.dumps(completion(f"ok: {text}")).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> CrashingModel:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


async def test_a_message_that_kills_the_core_each_time_is_dead_lettered_across_restarts(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    processes.start("run", "whatsapp", NATS_URL=url)
    with CrashingModel() as model:
        env = {
            "NATS_URL": url,
            "SVC_LLM": "openai",
            "OPENAI_BASE_URL": model.url,
            "OPENAI_API_KEY": "test-key",
            "NO_PROXY": "127.0.0.1,localhost",
            "HTTP_PROXY": "",
            "http_proxy": "",
        }
        core = processes.start("run", "core", **env)
        model.core_pid = core.pid
        await wait_until(
            lambda: _ready(bus, ("SIM", "sim-in-default"), ("INBOUND", "core")),
            timeout=60,
            what="an owner and the core",
        )
        async with SimUser(bus, ACCOUNT) as user:
            # Given a message that kills the core process each time it is in hand, and
            # messages behind it on its chat and on another chat
            await user.send(VICTIM, "CRASH please")
            await user.send(VICTIM, "behind it")
            await user.send(ATTACKER, "another chat")
            # When a supervisor restarts the core after every crash
            restarts = 0
            while not await _letters(bus):
                if core.poll() is not None:
                    assert restarts < 8, "the crashing message was redelivered forever"
                    processes.stop(core)
                    core = processes.start("run", "core", **env)
                    model.core_pid = core.pid
                    restarts += 1
                await wait_until(
                    lambda proc=core: proc.poll() is not None or _letters(bus),
                    timeout=60,
                    what="a crash or a dead letter",
                )
            # Then it is dead-lettered after the delivery limit, and the rest answered
            await wait_until(
                lambda: len([e for e in user.exchanges.values() if e.reply]) == 2,
                timeout=60,
                what="the messages behind the crashing one answered",
            )
    ((_, letter),) = await _letters(bus)
    assert letter.source_stream == "INBOUND"
    # The first crash is not counted (no mark is written for a first delivery): 4 crashes
    assert letter.reason.startswith("delivered 5 times; 3 attempts never ended (limit 3)")
    assert model.crashes == 4
    replies = {e.text: e.reply.text for e in user.exchanges.values() if e.reply}
    assert replies == {"behind it": "ok: behind it", "another chat": "ok: another chat"}
