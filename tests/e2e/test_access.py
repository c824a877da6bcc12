"""Access policy end to end (issue 14 item 1): `svc access` commands, `svc run core` and
`svc run whatsapp` as separate processes on the sim. An allowlisted sender is answered; a
blocked one never reaches the model; an unknown sender under `approval` gets exactly one
waiting reply, is answered after `svc access approve` (its waiting messages too, in
order), and nothing was lost (`svc audit` agrees); replaying ACCESS gives the same rows."""

from __future__ import annotations

import json

import pytest

from contracts import subjects
from contracts.codec import decode
from contracts.events import MessageRefused, TurnCompleted
from contracts.payloads import SimOutbound
from projections.access import AccessView
from services.core.access import catch_up
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.provisioning import missing_streams
from tests.conftest import Processes, arun_svc, read_stream, stream_raw, wait_until
from tests.e2e.conftest import consumers_ready

pytestmark = pytest.mark.slow

ALICE = "15551234567@s.whatsapp.net"
MALLORY = "4477001122@s.whatsapp.net"
STRANGER = "33612345678@s.whatsapp.net"
WAITING = "Thanks! Someone will let you in shortly."


async def svc(processes: Processes, url: str, *args: str) -> str:
    result = await arun_svc(*args, env=processes.env(NATS_URL=url))
    assert result.returncode == 0, result.stderr.decode()
    return str(result.stdout.decode())


async def refusals(bus: Bus) -> list[MessageRefused]:
    return [e for _, e in await read_stream(bus, "AGENT") if isinstance(e, MessageRefused)]


