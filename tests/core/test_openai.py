"""The `openai` provider through the official client against a local OpenAI-compatible
HTTP server (real HTTP on loopback), driven by the real core worker and NATS."""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from contracts import subjects
from contracts.events import MessageReceived, SendMessage, TurnCompleted, TurnFailed
from services.core.llm import OpenAILLM
from services.runtime.bus import Bus
from services.runtime.settings import CoreSettings
from tests.conftest import read_stream, wait_until
from tests.core.wiring import core_worker


def completion(
    content: str | None, tool_calls: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = tool_calls
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": "local-model",
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18},
    }


Reply = tuple[int, dict[str, Any]] | tuple[int, dict[str, Any] | bytes, dict[str, str]]


class FakeOpenAI:
    """A scripted /v1/chat/completions: each request gets the next (status, body[,
    headers]); a bytes body is sent as is. `times` records when each request arrived."""

    def __init__(self, script: list[Reply]) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        self.times: list[float] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                fake.times.append(time.monotonic())
                length = int(self.headers.get("Content-Length", 0))
                fake.requests.append(json.loads(self.rfile.read(length)))
                reply: Reply = fake.script.pop(0) if fake.script else (500, {"error": "no more"})
                status, body = reply[0], reply[1]
                headers = reply[2] if len(reply) == 3 else {}
                data = body if isinstance(body, bytes) else json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
                self.send_header("Content-Length", str(len(data)))
                if status == 429 and "Retry-After" not in headers:
                    self.send_header("Retry-After", "0")
                for name, value in headers.items():
                    if name != "Content-Type":
                        self.send_header(name, value)
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeOpenAI:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def settings() -> CoreSettings:
    return CoreSettings(turn_attempts=2, llm_retries=2, llm_timeout=5, fallback_reply="Sorry!")


async def one_turn(
    bus: Bus, base_url: str, settings: CoreSettings
) -> tuple[Any, list[SendMessage]]:
    llm = OpenAILLM(
        base_url=base_url,
        api_key="sk-test-not-a-secret",
        model="local-model",
        timeout=settings.llm_timeout,
        retries=settings.llm_retries,
    )
    worker = core_worker(bus, llm, settings)
    msg = MessageReceived(
        account="acct", chat="c@s.whatsapp.net", sender="c", message_id="m1", text="what is 2+3?"
    )
    await bus.publish(subjects.inbound("whatsapp", "acct", msg.chat), msg)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    await wait_until(
        lambda: worker.loop.handled + worker.loop.dead_lettered == 1, timeout=60, what="the turn"
    )
    stop.set()
    await task
    ((_, record),) = await read_stream(bus, "AGENT")
    jobs = [j for _, j in await read_stream(bus, "OUTBOUND") if isinstance(j, SendMessage)]
    return record, jobs


async def test_a_plain_reply(bus: Bus, settings: CoreSettings) -> None:
    with FakeOpenAI([(200, completion("Five."))]) as server:
        record, jobs = await one_turn(bus, server.url, settings)
    assert isinstance(record, TurnCompleted)
    assert [j.text for j in jobs] == ["Five."]
    assert record.model == "local-model"
    assert record.usage is not None
    assert (record.usage.prompt_tokens, record.usage.completion_tokens) == (11, 7)
    (request,) = server.requests
    assert request["messages"][-1] == {"role": "user", "content": "what is 2+3?"}
    assert {t["function"]["name"] for t in request["tools"]} >= {"calculator__evaluate"}


async def test_one_tool_call_round(bus: Bus, settings: CoreSettings) -> None:
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "calculator__evaluate", "arguments": '{"expression": "2+3"}'},
    }
    with FakeOpenAI([(200, completion(None, [call])), (200, completion("It is 5."))]) as server:
        record, jobs = await one_turn(bus, server.url, settings)
    assert [j.text for j in jobs] == ["It is 5."]
    (tool,) = record.tools_called
    assert (tool.name, tool.arguments, tool.error) == (
        "calculator.evaluate",
        {"expression": "2+3"},
        None,
    )
    second = server.requests[1]["messages"]
    assert second[-2]["tool_calls"][0]["function"]["name"] == "calculator__evaluate"
    assert second[-1] == {"role": "tool", "content": "5", "tool_call_id": "call_1"}


async def test_a_429_then_success(bus: Bus, settings: CoreSettings) -> None:
    with FakeOpenAI(
        [(429, {"error": {"message": "slow down"}}), (200, completion("ok"))]
    ) as server:
        record, jobs = await one_turn(bus, server.url, settings)
    assert isinstance(record, TurnCompleted)
    assert [j.text for j in jobs] == ["ok"]
    assert len(server.requests) == 2


