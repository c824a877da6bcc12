"""Operator actions from the console (issue 18, slice ops), through a real `svc run web`
and real roles with the sim: every form posts with the session cookie and its CSRF token
to a page route that calls the same function as its /api/v1/ endpoint, and answers 303
back to the page with a one-line result; a viewer sees the pages without the forms and is
refused (403) if it posts anyway; a post without the CSRF token is refused (403)."""

from __future__ import annotations

import re
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest

from contracts import subjects
from contracts.events import (
    AccountResumed,
    DeadLetterDropped,
    DeadLetterRequeued,
    DeliveryDeadLettered,
    LeaseReleased,
    TurnCompleted,
)
from contracts.payloads import AttemptError, SendRecord
from services.channel.ledger import SendLedger
from services.runtime.bus import Bus
from services.runtime.lease import Lease
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, read_stream, role, wait_until
from tests.e2e.conftest import SimNetwork, holder_of, job
from tests.web.conftest import Session, Web, add_token, add_user, bearer, json_of, login, start_web

pytestmark = pytest.mark.slow

CHAT = "alice@s.whatsapp.net"


def cookie(session: Session) -> dict[str, str]:
    """A browser's GET: the session cookie only."""
    return session.headers(csrf=False)


async def submit(
    client: httpx.AsyncClient,
    session: Session,
    path: str,
    fields: dict[str, str] | None = None,
    *,
    csrf: bool = True,
) -> httpx.Response:
    """Post a console form as the browser does (urlencoded, the CSRF token as a field)."""
    data = {"csrf": session.csrf, **(fields or {})} if csrf else dict(fields or {})
    return await client.post(path, data=data, headers=cookie(session))


async def result_of(client: httpx.AsyncClient, session: Session, answer: httpx.Response) -> str:
    """Follow a form's 303 and return the one-line result the page shows."""
    assert answer.status_code == 303, answer.text
    page = await client.get(answer.headers["location"], headers=cookie(session))
    assert page.status_code == 200, page.text
    found = re.search(r'<p class="flash (ok|error)" role="\w+">([^<]*)</p>', page.text)
    assert found is not None, page.text
    return f"{found.group(1)}: {found.group(2)}"


def assert_refused(answer: httpx.Response, words: str) -> None:
    assert answer.status_code == 403, answer.text
    assert words in answer.text
    assert "\n" not in answer.text.strip()


async def _events(bus: Bus, stream: str, kind: type) -> list:  # type: ignore[type-arg]
    return [e for _, e in await read_stream(bus, stream) if isinstance(e, kind)]


async def _pages(web: Web, bus: Bus) -> tuple[Session, Session]:
    await add_user(bus, "olga", "operator")
    await add_user(bus, "vera", "viewer")
    return await login(web, "olga"), await login(web, "vera")


