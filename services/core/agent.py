"""One agent turn: call the model, run the tools it asks for, feed results back, bounded."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from contracts.events import ToolCallRecord
from services.core.llm import LLM, ChatMessage, Completion
from services.core.tools import ToolBox
from services.runtime.metrics import instruments, labels


@dataclass
class TurnResult:
    """The final answer and what it took."""

    text: str
    tools: list[ToolCallRecord] = field(default_factory=list)
    prompt_tokens: int = 0
    completion_tokens: int = 0


async def run_turn(
    llm: LLM, tools: ToolBox, messages: list[ChatMessage], *, max_rounds: int
) -> TurnResult:
    """Complete `messages`; after `max_rounds` tool rounds the model must answer in text
    (it is offered no tools any more). Raises LLMError from the provider."""
    result = TurnResult(text="")
    messages = list(messages)
    latency = instruments().model_duration
    ok, failed = (
        labels(("model", llm.model), ("outcome", "ok")),
        labels(("model", llm.model), ("outcome", "error")),
    )
    for round_ in range(max_rounds + 1):
        offered = tools.specs() if round_ < max_rounds else []
        started = time.perf_counter()
        try:
            completion: Completion = await llm.complete(messages, offered)
        except Exception:
            latency.record(time.perf_counter() - started, failed)
            raise
        latency.record(time.perf_counter() - started, ok)
        result.prompt_tokens += completion.prompt_tokens
        result.completion_tokens += completion.completion_tokens
        if not completion.tool_calls or not offered:
            result.text = completion.text
            return result
        messages.append(ChatMessage("assistant", completion.text, tool_calls=completion.tool_calls))
        for call in completion.tool_calls:
            text, record = await tools.run(call)
            result.tools.append(record)
            messages.append(ChatMessage("tool", text, tool_call_id=call.id, name=call.name))
    return result  # not reached: the last round offers no tools
