"""The LLM port, the deterministic `echo` provider (the embedded default) and `openai`
(the official client, for any OpenAI-compatible server: OpenAI, Ollama, vLLM, ...)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class ToolSpec:
    """A tool offered to the model: `plugin.tool` name, description, JSON Schema params."""

    name: str
    description: str
    parameters: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ToolCall:
    """The model asked to call a tool."""

    id: str
    name: str
    arguments: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ChatMessage:
    """One prompt message (OpenAI chat shape)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    tool_calls: tuple[ToolCall, ...] = ()  # assistant: what it asked for
    tool_call_id: str | None = None  # tool: which call this answers
    name: str | None = None  # tool: which tool answered


@dataclass(frozen=True)
class Completion:
    """What the model answered: text, tool calls, or both."""

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LLMError(Exception):
    """A provider failure; `transient` says whether retrying may help. Never holds secrets."""

    def __init__(self, message: str, *, transient: bool) -> None:
        super().__init__(message)
        self.transient = transient


class LLM(Protocol):
    """A chat model with tool calling (echo, or an OpenAI-compatible server)."""

    model: str

    async def complete(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> Completion:
        """Answer the conversation in `messages`, optionally calling `tools`."""
        ...


class EchoLLM:
    """Deterministic and offline. Replies `echo: <the user's text>`, and understands:

    - `!tool NAME {json arguments}`: calls tool NAME, then replies `echo: NAME -> <result>`;
    - `!history`: replies with the conversation it was given (`echo: history: ...`).
    """

    model = "echo"

    def __init__(self, *, latency: float = 0.0) -> None:
        self.latency = latency  # seconds each answer takes (SVC_ECHO_LATENCY_MS), for tests

    async def complete(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> Completion:
        """Echo, call the requested tool, or report the history."""
        if self.latency:
            await asyncio.sleep(self.latency)  # a model's thinking time, simulated
        last = messages[-1] if messages else ChatMessage("user", "")
        if last.role == "tool":
            return Completion(text=f"echo: {last.name} -> {last.content}")
        text = last.content.strip()
        if text.startswith("!tool"):
            name, _, raw = text.removeprefix("!tool").strip().partition(" ")
            try:
                arguments = json.loads(raw) if raw.strip() else {}
            except json.JSONDecodeError:
                return Completion(text=f"echo: bad tool arguments {raw!r} (expected JSON)")
            if not any(t.name == name for t in tools):
                return Completion(text=f"echo: no tool named {name!r} here")
            return Completion(text="", tool_calls=(ToolCall("call-1", name, arguments),))
        if text == "!history":
            past = [
                f"{m.role}: {m.content}" for m in messages[1:-1] if m.role in ("user", "assistant")
            ]
            return Completion(text="echo: history: " + (" | ".join(past) or "(empty)"))
        return Completion(text=f"echo: {last.content}")


class OpenAILLM:
    """Chat completions with tools through the official `openai` client. The client
    retries 429/5xx/timeouts itself (with backoff, honouring Retry-After) up to `retries`;
    what is still failing after that becomes an LLMError."""

    def __init__(
        self, *, base_url: str, api_key: str, model: str, timeout: float, retries: int
    ) -> None:
        try:
            import openai
        except ImportError:
            raise LLMError(
                "SVC_LLM=openai needs the client: pip install 'switchboard[openai]'",
                transient=False,
            ) from None
        self._openai = openai
        self.model = model
        self.client = openai.AsyncOpenAI(
            base_url=base_url, api_key=api_key, timeout=timeout, max_retries=retries
        )

    async def complete(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> Completion:
        """One chat completion."""
        openai = self._openai
        request: dict[str, Any] = {
            "model": self.model,
            "messages": [_to_openai(m) for m in messages],
        }
        if tools:
            request["tools"] = [_tool_to_openai(t) for t in tools]
        try:
            response = await self.client.chat.completions.create(**request)
        except (openai.RateLimitError, openai.InternalServerError) as exc:
            raise LLMError(
                f"{type(exc).__name__} (HTTP {exc.status_code})", transient=True
            ) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise LLMError(
                f"{type(exc).__name__}: cannot reach the model server", transient=True
            ) from None
        except openai.APIStatusError as exc:  # 4xx: our request or our key is wrong
            raise LLMError(
                f"{type(exc).__name__} (HTTP {exc.status_code})", transient=False
            ) from None
        choice = response.choices[0].message
        calls = tuple(
            ToolCall(c.id, _from_openai_name(c.function.name), _arguments(c.function.arguments))
            for c in (choice.tool_calls or [])
        )
        usage = response.usage
        return Completion(
            text=choice.content or "",
            tool_calls=calls,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )


# OpenAI function names allow [a-zA-Z0-9_-]; ours are `plugin.tool`.
def _to_openai_name(name: str) -> str:
    return name.replace(".", "__")


def _from_openai_name(name: str) -> str:
    return name.replace("__", ".")


def _arguments(raw: str | None) -> dict[str, Any]:
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError:
        return {"_invalid_json": raw}
    return value if isinstance(value, dict) else {"_value": value}


def _tool_to_openai(tool: ToolSpec) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": _to_openai_name(tool.name),
            "description": tool.description,
            "parameters": tool.parameters or {"type": "object", "properties": {}},
        },
    }


def _to_openai(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {
                "id": c.id,
                "type": "function",
                "function": {"name": _to_openai_name(c.name), "arguments": json.dumps(c.arguments)},
            }
            for c in m.tool_calls
        ]
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    return out
