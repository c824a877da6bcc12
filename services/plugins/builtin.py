"""The built-in plugins, registered through the same entry points as third-party ones."""

from __future__ import annotations

import ast
import asyncio
import ipaddress
import math
import operator
import socket
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urlsplit
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec

from services.plugins.base import Plugin, ToolContext, ToolError

# --- clock -------------------------------------------------------------------------------

clock: Plugin[Any] = Plugin("clock", "1.0.0", "The current date and time.", preinstalled=True)


class NowParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of clock.now."""

    tz: str = "UTC"


@clock.tool(
    "now", "The current date and time in an IANA time zone (e.g. Europe/Lisbon).", NowParams
)
async def now(params: NowParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """Now, ISO 8601, in `tz`."""
    try:
        zone = ZoneInfo(params.tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise ToolError(f"unknown time zone {params.tz!r}") from None
    return datetime.now(UTC).astimezone(zone).isoformat(timespec="seconds")


# --- calculator ----------------------------------------------------------------------------

calculator: Plugin[Any] = Plugin("calculator", "1.0.0", "Arithmetic, safely.", preinstalled=True)

# The largest integer the calculator computes, in bits (about 1,233 decimal digits): every
# result's size is estimated *before* it is computed and refused past this, so no
# expression under 200 characters costs more than microseconds (`(((9**99)**99)**99)**99`
# would be a 300-million-bit number: minutes of CPU and ~40 MB).
MAX_BITS = 4096

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

_TOO_LARGE = f"result too large (integers up to {MAX_BITS} bits, floats up to about 1.8e308)"


def _bits(value: float | int) -> int:
    """The size of an integer operand (a float counts as small: float ops are O(1))."""
    return abs(value).bit_length() if isinstance(value, int) else 0


def _estimated_bits(op: ast.operator, a: float | int, b: float | int) -> int:
    """At least how many bits the result of an integer `a op b` has, known without
    computing it. Operands are at most MAX_BITS, so whatever passes this check costs
    microseconds to compute and is then checked exactly."""
    if not (isinstance(a, int) and isinstance(b, int)):
        return 0  # a float result: overflow shows as an error or inf, checked after
    match op:
        case ast.Mult() if a and b:
            return _bits(a) + _bits(b) - 1
        case ast.Pow() if b > 0 and a not in (0, 1, -1):
            if b > MAX_BITS:  # |a| >= 2: at least b bits (and b may not fit a float)
                return b
            return math.floor(b * math.log2(abs(a)))
        case _:
            return 0  # + - / // % of operands within the bound stay within ~1 bit of it


def calculate(expression: str) -> float | int:
    """Evaluate arithmetic by walking its syntax tree: numbers and + - * / // % ** only,
    integers up to MAX_BITS bits and finite floats (a ToolError says what was refused)."""
    if len(expression) > 200:
        raise ToolError("expression too long (200 characters at most)")
    try:
        tree = ast.parse(expression, mode="eval")
    except (SyntaxError, ValueError):  # ValueError: a literal past Python's digit limit
        raise ToolError(f"not an arithmetic expression: {expression!r}") from None

    def checked(value: Any) -> float | int:
        if isinstance(value, complex):
            raise ToolError("no real result (e.g. a fractional power of a negative number)")
        if isinstance(value, float) and not math.isfinite(value):
            raise ToolError(_TOO_LARGE)
        if isinstance(value, int) and value.bit_length() > MAX_BITS:
            raise ToolError(_TOO_LARGE)
        return value  # type: ignore[no-any-return]

    def walk(node: ast.AST) -> float | int:
        match node:
            case ast.Expression(body=body):
                return walk(body)
            case ast.Constant(value=value) if isinstance(value, int | float) and not isinstance(
                value, bool
            ):
                return checked(value)
            case ast.BinOp(left=left, op=op, right=right) if type(op) in _OPS:
                a, b = walk(left), walk(right)
                if _estimated_bits(op, a, b) > MAX_BITS:
                    raise ToolError(_TOO_LARGE)
                try:
                    return checked(_OPS[type(op)](a, b))
                except ZeroDivisionError:
                    raise ToolError("division by zero") from None
                except OverflowError:
                    raise ToolError(_TOO_LARGE) from None
            case ast.UnaryOp(op=op, operand=operand) if type(op) in _OPS:
                return checked(_OPS[type(op)](walk(operand)))
            case _:
                raise ToolError(f"only numbers and + - * / // % ** are allowed in {expression!r}")

    return walk(tree)


class ExpressionParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of calculator.evaluate."""

    expression: str