async def test_a_server_that_is_down_ends_in_turn_failed_and_the_fallback(
    bus: Bus, settings: CoreSettings
) -> None:
    with FakeOpenAI([]) as server:
        down = server.url
    fast = CoreSettings(turn_attempts=2, llm_retries=0, llm_timeout=2, fallback_reply="Sorry!")
    record, jobs = await one_turn(bus, down, fast)
    assert isinstance(record, TurnFailed)
    assert "cannot reach the model server" in record.error
    assert [j.text for j in jobs] == ["Sorry!"]
    assert record.reply_ids == [j.job_id for j in jobs]
    assert "sk-test" not in record.error


@pytest.mark.parametrize(
    ("body", "content_type"),
    [
        pytest.param(b"<html>502 from a proxy</html>", "text/html", id="html"),
        pytest.param(b"<html>not json</html>", "application/json", id="not-json"),
        pytest.param({**completion("x"), "choices": []}, "application/json", id="no-choices"),
    ],
)
async def test_a_broken_200_ends_in_turn_failed_and_the_fallback(
    bus: Bus, body: dict[str, Any] | bytes, content_type: str
) -> None:
    # Given a model server that answers 200 with something that is not a completion
    fast = CoreSettings(turn_attempts=2, llm_retries=0, llm_timeout=5, fallback_reply="Sorry!")
    headers = {"Content-Type": content_type}
    with FakeOpenAI([(200, body, headers), (200, body, headers)]) as server:
        record, jobs = await one_turn(bus, server.url, fast)
    # Then the message is not lost: retried once (transient), then TurnFailed + fallback
    assert isinstance(record, TurnFailed)
    assert "malformed answer from the model server" in record.error
    assert [j.text for j in jobs] == ["Sorry!"]
    assert len(server.requests) == 2
    assert not await read_stream(bus, "DEADLETTER")


async def test_retries_of_a_failing_model_back_off_as_declared(bus: Bus) -> None:
    # Given a server failing three times (no client-side retries), declared delays 1, 2, 4 s
    slow = CoreSettings(turn_attempts=4, llm_retries=0, llm_timeout=5, fallback_reply="Sorry!")
    boom: Reply = (500, {"error": {"message": "boom"}})
    with FakeOpenAI([boom, boom, boom, (200, completion("finally"))]) as server:
        record, jobs = await one_turn(bus, server.url, slow)
    assert isinstance(record, TurnCompleted)
    assert [j.text for j in jobs] == ["finally"]
    t = server.times
    gaps = [b - a for a, b in itertools.pairwise(t)]
    print("gaps between attempts (s):", [round(g, 2) for g in gaps])
    # Then the waits grow (generous margins for a loaded box; each gap is delay + overhead)
    assert gaps[0] >= 0.9
    assert gaps[1] >= 1.9
    assert gaps[2] >= 3.9
    assert gaps[2] > gaps[1] > gaps[0]


async def test_a_retry_waits_as_long_as_retry_after_asks(bus: Bus) -> None:
    slow = CoreSettings(turn_attempts=2, llm_retries=0, llm_timeout=5, fallback_reply="Sorry!")
    limited: Reply = (429, {"error": {"message": "slow down"}}, {"Retry-After": "3"})
    with FakeOpenAI([limited, (200, completion("ok"))]) as server:
        record, _ = await one_turn(bus, server.url, slow)
    assert isinstance(record, TurnCompleted)
    gap = server.times[1] - server.times[0]
    print(f"Retry-After 3 -> waited {gap:.2f} s (declared backoff 1 s)")
    assert gap >= 2.9


def test_retry_after_reads_seconds_dates_and_caps() -> None:
    from email.utils import formatdate

    from services.core.llm import MAX_RETRY_AFTER, retry_after

    now = 1_800_000_000.0
    assert retry_after({"retry-after": "7"}) == 7
    assert retry_after({"retry-after-ms": "1500"}) == 1.5
    assert retry_after({"retry-after": formatdate(now + 20, usegmt=True)}, now=now) == 20
    assert retry_after({"retry-after": formatdate(now - 20, usegmt=True)}, now=now) == 0
    assert retry_after({"retry-after": "86400"}) == MAX_RETRY_AFTER
    assert retry_after({"retry-after": "soon"}) is None
    assert retry_after({"retry-after": "nan"}) is None
    assert retry_after({}) is None


def test_openai_function_names_round_trip() -> None:
    from services.core.llm import _from_openai_name, _to_openai_name

    assert _from_openai_name(_to_openai_name("clock.now")) == "clock.now"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
