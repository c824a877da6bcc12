"""Conversations, live (issue 18 item 3; console slice h-live), through a real `svc run
web` and a real `svc run all` on the sim: the transcript page renders what the API's
messages endpoint gives and where each stream ended; its events stream yields the sim
user's message and the agent's reply as they are stored, from that position; a viewer
reads, nobody else does; odd chat names are escaped; no consumer outlives its stream."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from html import unescape
from typing import Any

import httpx
import pytest

from contracts import subjects
from contracts.events import OperatorOrigin, SendMessage, TurnCompleted, derived_id, new_id
from services.ops.explain import TRANSCRIPT_STREAMS, chat_subjects
from services.ops.follow import parse_position
from services.ops.simclient import SimUser
from services.runtime.bus import Bus
from services.runtime.nats_server import EmbeddedNats
from tests.conftest import Processes, wait_until
from tests.e2e.conftest import consumers_ready, holder_of
from tests.e2e.test_least_privilege import (  # the shipped config's fixtures
    SecuredServer,
    operator,  # noqa: F401
    secured,  # noqa: F401
)
from tests.web.conftest import Web, add_token, add_user, bearer, json_of, login, start_web

pytestmark = pytest.mark.slow

CHAT = "alice@s.whatsapp.net"
ODD = '<b>o\'hara</b>&"x"@s.whatsapp.net'  # a JID the sim accepts, full of HTML specials


@dataclass
class Sse:
    """One parsed server-sent event."""

    event: str = "message"
    id: str | None = None
    data: str = ""


@dataclass
class EventStream:
    """An open text/event-stream response, read event by event."""

    response: httpx.Response
    comments: list[str] = field(default_factory=list)
    _lines: AsyncIterator[str] | None = None

    async def next(self, timeout: float = 60, *, comments: bool = False) -> Sse:
        """The next event (comments are kept aside, or with `comments` returned as events
        named `comment`); fails the test after `timeout` s."""
        if self._lines is None:
            self._lines = self.response.aiter_lines()
        lines = self._lines

        async def one() -> Sse:
            found, seen = Sse(), False
            async for line in lines:
                if line == "":
                    if seen:
                        return found
                    continue
                name, _, value = line.partition(":")
                value = value.removeprefix(" ")
                if name == "":
                    self.comments.append(value)
                    if comments:
                        return Sse(event="comment", data=value)
                    continue
                seen = True
                if name == "event":
                    found.event = value
                elif name == "id":
                    found.id = value
                elif name == "data":
                    found.data = f"{found.data}\n{value}" if found.data else value
            pytest.fail("the event stream ended")

        try:
            return await asyncio.wait_for(one(), timeout)
        except TimeoutError:
            pytest.fail(f"no server-sent event within {timeout}s")

    async def rows_until(self, done: Any, timeout: float = 60) -> list[dict[str, Any]]:
        """`row` events' data until `done(rows)` holds."""
        rows: list[dict[str, Any]] = []
        while not done(rows):
            event = await self.next(timeout)
            if event.event == "row":
                rows.append({**json.loads(event.data), "sse_id": event.id})
        return rows


@asynccontextmanager
async def events(client: httpx.AsyncClient, path: str, headers: dict[str, str]) -> Any:
    """GET `path` as an event stream; the open stream, closed (the client gone) at exit."""
    async with client.stream("GET", path, headers=headers) as response:
        assert response.status_code == 200, (await response.aread()).decode()
        assert response.headers["content-type"].startswith("text/event-stream")
        yield EventStream(response)


async def live_consumers(bus: Bus, account: str, chat: str) -> list[str]:
    """The consumers filtered on this chat's transcript subjects (only a live view makes
    them: the roles' durables are filtered on wildcards)."""
    where = chat_subjects("whatsapp", account, chat)
    found = []
    for stream in TRANSCRIPT_STREAMS:
        for info in await bus.js.consumers_info(stream):
            if info.config.filter_subject == where[stream]:
                found.append(f"{stream}/{info.name}")
    return found


async def system(bus: Bus, nats_server: EmbeddedNats, processes: Processes, **web_env: str) -> Web:
    """`svc run all` (sim, echo model) owning account default, and `svc run web`."""
    processes.start("run", "all", NATS_URL=nats_server.url)
    await wait_until(lambda: consumers_ready(bus, ("INBOUND", "core")), 60, "svc run all up")
    await wait_until(lambda: holder_of(bus, "default"), 60, "the account's owner")
    return await start_web(processes, nats_server.url, **web_env)