async def test_who_may_talk_to_the_agent_across_separate_processes(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    # Given the account under approval, alice allowlisted and mallory blocked (by CLI)
    await svc(processes, url, "access", "mode", "approval", "--account", "default")
    await svc(processes, url, "access", "allow", "1555*", "--account", "default")
    await svc(processes, url, "access", "block", MALLORY)  # channel-wide
    # And the core and the sim owner in their own processes
    core = processes.start("run", "core", NATS_URL=url, SVC_ACCESS_WAITING_TEXT=WAITING)
    whatsapp = processes.start("run", "whatsapp", NATS_URL=url)
    await wait_until(lambda: consumers_ready(bus), 60, "core and owner up")
    logs = lambda: processes.log(core) + processes.log(whatsapp)  # noqa: E731

    async with SimUser(bus, "default") as user:
        # When alice writes: she is answered
        hello = await user.send(ALICE, "hello")
        assert await user.wait_replies(30, exchange=hello), logs()
        assert hello.reply is not None
        assert hello.reply.text == "echo: hello"

        # When mallory writes: refused by the block, never answered
        await user.send(MALLORY, "let me in")
        await wait_until(lambda: _refused(bus, MALLORY, 1), 30, "mallory's refusal recorded")

        # When a stranger writes twice: one waiting reply, both pending
        one = await user.send(STRANGER, "one")
        two = await user.send(STRANGER, "two")
        await wait_until(lambda: _refused(bus, STRANGER, 2), 30, "the stranger's 2 refusals")
        await wait_until(lambda: _sent_to(user, STRANGER, 1), 30, "the waiting reply")
        pending = json.loads(await svc(processes, url, "access", "pending", "--json"))
        assert [(p["account"], p["jid"], p["messages"]) for p in pending] == [
            ("default", STRANGER, 2)
        ]

        # When the operator approves the stranger, who then writes again
        out = await svc(processes, url, "access", "approve", STRANGER, "--account", "default")
        assert "2 waiting message(s)" in out
        three = await user.send(STRANGER, "three")
        assert await user.wait_replies(30, exchange=three), logs()

        # Then the waiting messages were answered in order, before the new one, and the
        # waiting reply went out exactly once
        await wait_until(lambda: _sent_to(user, STRANGER, 4), 30, "4 sends to the stranger")
        texts = [s.text for s in await _recorded_to(user, STRANGER)]
        assert texts == [WAITING, "echo: one", "echo: two", "echo: three"]
        assert one.reply is None  # answered as a released copy, not the refused original
        assert two.reply is None

    # And mallory never reached the model: a refusal with the block rule, no turn, no send
    (blocked,) = [r for r in await refusals(bus) if r.sender == MALLORY]
    assert blocked.rule == "access:block"
    assert MALLORY in blocked.detail
    turns = [e for _, e in await read_stream(bus, "AGENT") if isinstance(e, TurnCompleted)]
    assert MALLORY not in {t.chat for t in turns}
    assert await _recorded_to(user, MALLORY) == []
    assert [r.rule for r in await refusals(bus) if r.sender == STRANGER] == [
        "access:approval",
        "access:approval",
    ]

    # And nothing was lost: every MessageReceived has exactly one outcome (svc audit)
    audit = await arun_svc("audit", "--json", env=processes.env(NATS_URL=url))
    assert audit.returncode == 0, audit.stdout.decode() + audit.stderr.decode()
    # (and its replay rule folded ACCESS twice to the same rows)
    replay = json.loads(audit.stdout)["rules"]["replay"]
    assert replay["ok"]
    assert replay["checked"]["ACCESS events"] >= 6

    # And a replay of ACCESS gives the same rows, every time, as `svc access ls` shows
    listed = json.loads(await svc(processes, url, "access", "ls", "--json"))
    again = json.loads(await svc(processes, url, "access", "ls", "--json"))
    replayed = AccessView()
    await catch_up(bus, replayed)
    assert listed == again == {"position": replayed.position, **replayed.rows()}
    assert listed["pending"] == []
    assert [a["jid"] for a in listed["approved"]] == [STRANGER]
    assert processes.stop(whatsapp) == 0, processes.log(whatsapp)
    assert processes.stop(core) == 0, processes.log(core)


async def _refused(bus: Bus, sender: str, count: int) -> bool:
    return len([r for r in await refusals(bus) if r.sender == sender]) >= count


async def _recorded_to(user: SimUser, chat: str) -> list[SimOutbound]:
    """What the sim network accepted for `chat`, in its stored order."""
    return [
        s
        for s in (
            decode(data, SimOutbound)
            for subject, data, _ in await stream_raw(user.bus, "SIM_OUT")
            if subject == subjects.sim_out(user.account)
        )
        if s.chat == chat
    ]


async def _sent_to(user: SimUser, chat: str, count: int) -> bool:
    return len(await _recorded_to(user, chat)) >= count


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (
            ("mode", "sometimes"),
            "mode 'sometimes' is invalid: use one of open, allowlist, approval",
        ),
        (("allow", "alice smith"), "pattern 'alice smith' is invalid"),
        (("block", "x", "--account", "no.dots"), "account 'no.dots' is invalid"),
        (("allow", "x", "--account", "_"), "account '_' is reserved"),
        (("unblock", "nobody@s.whatsapp.net"), "no block pattern 'nobody@s.whatsapp.net'"),
        (("approve", "bad jid", "--account", "default"), "JID 'bad jid' is invalid"),
    ],
)
async def test_bad_access_input_gets_one_line_and_records_nothing(
    processes: Processes, served: tuple[str, Bus], args: tuple[str, ...], says: str
) -> None:
    url, bus = served
    # When an operator gets a command wrong
    result = await arun_svc("access", *args, env=processes.env(NATS_URL=url))
    # Then it exits 2 with one line saying what was wrong, and nothing was recorded
    err = result.stderr.decode().strip()
    assert result.returncode == 2, err
    assert len(err.splitlines()) == 1, err
    assert says in err
    if not await missing_streams(bus.js, ["ACCESS"]):  # (a write provisions streams first)
        assert [e for _, e in await read_stream(bus, "ACCESS")] == []