async def test_accounts_page_send_handover_and_resume_forms(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    web = await start_web(processes, nats_server.url)
    olga, vera = await _pages(web, bus)
    async with SimNetwork(bus, "default") as net, role(bus, "all"), web.client() as client:
        await wait_until(lambda: holder_of(bus, "default"), 30, "the account's owner")
        holder = await holder_of(bus, "default")
        assert holder is not None
        # A viewer sees the account, its holder and token, but no operator form
        seen = await client.get("/accounts", headers=cookie(vera))
        assert seen.status_code == 200, seen.text
        assert holder in seen.text
        for form in ("/handover", "/send", "/resume", "/pair"):
            assert f'/accounts/default{form}"' not in seen.text
        # ... and is refused (403, one line) if it posts one anyway, with a valid CSRF token
        refused = await submit(client, vera, "/accounts/default/send", {"chat": CHAT, "text": "x"})
        assert_refused(refused, "this needs the operator role")
        # An operator gets the forms and the pair link
        shown = await client.get("/accounts", headers=cookie(olga))
        for form in ("/handover", "/send", "/pair"):
            assert f'/accounts/default{form}"' in shown.text
        key = re.search(r'name="key" value="([^"]+)"', shown.text)
        assert key is not None
        # ... a post without the CSRF token is refused
        no_csrf = await submit(
            client, olga, "/accounts/default/send", {"chat": CHAT, "text": "x"}, csrf=False
        )
        assert_refused(no_csrf, "CSRF")
        # When the operator sends from the form
        fields = {"chat": CHAT, "text": "Your order has shipped", "key": key.group(1)}
        sent = await submit(client, olga, "/accounts/default/send", fields)
        line = await result_of(client, olga, sent)
        found = re.fullmatch(rf"ok: Queued job (\S+) to {CHAT} from default\.", line)
        assert found is not None, line
        job_id = found.group(1)
        # Then the sim delivers it, and a resubmitted form (same key) is the same job
        again = await submit(client, olga, "/accounts/default/send", fields)
        assert job_id in await result_of(client, olga, again)
        await net.wait(lambda: job_id in net.job_ids(), 30, "the operator's send")
        assert [s.text for s in net.seen if s.job_id == job_id] == ["Your order has shipped"]
        # A bad send is one error line on the page, nothing queued
        bad = await submit(client, olga, "/accounts/default/send", {"chat": CHAT, "text": " "})
        assert await result_of(client, olga, bad) == "error: text is empty"
        # Resume of an account that is not parked: the ops function's own one line
        resumed = await submit(client, olga, "/accounts/default/resume", {"reason": "test"})
        assert await result_of(client, olga, resumed) == (
            f"error: account &#x27;default&#x27; is not parked: {holder} holds it"
        )
        # Handover: the owner releases the lease (a worker takes the account again)
        handed = await submit(client, olga, "/accounts/default/handover")
        assert (await result_of(client, olga, handed)).startswith(
            f"ok: default: {holder} (token"
        ), "handover"
        assert await _events(bus, "ACCOUNTS", LeaseReleased)
    # The send is an operator-originated turn naming who and from where
    turns = [t for t in await _events(bus, "AGENT", TurnCompleted) if job_id in t.reply_ids]
    assert len(turns) == 1
    assert turns[0].origin is not None
    assert (turns[0].origin.actor, turns[0].origin.via, turns[0].origin.client) == (
        "olga",
        "web",
        "127.0.0.1",
    )


async def test_a_parked_account_is_resumed_from_the_accounts_page(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    web = await start_web(processes, nats_server.url)
    olga, vera = await _pages(web, bus)
    # Given an account parked by its owner (its session needs pairing)
    lease = Lease(bus, "whatsapp", "parked1", "holder-1", 30)
    assert await lease.try_acquire()
    assert await lease.park("needs_pairing")
    async with web.client() as client:
        # The page shows why, and offers an operator Resume (no handover: nobody runs it)
        shown = await client.get("/accounts", headers=cookie(olga))
        assert "needs_pairing" in shown.text
        assert 'action="/accounts/parked1/resume"' in shown.text
        assert 'action="/accounts/parked1/handover"' not in shown.text
        looked = await client.get("/accounts", headers=cookie(vera))
        assert "needs_pairing" in looked.text
        assert "/resume" not in looked.text
        refused = await submit(client, vera, "/accounts/parked1/resume", {"reason": "x"})
        assert_refused(refused, "this needs the operator role")
        # When the operator resumes it
        done = await submit(client, olga, "/accounts/parked1/resume", {"reason": "re-paired"})
        assert await result_of(client, olga, done) == (
            "ok: parked1 resumed (was parked: needs_pairing); a worker takes it over."
        )
        # Then the park is gone, and it is recorded with who, why and from where
        again = await client.get("/accounts", headers=cookie(olga))
        assert "needs_pairing" not in again.text
    (resumed,) = await _events(bus, "ACCOUNTS", AccountResumed)
    assert (resumed.account, resumed.actor, resumed.reason, resumed.client, resumed.via) == (
        "parked1",
        "olga",
        "re-paired",
        "127.0.0.1",
        "web",
    )


async def test_a_flash_not_signed_by_the_session_is_not_shown(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    web = await start_web(processes, nats_server.url)
    olga, vera = await _pages(web, bus)
    async with web.client() as client:
        forged = "/deadletters?flash=Call+support+at+555&kind=ok&sig=00"
        page = await client.get(forged, headers=cookie(olga))
        assert page.status_code == 200
        assert "555" not in page.text
        # A result signed for one session is not shown to another
        answer = await submit(client, olga, "/deadletters/999/drop", {"reason": "x"})
        assert "no dead letter" in await result_of(client, olga, answer)
        other = await client.get(answer.headers["location"], headers=cookie(vera))
        assert "no dead letter" not in other.text
        # The error came back as an error line
        query = parse_qs(urlsplit(answer.headers["location"]).query)
        assert query["kind"] == ["error"]


async def test_dead_letter_list_show_requeue_and_drop_forms(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    web = await start_web(processes, nats_server.url)
    olga, vera = await _pages(web, bus)
    first, second = job("default", CHAT, 1), job("default", CHAT, 2)
    # Given two jobs dead-lettered by a network that fails every attempt
    async with role(bus, "whatsapp", SIM_FAILURE_RATE="1", DELIVERY_BACKOFF="0.01,0.01"):
        for j in (first, second):
            await bus.publish(subjects.outbound("whatsapp", "default", CHAT), j)

        async def dead() -> bool:
            return len(await _events(bus, "DELIVERY", DeliveryDeadLettered)) == 2

        await wait_until(dead, 60, "two dead letters")
    async with web.client() as client:
        # The list (a page at a time) and one letter's details, for a viewer, no forms
        listed = await client.get("/deadletters?limit=1", headers=cookie(vera))
        assert listed.status_code == 200, listed.text
        assert first.job_id in listed.text
        assert second.job_id not in listed.text
        assert "Next page" in listed.text
        assert 'href="/outbound"' in listed.text
        assert "/requeue" not in listed.text
        seqs = [int(s) for s in re.findall(r'href="/deadletters/(\d+)"', listed.text)]
        (seq,) = seqs
        shown = await client.get(f"/deadletters/{seq}", headers=cookie(vera))
        assert shown.status_code == 200, shown.text
        assert first.text in shown.text  # the job
        assert "sim: injected transient failure" in shown.text  # every attempt's error
        assert "/requeue" not in shown.text
        missing = await client.get("/deadletters/999", headers=cookie(vera))
        assert missing.status_code == 404
        assert "no dead letter" in missing.text
        refused = await submit(client, vera, f"/deadletters/{seq}/requeue", {"reason": "x"})
        assert_refused(refused, "this needs the operator role")
        refused = await submit(client, vera, f"/deadletters/{seq}/drop", {"reason": "x"})
        assert_refused(refused, "this needs the operator role")
        # An operator sees the forms; without the CSRF token the post is refused
        operator_view = await client.get(f"/deadletters/{seq}", headers=cookie(olga))
        assert f'action="/deadletters/{seq}/requeue"' in operator_view.text
        no_csrf = await submit(client, olga, f"/deadletters/{seq}/requeue", csrf=False)
        assert_refused(no_csrf, "CSRF")
        # Drop needs a reason: one error line, nothing recorded
        why = await submit(client, olga, f"/deadletters/{seq}/drop", {"back": "letter"})
        assert await result_of(client, olga, why) == (
            "error: say why the dead letter is dropped (reason)"
        )
        assert why.headers["location"].startswith(f"/deadletters/{seq}?")
        # When the network is fine again and the operator requeues the first from its page
        async with SimNetwork(bus, "default") as net, role(bus, "whatsapp"):
            requeued = await submit(
                client, olga, f"/deadletters/{seq}/requeue", {"reason": "network back"}
            )
            line = await result_of(client, olga, requeued)
            assert line.startswith(f"ok: Dead letter {seq} requeued as job "), line
            await net.wait(lambda: len(net.seen) == 1, 30, "the requeued job sent")
        assert net.seen[0].text == first.text
        # ... and drops the second from the list
        others = await client.get("/deadletters", headers=cookie(olga))
        (other,) = [int(s) for s in re.findall(r'href="/deadletters/(\d+)"', others.text)]
        dropped = await submit(client, olga, f"/deadletters/{other}/drop", {"reason": "stale"})
        assert await result_of(client, olga, dropped) == f"ok: Dead letter {other} dropped."
        # Then nothing is open; the letter's page says what was done, by whom
        empty = await client.get("/deadletters", headers=cookie(vera))
        assert "No open dead letters." in empty.text
        done = await client.get(f"/deadletters/{seq}", headers=cookie(vera))
        assert "requeued" in done.text
        assert "network back" in done.text
        twice = await submit(client, olga, f"/deadletters/{seq}/requeue")
        assert "is already requeued" in await result_of(client, olga, twice)
    requeues = await _events(bus, "DEADLETTER", DeadLetterRequeued)
    drops = await _events(bus, "DEADLETTER", DeadLetterDropped)
    # Recorded with who, why and from where
    assert [(e.letter_seq, e.actor, e.reason, e.client, e.via) for e in requeues] == [
        (seq, "olga", "network back", "127.0.0.1", "web")
    ]
    assert [(e.letter_seq, e.actor, e.reason, e.client, e.via) for e in drops] == [
        (other, "olga", "stale", "127.0.0.1", "web")
    ]


async def test_outbound_lists_queued_jobs_per_chat_with_their_send_state(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    web = await start_web(processes, nats_server.url)
    _, vera = await _pages(web, bus)
    viewer = await add_token(bus, "look", "viewer")
    # Given jobs queued while no owner runs, one of them already tried once
    jobs = [job("default", f"c{n % 2}@s.whatsapp.net", n) for n in range(4)]
    for j in jobs:
        await bus.publish(subjects.outbound("whatsapp", "default", j.chat), j)
    tried = SendRecord(
        job_id=jobs[1].job_id,
        state="failed",
        attempt=1,
        holder="h-1",
        lease_token=7,
        errors=[AttemptError(attempt=1, error="network down")],
    )
    await SendLedger(bus, "default").put(tried)
    async with web.client() as client:
        # The API lists them by chat, in send order, with their state; a page at a time
        listed = await client.get("/api/v1/outbound", headers=bearer(viewer))
        assert listed.status_code == 200, listed.text
        items = json_of(listed)["items"]
        assert [i["job_id"] for i in items] == [jobs[n].job_id for n in (0, 2, 1, 3)]
        states = {i["job_id"]: (i["send_state"], i["attempt"], i["last_error"]) for i in items}
        assert states[jobs[1].job_id] == ("failed", 1, "network down")
        assert states[jobs[0].job_id] == ("queued", 0, "")
        first = json_of(await client.get("/api/v1/outbound?limit=3", headers=bearer(viewer)))
        assert len(first["items"]) == 3
        rest = await client.get(
            f"/api/v1/outbound?limit=3&cursor={first['next_cursor']}", headers=bearer(viewer)
        )
        assert [i["job_id"] for i in json_of(rest)["items"]] == [jobs[3].job_id]
        other = json_of(await client.get("/api/v1/outbound?account=other", headers=bearer(viewer)))
        assert other["items"] == []
        bad = await client.get("/api/v1/outbound?account=a.b", headers=bearer(viewer))
        assert (bad.status_code, json_of(bad)["error"]) == (422, "invalid_account")
        # The page shows the same, per chat, for a viewer
        page = await client.get("/outbound", headers=cookie(vera))
        assert page.status_code == 200, page.text
        assert "network down" in page.text
        assert page.text.count("c0@s.whatsapp.net") >= 3  # its summary row and two jobs
        assert 'href="/deadletters"' in page.text
    # When an owner runs, the queue drains and the page says so
    async with SimNetwork(bus, "default") as net, role(bus, "whatsapp"):
        await net.wait(lambda: len(net.job_ids()) == 4, 30, "every queued job sent")
    async with web.client() as client:
        drained = await client.get("/outbound", headers=cookie(vera))
        assert "Nothing is queued." in drained.text