def events_path(page: str) -> str:
    """The events URL the transcript page hands its script."""
    found = re.search(r'id="transcript" data-events="([^"]+)"', page)
    assert found is not None, page[-2000:]
    return unescape(found.group(1))


async def test_the_events_stream_yields_the_message_and_the_reply_and_leaves_no_consumer(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "vera", "viewer")
    web = await system(bus, nats_server, processes)
    session = await login(web, "vera")
    async with SimUser(bus, "default") as user, web.client() as client:
        # Given an earlier exchange, rendered on the chat's page
        first = await user.send(CHAT, "first question")
        assert await user.wait_replies(60, exchange=first)
        token = subjects.encode_chat(CHAT)

        async def recorded() -> bool:  # the sim saw the reply; now DELIVERY has it too
            answer = await client.get(
                f"/api/v1/accounts/default/chats/{token}/messages", headers=session.headers()
            )
            return "sent" in [item["kind"] for item in json_of(answer)["items"]]

        await wait_until(recorded, 30, "the first reply recorded")
        shown = await client.get(f"/conversations/default/{token}", headers=session.headers())
        assert shown.status_code == 200, shown.text
        assert "first question" in shown.text
        path = events_path(shown.text)
        after = parse_position(path.split("after=", 1)[1])
        assert after["INBOUND"] >= 1
        assert after["DELIVERY"] >= 1
        # When the page's script opens the events stream from where the page ends
        async with events(client, path, session.headers(csrf=False)) as stream:
            ready = await stream.next()
            assert ready.event == "ready"
            assert ready.id is not None
            assert parse_position(ready.id) == after  # nothing new yet: starts right there
            assert len(await live_consumers(bus, "default", CHAT)) == len(TRANSCRIPT_STREAMS)
            # and a sim user writes
            second = await user.send(CHAT, "is my order shipped?")
            # Then the stream yields the message, the turn and the agent's reply -- and
            # nothing of the exchange the page already showed
            rows = await stream.rows_until(
                lambda rows: any(r["row"]["kind"] == "sent" for r in rows)
            )
            texts = [r["row"]["text"] for r in rows]
            kinds = [r["row"]["kind"] for r in rows]
            assert "inbound" in kinds, texts
            assert any("user > is my order shipped?" in t for t in texts), texts
            assert any("bot  < echo: is my order shipped?" in t for t in texts), texts
            assert not any("first question" in t for t in texts), texts
            (inbound,) = [r for r in rows if r["row"]["kind"] == "inbound"]
            assert inbound["item"]["event"]["text"] == "is my order shipped?"
            assert inbound["item"]["stream"] == "INBOUND"
            assert inbound["item"]["seq"] == after["INBOUND"] + 1
            # each event's id is the position after it: the last one covers the reply
            assert parse_position(rows[-1]["sse_id"])["DELIVERY"] > after["DELIVERY"]
            assert await user.wait_replies(60, exchange=second)
            last_id = rows[-1]["sse_id"]
        # And when the client goes away its consumers are deleted (the server's own
        # backstop for an abandoned one is 60 s: far beyond this wait)
        await wait_until(
            lambda: _none(live_consumers(bus, "default", CHAT)), 20, "the live consumers gone"
        )
        # And a browser that reconnects (Last-Event-ID) gets what it missed, and only that
        third = await user.send(CHAT, "sent while away")
        assert await user.wait_replies(60, exchange=third)
        resumed = {**session.headers(csrf=False), "Last-Event-ID": last_id}
        async with events(client, path, resumed) as stream:
            assert (await stream.next()).event == "ready"
            rows = await stream.rows_until(
                lambda rows: any(r["row"]["kind"] == "sent" for r in rows)
            )
            texts = [r["row"]["text"] for r in rows]
            assert any("user > sent while away" in t for t in texts), texts
            assert not any("is my order shipped?" in t for t in texts), texts


async def _none(found: Any) -> bool:
    return not await found