# A plain `def` declared CPU-bound: it runs in a worker process the core kills at the tool
# timeout (defence in depth: the size bounds above already keep it to microseconds).
@calculator.tool(
    "evaluate",
    "Evaluate an arithmetic expression, e.g. (2+3)*4/5.",
    ExpressionParams,
    run="process",
)
def evaluate(params: ExpressionParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """The expression's value."""
    return str(calculate(params.expression))


# --- memory ----------------------------------------------------------------------------------

memory: Plugin[Any] = Plugin("memory", "1.0.0", "Remember facts per chat (stored as events).")


class RememberParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of memory.remember."""

    key: str
    value: str


class KeyParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of memory.forget."""

    key: str


class RecallParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of memory.recall (no key: everything)."""

    key: str = ""


def _facts(ctx: ToolContext) -> Any:
    if ctx.facts is None:
        raise ToolError("memory is not available here")
    return ctx.facts


@memory.tool("remember", "Remember a fact about this chat (key, value).", RememberParams)
async def remember(params: RememberParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """Store a fact."""
    if not params.key.strip() or len(params.key) > 100 or len(params.value) > 2000:
        raise ToolError("a fact needs a key of 1-100 characters and a value of at most 2000")
    await _facts(ctx).remember(params.key.strip(), params.value)
    return f"remembered {params.key.strip()}"


@memory.tool("recall", "Recall facts about this chat (one key, or all).", RecallParams)
async def recall(params: RecallParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """The chat's facts."""
    facts: dict[str, str] = await _facts(ctx).recall()
    if params.key:
        return facts.get(params.key, f"nothing remembered for {params.key!r}")
    return "; ".join(f"{k}: {v}" for k, v in sorted(facts.items())) or "nothing remembered"


@memory.tool("forget", "Forget a fact about this chat.", KeyParams)
async def forget(params: KeyParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """Drop a fact."""
    await _facts(ctx).forget(params.key)
    return f"forgot {params.key}"


# --- http_get ---------------------------------------------------------------------------------


class HttpConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Settings of http_get: which hosts, how long, how much; private addresses opt-in."""

    allowlist: list[str] = msgspec.field(default_factory=list)  # host globs
    timeout_s: float = 5.0
    max_bytes: int = 100_000
    allow_private: bool = False


http_get: Plugin[Any] = Plugin(
    "http_get",
    "1.0.0",
    "Fetch a web page (allowlisted hosts only).",
    config_type=HttpConfig,
    default_policy="deny",
)


class UrlParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Parameters of http_get.fetch."""

    url: str


def check_url(url: str, config: HttpConfig) -> str:
    """The host of `url` if fetching it is allowed, else ToolError saying why."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolError(f"only http(s) URLs with a host can be fetched, not {url!r}")
    host = parts.hostname.lower()
    try:
        addresses = {info[4][0] for info in socket.getaddrinfo(host, parts.port or 443)}
    except OSError:
        raise ToolError(f"cannot resolve {host!r}") from None
    for address in addresses:
        ip = ipaddress.ip_address(str(address).split("%", 1)[0])
        if (ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved) and not (
            config.allow_private
        ):
            raise ToolError(f"refused: {host} is a private or loopback address ({ip})")
    if not any(fnmatchcase(host, pattern.lower()) for pattern in config.allowlist):
        raise ToolError(f"refused: {host} is not in the http_get allowlist")
    return host


@http_get.tool("fetch", "Fetch a URL and return the start of its text.", UrlParams)
async def fetch(params: UrlParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """GET the URL (timeout and size cap from the config)."""
    assert isinstance(config, HttpConfig)
    check_url(params.url, config)

    def get() -> str:
        request = urllib.request.Request(params.url, headers={"User-Agent": "switchboard"})  # noqa: S310
        with urllib.request.urlopen(request, timeout=config.timeout_s) as response:  # noqa: S310
            body: bytes = response.read(config.max_bytes + 1)
        text = body[: config.max_bytes].decode("utf-8", "replace")
        return text + (" [truncated]" if len(body) > config.max_bytes else "")

    try:
        return await asyncio.to_thread(get)
    except OSError as exc:
        raise ToolError(f"fetch failed: {exc}") from None
