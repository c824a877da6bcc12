"""The LLM port and the deterministic `echo` provider (the embedded default)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class ChatMessage:
    """One prompt message (OpenAI chat shape)."""

    role: Literal["system", "user", "assistant", "tool"]
    content: str
    name: str | None = None
    tool_call_id: str | None = None


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
class Completion:
    """What the model answered: text, tool calls, or both."""

    text: str
    tool_calls: tuple[ToolCall, ...] = ()
    prompt_tokens: int = 0
    completion_tokens: int = 0


class LLMError(Exception):
    """A provider failure; `transient` says whether retrying may help."""

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
    """Deterministic: replies `echo: <the last user message>`; never calls the network."""

    model = "echo"

    async def complete(self, messages: list[ChatMessage], tools: list[ToolSpec]) -> Completion:
        """Echo the last user message."""
        last = next((m.content for m in reversed(messages) if m.role == "user"), "")
        return Completion(text=f"echo: {last}")
