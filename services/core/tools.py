"""Tools the model may call. Until the plugin registry lands, a fixed built-in set served
through the same port the registry will fill: `ToolBox.for_scope(channel, account)`."""

from __future__ import annotations

import ast
import asyncio
import hashlib
import operator
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from contracts.events import ToolCallRecord
from services.core.llm import ToolCall, ToolSpec


class ToolError(Exception):
    """A tool refused its arguments or failed; the message goes back to the model."""


class Tool(Protocol):
    """A callable the model can use: `plugin.tool` name, description, JSON Schema params."""

    spec: ToolSpec

    async def __call__(self, arguments: dict[str, Any]) -> str:
        """Run with the model's arguments; return text for the model."""
        ...


class ClockNow:
    """The current date and time in a time zone."""

    spec = ToolSpec(
        name="clock.now",
        description="The current date and time, in an IANA time zone (default UTC).",
        parameters={
            "type": "object",
            "properties": {"tz": {"type": "string", "description": "e.g. Europe/Lisbon"}},
            "additionalProperties": False,
        },
    )

    async def __call__(self, arguments: dict[str, Any]) -> str:
        """Now, ISO 8601, in `tz`."""
        name = str(arguments.get("tz") or "UTC")
        try:
            zone = ZoneInfo(name)
        except (ZoneInfoNotFoundError, ValueError):
            raise ToolError(f"unknown time zone {name!r}") from None
        return datetime.now(UTC).astimezone(zone).isoformat(timespec="seconds")


_OPS: dict[type, Callable[..., Any]] = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
    ast.USub: operator.neg,
    ast.UAdd: operator.pos,
}


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic by walking its syntax tree: numbers and + - * / // % ** only."""
    if len(expression) > 200:
        raise ToolError("expression too long (200 characters at most)")
    try:
        tree = ast.parse(expression, mode="eval")
    except SyntaxError:
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def walk(node: ast.AST) -> float | int:
        match node:
            case ast.Expression(body=body):
                return walk(body)
            case ast.Constant(value=value) if isinstance(value, int | float) and not isinstance(
                value, bool
            ):
                return value
            case ast.BinOp(left=left, op=op, right=right) if type(op) in _OPS:
                a, b = walk(left), walk(right)
                if isinstance(op, ast.Pow) and abs(b) > 100:
                    raise ToolError("exponent too large")
                try:
                    return _OPS[type(op)](a, b)  # type: ignore[no-any-return]
                except ZeroDivisionError:
                    raise ToolError("division by zero") from None
            case ast.UnaryOp(op=op, operand=operand) if type(op) in _OPS:
                return _OPS[type(op)](walk(operand))  # type: ignore[no-any-return]
            case _:
                raise ToolError(f"only numbers and + - * / // % ** are allowed in {expression!r}")

    return walk(tree)


class Calculator:
    """Arithmetic by a safe parser (never eval)."""

    spec = ToolSpec(
        name="calculator.evaluate",
        description="Evaluate an arithmetic expression, e.g. (2+3)*4/5.",
        parameters={
            "type": "object",
            "properties": {"expression": {"type": "string"}},
            "required": ["expression"],
            "additionalProperties": False,
        },
    )

    async def __call__(self, arguments: dict[str, Any]) -> str:
        """The expression's value."""
        return str(calculate(str(arguments.get("expression", ""))))


BUILT_IN: tuple[Tool, ...] = (ClockNow(), Calculator())


class ToolBox:
    """The tools of one turn, run with a timeout each; errors go back to the model."""

    def __init__(self, tools: tuple[Tool, ...], *, timeout: float) -> None:
        self.tools = {t.spec.name: t for t in tools}
        self.timeout = timeout

    @classmethod
    def for_scope(cls, channel: str, account: str, *, timeout: float) -> ToolBox:
        """The tools allowed for (channel, account): the built-in set for now."""
        return cls(BUILT_IN, timeout=timeout)

    def specs(self) -> list[ToolSpec]:
        """What the model is offered."""
        return [t.spec for t in self.tools.values()]

    async def run(self, call: ToolCall) -> tuple[str, ToolCallRecord]:
        """Run one call; return the text for the model and the record for TurnCompleted."""
        started = time.perf_counter()
        tool = self.tools.get(call.name)
        error: str | None = None
        try:
            if tool is None:
                raise ToolError(f"no tool named {call.name!r}; available: {', '.join(self.tools)}")
            result = await asyncio.wait_for(tool(call.arguments), self.timeout)
        except ToolError as exc:
            error = str(exc)
        except TimeoutError:
            error = f"{call.name} timed out after {self.timeout:g}s"
        except Exception as exc:  # a tool bug must not end the turn
            error = f"{call.name} failed: {type(exc).__name__}: {exc}"
        text = f"error: {error}" if error is not None else result
        record = ToolCallRecord(
            name=call.name,
            arguments=call.arguments,
            result_digest=hashlib.blake2b(text.encode(), digest_size=8).hexdigest(),
            error=error,
            latency_ms=round((time.perf_counter() - started) * 1000, 3),
        )
        return text, record