async def test_a_viewer_reads_chats_and_events_others_are_refused_and_odd_names_escaped(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "vera", "viewer")
    viewer = await add_token(bus, "looker", "viewer")
    web = await system(bus, nats_server, processes)
    session = await login(web, "vera")
    async with SimUser(bus, "default") as user, web.client() as client:
        # Given two chats, one named with HTML's special characters
        for chat, text in [(CHAT, "hello"), (ODD, "<i>hi</i> & bye")]:
            assert await user.wait_replies(60, exchange=await user.send(chat, text))
        token = subjects.encode_chat(ODD)
        # An unauthenticated client gets nothing: the API says 401, pages send to /login
        for path in [
            "/api/v1/accounts/default/chats",
            f"/api/v1/accounts/default/chats/{token}/events",
        ]:
            refused = await client.get(path)
            assert refused.status_code == 401, (path, refused.text)
            assert json_of(refused)["error"] == "unauthorized"
        for path in [
            "/conversations",
            f"/conversations/default/{token}",
            f"/conversations/default/{token}/events",
        ]:
            refused = await client.get(path)
            assert refused.status_code == 303, (path, refused.text)
            assert refused.headers["location"] == "/login"
        # A viewer lists the account's chats, most recent first
        listed = await client.get("/api/v1/accounts/default/chats", headers=bearer(viewer))
        assert listed.status_code == 200, listed.text
        assert [c["chat"] for c in json_of(listed)["items"]] == [ODD, CHAT]
        assert json_of(listed)["next_cursor"] is None
        paged = await client.get("/api/v1/accounts/default/chats?limit=1", headers=bearer(viewer))
        assert [c["chat"] for c in json_of(paged)["items"]] == [ODD]
        assert json_of(paged)["next_cursor"] is not None
        # The conversations page links each chat; every value is escaped
        listing = await client.get("/conversations", headers=session.headers())
        assert listing.status_code == 200
        assert f'href="/conversations/default/{token}"' in listing.text
        assert "&lt;b&gt;o&#x27;hara&lt;/b&gt;&amp;&quot;x&quot;@s.whatsapp.net" in listing.text
        assert "<b>o'hara</b>" not in listing.text
        shown = await client.get(f"/conversations/default/{token}", headers=session.headers())
        assert shown.status_code == 200
        assert "&lt;i&gt;hi&lt;/i&gt; &amp; bye" in shown.text
        assert "<i>hi</i>" not in shown.text
        assert "<b>o'hara</b>" not in shown.text
        assert '<script src="/static/live.js" defer></script>' in shown.text
        # The page's script is served, same origin, no data
        script = await client.get("/static/live.js")
        assert script.status_code == 200
        assert script.headers["content-type"].startswith("text/javascript")
        assert "EventSource" in script.text
        assert "textContent" in script.text
        assert "innerHTML" not in script.text
        # The API's events stream is a viewer's too (bearer token), from now on
        api_events = f"/api/v1/accounts/default/chats/{token}/events"
        async with events(client, api_events, bearer(viewer)) as stream:
            ready = await stream.next()
            assert ready.event == "ready"
            assert stream.comments == []  # the heartbeat is a comment, every 15 s
            await user.send(ODD, "still there?")
            rows = await stream.rows_until(
                lambda rows: any(r["row"]["kind"] == "sent" for r in rows)
            )
            assert any(r["item"]["event"].get("text") == "still there?" for r in rows)
            assert user.pending() == [] or await user.wait_replies(60)
        # Bad input: one line each, with the right status
        for path, status, code in [
            (f"/api/v1/accounts/nobody/chats/{token}/events", 404, "unknown_account"),
            (f"{api_events}?after=12", 400, "bad_cursor"),
            ("/api/v1/accounts/bad.name/chats", 422, "invalid_account"),
            ("/api/v1/accounts/default/chats/a%20b/events", 422, "invalid_chat"),
        ]:
            answer = await client.get(path, headers=bearer(viewer))
            assert answer.status_code == status, (path, answer.text)
            assert json_of(answer)["error"] == code
            assert "\n" not in json_of(answer)["detail"]
    await wait_until(
        lambda: _none(live_consumers(bus, "default", ODD)), 20, "the live consumers gone"
    )


