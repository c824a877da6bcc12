"""The core's tool port: what a turn calls (`ToolSource` -> `ToolBox`), each tool bound to
its chat and run with a timeout; errors go back to the model. The plugins package
implements the port; the core never imports it (ADR 0018)."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

from contracts.events import ToolCallRecord
from services.core.llm import ToolCall, ToolSpec
from services.runtime.metrics import instruments, labels

log = logging.getLogger(__name__)


class ToolError(Exception):
    """A tool refused its arguments or failed; the message goes back to the model."""


@dataclass(frozen=True)
class BoundTool:
    """A tool the model may call in this turn."""

    spec: ToolSpec
    call: Callable[[dict[str, Any]], Awaitable[str]]


class ToolBox:
    """The tools of one turn."""

    def __init__(self, tools: list[BoundTool], *, timeout: float, plugins_seq: int = 0) -> None:
        self.tools = {t.spec.name: t for t in tools}
        self.timeout = timeout
        self.plugins_seq = plugins_seq  # the plugin projection position they came from

    def specs(self) -> list[ToolSpec]:
        """What the model is offered."""
        return [t.spec for t in self.tools.values()]

    async def run(self, call: ToolCall) -> tuple[str, ToolCallRecord]:
        """Run one call; return the text for the model and the record for TurnCompleted."""
        started = time.perf_counter()
        tool = self.tools.get(call.name)
        error: str | None = None
        result = ""
        try:
            if tool is None:
                raise ToolError(f"no tool named {call.name!r}; available: {', '.join(self.tools)}")
            result = await asyncio.wait_for(tool.call(call.arguments), self.timeout)
        except ToolError as exc:
            error = str(exc)
        except TimeoutError:
            # A worker process running it was killed; a thread is left to finish (ADR 0014).
            error = f"{call.name} timed out after {self.timeout:g}s"
            log.warning("tool timed out", extra={"tool": call.name, "timeout_s": self.timeout})
        except Exception as exc:  # a tool bug must not end the turn
            error = f"{call.name} failed: {type(exc).__name__}: {exc}"
        text = f"error: {error}" if error is not None else result
        # Labelled by the tools offered only: a name the model made up is not a label.
        known = call.name if tool is not None else "unknown"
        outcome = "ok" if error is None else "error" if tool is not None else "unknown_tool"
        instruments().tool_calls.add(1, labels(("tool", known), ("outcome", outcome)))
        record = ToolCallRecord(
            name=call.name,
            arguments=call.arguments,
            result_digest=hashlib.blake2b(text.encode(), digest_size=8).hexdigest(),
            error=error,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return text, record


class ToolSource(Protocol):
    """Where the core gets each turn's tools (the port the plugins package implements)."""

    async def toolbox(self, channel: str, account: str, chat: str) -> ToolBox:
        """The tools allowed for this chat's turn."""
        ...
