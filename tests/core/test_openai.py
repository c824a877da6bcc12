"""The `openai` provider through the official client against a local OpenAI-compatible
HTTP server (real HTTP on loopback), driven by the real core worker and NATS."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from contracts import subjects
from contracts.events import MessageReceived, SendMessage, TurnCompleted, TurnFailed
from services.core.llm import OpenAILLM
from services.core.worker import CoreWorker
from services.runtime.bus import Bus
from services.runtime.settings import CoreSettings
from tests.conftest import read_stream, wait_until


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


class FakeOpenAI:
    """A scripted /v1/chat/completions: each request gets the next (status, body)."""

    def __init__(self, script: list[tuple[int, dict[str, Any]]]) -> None:
        self.script = list(script)
        self.requests: list[dict[str, Any]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                fake.requests.append(json.loads(self.rfile.read(length)))
                status, body = fake.script.pop(0) if fake.script else (500, {"error": "no more"})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
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
    worker = CoreWorker(bus, llm, settings)
    msg = MessageReceived(
        account="acct", chat="c@s.whatsapp.net", sender="c", message_id="m1", text="what is 2+3?"
    )
    await bus.publish(subjects.inbound("whatsapp", "acct", msg.chat), msg)
    stop = asyncio.Event()
    task = asyncio.create_task(worker.loop.run(stop))
    await wait_until(lambda: worker.loop.handled == 1, timeout=30, what="the turn")
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


def test_openai_function_names_round_trip() -> None:
    from services.core.llm import _from_openai_name, _to_openai_name

    assert _from_openai_name(_to_openai_name("clock.now")) == "clock.now"


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