async def test_the_live_view_stays_inside_the_web_users_nats_permissions(
    secured: SecuredServer,  # noqa: F811
    operator: Bus,  # noqa: F811
    processes: Processes,
) -> None:
    # Given the shipped least-privilege config: each role as its own NATS user
    processes.start("run", "whatsapp", **secured.env(processes, "whatsapp"))
    processes.start("run", "core", **secured.env(processes, "core"))
    await wait_until(lambda: holder_of(operator, "default"), 60, "the account's owner")
    await wait_until(lambda: consumers_ready(operator, ("INBOUND", "core")), 60, "the core")
    token = await add_token(operator, "looker", "viewer")
    web_env = secured.env(processes, "web")
    web = await start_web(
        processes,
        secured.url,
        NATS_USER=web_env["NATS_USER"],
        NATS_PASSWORD=web_env["NATS_PASSWORD"],
    )
    chat_token = subjects.encode_chat(CHAT)
    async with SimUser(operator, "default") as user, web.client() as client:
        # When a viewer follows a chat live, lists chats and reads the transcript
        path = f"/api/v1/accounts/default/chats/{chat_token}/events"
        async with events(client, path, bearer(token)) as stream:
            assert (await stream.next()).event == "ready"
            await user.send(CHAT, "hello, least privilege")
            rows = await stream.rows_until(
                lambda rows: any(r["row"]["kind"] == "sent" for r in rows)
            )
            assert any("hello, least privilege" in r["row"]["text"] for r in rows)
        listed = await client.get("/api/v1/accounts/default/chats", headers=bearer(token))
        assert [c["chat"] for c in json_of(listed)["items"]] == [CHAT]
        shown = await client.get(
            f"/api/v1/accounts/default/chats/{chat_token}/messages", headers=bearer(token)
        )
        assert "inbound" in [item["kind"] for item in json_of(shown)["items"]]
        assert await user.wait_replies(60)
    await wait_until(
        lambda: _none(live_consumers(operator, "default", CHAT)), 20, "the live consumers gone"
    )
    assert processes.stop(web.proc) == 0, processes.log(web.proc)
    # Then nothing the web role did was outside its permissions
    assert secured.violations() == []


async def test_a_reply_still_queued_shows_as_queued_on_the_page_and_in_the_api(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    # Given an operator's send whose job waits on OUTBOUND (no owner runs to send it)
    job_id = new_id()
    turn = TurnCompleted(
        id=derived_id("operator-turn", job_id),
        account="default",
        chat=CHAT,
        inbound_id="",
        model="operator",
        reply_ids=[job_id],
        origin=OperatorOrigin(actor="olivia", client="10.0.0.7"),
    )
    job = SendMessage(id=job_id, job_id=job_id, account="default", chat=CHAT, text="parked <reply>")
    await bus.publish(subjects.agent("whatsapp", "default", CHAT), turn)
    await bus.publish(subjects.outbound("whatsapp", "default", CHAT), job)
    token = await add_token(bus, "looker", "viewer")
    web = await start_web(processes, nats_server.url)
    async with web.client() as client:
        # When a viewer reads the chat
        api = await client.get(
            f"/api/v1/accounts/default/chats/{CHAT}/messages", headers=bearer(token)
        )
        page = await client.get(
            f"/conversations/default/{subjects.encode_chat(CHAT)}", headers=bearer(token)
        )
    # Then the queued job is listed after the turn that made it, with its text
    items = json_of(api)["items"]
    assert [i["kind"] for i in items] == ["turn", "queued"]
    assert items[1]["event"]["job_id"] == job_id
    assert page.status_code == 200
    assert "operator send by olivia (user) from 10.0.0.7 via web" in page.text
    assert f"queued &lt; parked &lt;reply&gt;   [job {job_id}; still on OUTBOUND]" in page.text
    # (the job is left queued: `svc audit` allows a pending job its grace period)


async def test_an_idle_stream_gets_heartbeats_and_ends_when_the_session_does(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "vera", "viewer")
    web = await system(bus, nats_server, processes)
    session = await login(web, "vera")
    path = f"/conversations/default/{subjects.encode_chat(CHAT)}/events"
    async with web.client() as client, events(client, path, session.headers(csrf=False)) as stream:
        assert (await stream.next()).event == "ready"
        # An idle stream carries a comment every HEARTBEAT (15) s, so proxies keep it open
        beat = await stream.next(60, comments=True)
        assert (beat.event, beat.data) == ("comment", "keep-alive")
        # When the user logs out elsewhere, the stream says so and ends at the next beat
        out = await client.post(
            "/logout", data={"csrf": session.csrf}, headers=session.headers(csrf=False)
        )
        assert out.status_code == 303
        ended = await stream.next(60)
        assert ended.event == "end"
        assert ended.data == "the session has ended"
