"""The built-in plugins, registered through the same entry points as third-party ones."""

from __future__ import annotations

import ast
import http.client
import ipaddress
import math
import operator
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from fnmatch import fnmatchcase
from typing import Any
from urllib.parse import urljoin, urlsplit
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


# Where a URL may lead (docs/plugins.md has the table). The host must match the allowlist
# and *every* address it resolves to must pass `refusal`; the connection then goes to the
# checked address (no second lookup, so DNS rebinding cannot swap it), and a redirect is
# followed only after the same checks on its target, MAX_REDIRECTS hops at most.
MAX_REDIRECTS = 3

Resolver = Callable[[str, int], list[str]]
Address = ipaddress.IPv4Address | ipaddress.IPv6Address

# Refused whatever the config says: cloud metadata services (AWS/GCP/Azure/OpenStack,
# ECS task metadata, Alibaba, AWS over IPv6, Azure's wire server), and ranges that are
# never a web server.
_METADATA = frozenset(
    ipaddress.ip_address(a)
    for a in (
        "169.254.169.254",
        "169.254.170.2",
        "169.254.169.253",
        "100.100.100.200",
        "168.63.129.16",
        "fd00:ec2::254",
    )
)
_NEVER = (
    ("unspecified", ipaddress.ip_network("0.0.0.0/8")),
    ("IETF protocol assignments", ipaddress.ip_network("192.0.0.0/24")),
    ("multicast", ipaddress.ip_network("224.0.0.0/4")),
    ("reserved", ipaddress.ip_network("240.0.0.0/4")),
    ("multicast", ipaddress.ip_network("ff00::/8")),
    ("site-local", ipaddress.ip_network("fec0::/10")),
    ("Teredo", ipaddress.ip_network("2001::/32")),
)
# Refused unless allow_private (an intranet deployment): every non-global address.
_CARRIER_NAT = ipaddress.ip_network("100.64.0.0/10")


def _embedded_ipv4(ip: Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 address stands for (mapped, NAT64, 6to4), if any."""
    if not isinstance(ip, ipaddress.IPv6Address):
        return None
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in ipaddress.ip_network("64:ff9b::/96") or ip in ipaddress.ip_network("64:ff9b:1::/48"):
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: Address, *, allow_private: bool = False) -> str | None:
    """Why http_get must not connect to `ip` (None: it may)."""
    inner = _embedded_ipv4(ip)
    if inner is not None:
        why = refusal(inner, allow_private=allow_private)
        return f"{why} ({inner}, inside an IPv6 address)" if why else None
    if ip in _METADATA:
        return "a cloud metadata address"
    if ip.is_unspecified:
        return "an unspecified address"
    if ip.is_multicast:
        return "a multicast address"
    for kind, network in _NEVER:
        if ip.version == network.version and ip in network:
            return f"an address in {network} ({kind})"
    if allow_private:
        return None
    if ip.version == 4 and ip in _CARRIER_NAT:
        return "a carrier-grade NAT address (100.64.0.0/10)"
    if ip.is_private or ip.is_loopback or ip.is_link_local or not ip.is_global:
        return "a private or loopback address"
    return None


def system_resolver(host: str, port: int) -> list[str]:
    """The host's addresses, from the system resolver."""
    return [str(info[4][0]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]


@dataclass(frozen=True)
class Target:
    """A checked URL: where to connect (`address`) and what to ask for."""

    scheme: str
    host: str
    port: int
    address: str
    path: str


def check_url(url: str, config: HttpConfig, resolve: Resolver = system_resolver) -> Target:
    """Where fetching `url` would connect, if it is allowed; else ToolError saying why."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ToolError(f"not a valid URL: {url!r}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ToolError(f"only http(s) URLs with a host can be fetched, not {url!r}")
    host = parts.hostname.lower()
    if not any(fnmatchcase(host, pattern.lower()) for pattern in config.allowlist):
        raise ToolError(f"refused: {host} is not in the http_get allowlist")
    port = port or (443 if parts.scheme == "https" else 80)
    try:
        addresses = [ipaddress.ip_address(a.split("%", 1)[0]) for a in resolve(host, port)]
    except (OSError, UnicodeError, ValueError):
        raise ToolError(f"cannot resolve {host!r}") from None
    if not addresses:
        raise ToolError(f"cannot resolve {host!r}")
    for ip in addresses:  # one bad address refuses the host: no racing between them
        why = refusal(ip, allow_private=config.allow_private)
        if why is not None:
            raise ToolError(f"refused: {host} resolves to {ip}, {why}")
    path = parts.path or "/"
    return Target(
        parts.scheme,
        host,
        port,
        str(addresses[0]),
        path + (f"?{parts.query}" if parts.query else ""),
    )


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to the checked address; Host names the host."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(target.host, target.port, timeout=timeout)
        self.address = target.address

    def connect(self) -> None:
        self.sock = socket.create_connection((self.address, self.port), self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to the checked address; SNI and the certificate check use the host name."""

    def __init__(self, target: Target, timeout: float) -> None:
        self.tls = ssl.create_default_context()
        super().__init__(target.host, target.port, timeout=timeout, context=self.tls)
        self.address = target.address

    def connect(self) -> None:
        sock = socket.create_connection((self.address, self.port), self.timeout)
        self.sock = self.tls.wrap_socket(sock, server_hostname=self.host)


_REDIRECTS = frozenset({301, 302, 303, 307, 308})


def fetch_url(url: str, config: HttpConfig, resolve: Resolver = system_resolver) -> str:
    """GET `url` (blocking): every hop checked, connected to the address that was checked;
    the start of the body as text. ToolError for anything refused or failed."""
    for _ in range(MAX_REDIRECTS + 1):
        target = check_url(url, config, resolve)
        pinned = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
        conn = pinned(target, config.timeout_s)
        response: http.client.HTTPResponse | None = None
        try:
            conn.request(
                "GET",
                target.path,
                headers={"User-Agent": "switchboard", "Accept-Encoding": "identity"},
            )
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                location = response.getheader("Location")
                if not location:
                    raise ToolError(f"fetch failed: HTTP {response.status} without a Location")
                url = urljoin(url, location)
                continue
            if response.status >= 400:
                raise ToolError(f"fetch failed: HTTP {response.status} {response.reason}")
            body: bytes = response.read(config.max_bytes + 1)
        except (OSError, http.client.HTTPException) as exc:
            raise ToolError(f"fetch failed: {type(exc).__name__}: {exc}") from None
        finally:
            if response is not None:
                response.close()
            conn.close()
        text = body[: config.max_bytes].decode("utf-8", "replace")
        return text + (" [truncated]" if len(body) > config.max_bytes else "")
    raise ToolError(f"refused: more than {MAX_REDIRECTS} redirects")


# Blocking I/O: a daemon thread; every socket operation is bounded by timeout_s.
@http_get.tool("fetch", "Fetch a URL and return the start of its text.", UrlParams, run="thread")
def fetch(params: UrlParams, config: msgspec.Struct, ctx: ToolContext) -> str:
    """GET the URL (allowlist, address rules, timeout and size cap from the config)."""
    assert isinstance(config, HttpConfig)
    return fetch_url(params.url, config)
