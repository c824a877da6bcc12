"""The LLM port, the deterministic `echo` provider (the embedded default) and `openai`
(the official client, for any OpenAI-compatible server: OpenAI, Ollama, vLLM, ...)."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from typing import Any, Literal, Protocol

# The longest wait a server's Retry-After can ask of one retry (seconds); a longer ask is
# capped, so a confused server cannot park a chat's turn for hours.
MAX_RETRY_AFTER = 60.0


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
    """A provider failure; `transient` says whether retrying may help; `retry_after` is
    the wait the server asked for (seconds, capped at MAX_RETRY_AFTER), if it asked.
    Never holds secrets."""

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


def retry_after(headers: Any, now: float | None = None) -> float | None:
    """The wait a response asks for: `retry-after-ms`, or `Retry-After` in seconds or as
    an HTTP date; None when absent or unreadable; capped at MAX_RETRY_AFTER."""
    if headers is None:
        return None
    seconds: float | None = None
    try:
        raw_ms = headers.get("retry-after-ms")
        if raw_ms is not None:
            seconds = float(raw_ms) / 1000
        else:
            raw = headers.get("retry-after")
            if raw is None:
                return None
            try:
                seconds = float(raw)
            except ValueError:
                when = parsedate_to_datetime(str(raw)).timestamp()
                seconds = when - (time.time() if now is None else now)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if seconds is None or not math.isfinite(seconds):
        return None
    return min(max(seconds, 0.0), MAX_RETRY_AFTER)


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
                f"{type(exc).__name__} (HTTP {exc.status_code})",
                transient=True,
                retry_after=retry_after(getattr(exc.response, "headers", None)),
            ) from None
        except (openai.APIConnectionError, openai.APITimeoutError) as exc:
            raise LLMError(
                f"{type(exc).__name__}: cannot reach the model server", transient=True
            ) from None
        except openai.APIStatusError as exc:  # 4xx: our request or our key is wrong
            raise LLMError(
                f"{type(exc).__name__} (HTTP {exc.status_code})", transient=False
            ) from None
        except (openai.APIResponseValidationError, ValueError) as exc:  # a 200 not JSON
            raise _malformed(f"{type(exc).__name__}") from None
        # A 200 whose body is not a completion (HTML from a proxy, a bare string, no
        # choices) is the server's fault, like a 5xx: retried, then the fallback reply.
        choices = getattr(response, "choices", None)
        if not isinstance(response, openai.types.chat.ChatCompletion) or not choices:
            raise _malformed(
                "no choices"
                if isinstance(response, openai.types.chat.ChatCompletion)
                else f"a {type(response).__name__} body"
            )
        choice = choices[0].message
        try:
            calls = tuple(
                ToolCall(c.id, _from_openai_name(c.function.name), _arguments(c.function.arguments))
                for c in (choice.tool_calls or [])
            )
            text = choice.content or ""
        except (AttributeError, TypeError):  # a choice without a message or a function
            raise _malformed("an incomplete choice") from None
        usage = response.usage
        return Completion(
            text=text,
            tool_calls=calls,
            prompt_tokens=usage.prompt_tokens if usage else 0,
            completion_tokens=usage.completion_tokens if usage else 0,
        )


def _malformed(what: str) -> LLMError:
    return LLMError(f"malformed answer from the model server ({what})", transient=True)


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
