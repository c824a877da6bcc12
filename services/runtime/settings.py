"""Typed settings from the environment, validated at start.

A bad value raises ConfigError with one line naming the variable, the value and what
is allowed. Secrets are kept out of repr() so they never reach logs or errors.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, TypeVar, cast
from urllib.parse import urlparse

from contracts.subjects import ACCOUNT_PATTERN
from services.runtime.errors import ConfigError

Role = Literal["all", "core", "whatsapp", "whatsapp-egress", "whatsapp-ingress"]
ROLES: tuple[Role, ...] = ("all", "core", "whatsapp", "whatsapp-egress", "whatsapp-ingress")
TransportName = Literal["sim", "neonize"]
LLMName = Literal["echo", "openai"]
LogFormat = Literal["json", "text"]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
DEFAULT_ACCOUNT = "default"
_ACCOUNT_RE = re.compile(ACCOUNT_PATTERN)
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
N = TypeVar("N", int, float)


@dataclass(frozen=True)
class Secret:
    """A value that must never be printed."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')" if self.value else "Secret('')"

    def __bool__(self) -> bool:
        return bool(self.value)


@dataclass(frozen=True)
class SimFaults:
    """Fault injection for the sim transport."""

    latency_ms: float = 0.0
    failure_rate: float = 0.0
    failing_chats: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Settings:
    """Everything a role needs, parsed and validated."""

    nats_url: str | None
    role: Role = "all"
    data_dir: Path = Path(".svc")
    accounts: tuple[str, ...] = (DEFAULT_ACCOUNT,)
    transport: TransportName = "sim"
    lease_ttl: int = 10
    llm: LLMName = "echo"
    llm_model: str = "echo"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: Secret = Secret("")
    stream_replicas: int = 1
    connect_timeout: float = 5.0
    log_level: str = "INFO"
    log_format: LogFormat = "json"
    sim: SimFaults = SimFaults()

    @property
    def effective_nats_url(self) -> str:
        """The URL to connect to when no embedded server is started."""
        return self.nats_url or DEFAULT_NATS_URL


def load_settings(env: Mapping[str, str] | None = None, *, role: str | None = None) -> Settings:
    """Parse and validate settings from `env` (default: os.environ)."""
    env = os.environ if env is None else env
    get = _Reader(env)
    role_value = role if role is not None else get.get_str("SVC_ROLE", "all")
    llm = get.get_choice("SVC_LLM", "echo", ("echo", "openai"))
    settings = Settings(
        nats_url=get.get_url("NATS_URL"),
        role=cast(Role, _choice("SVC_ROLE", role_value, ROLES)),
        data_dir=Path(get.get_str("SVC_DATA_DIR", ".svc")),
        accounts=get.get_accounts(),
        transport=cast(
            TransportName, get.get_choice("WHATSAPP_TRANSPORT", "sim", ("sim", "neonize"))
        ),
        lease_ttl=get.get_int("WHATSAPP_LEASE_TTL", 10, minimum=2, maximum=3600),
        llm=cast(LLMName, llm),
        llm_model=get.get_str("SVC_LLM_MODEL", "echo" if llm == "echo" else "gpt-4o-mini"),
        openai_base_url=get.get_str("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        openai_api_key=Secret(env.get("OPENAI_API_KEY", "")),
        stream_replicas=get.get_int("SVC_STREAM_REPLICAS", 1, minimum=1, maximum=5),
        connect_timeout=get.get_float("NATS_CONNECT_TIMEOUT", 5.0, minimum=0.1, maximum=300),
        log_level=get.get_choice("SVC_LOG_LEVEL", "INFO", _LOG_LEVELS, upper=True),
        log_format=cast(LogFormat, get.get_choice("SVC_LOG_FORMAT", "json", ("json", "text"))),
        sim=SimFaults(
            latency_ms=get.get_float("SIM_SEND_LATENCY_MS", 0.0, minimum=0, maximum=60_000),
            failure_rate=get.get_float("SIM_FAILURE_RATE", 0.0, minimum=0, maximum=1),
            failing_chats=frozenset(get.get_list("SIM_FAILING_CHATS")),
        ),
    )
    if settings.llm == "openai" and not settings.openai_api_key:
        raise ConfigError("OPENAI_API_KEY is not set: SVC_LLM=openai needs an API key")
    return settings


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(f"{name}={value!r} is invalid: expected one of {', '.join(allowed)}")
    return value


class _Reader:
    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def _raw(self, name: str) -> str | None:
        value = self._env.get(name)
        return None if value is None or value.strip() == "" else value.strip()

    def get_str(self, name: str, default: str) -> str:
        return self._raw(name) or default

    def get_choice(
        self, name: str, default: str, allowed: tuple[str, ...], *, upper: bool = False
    ) -> str:
        raw = self._raw(name)
        if raw is None:
            return default
        return _choice(name, raw.upper() if upper else raw.lower(), allowed)

    def get_int(self, name: str, default: int, *, minimum: int, maximum: int) -> int:
        what = f"a whole number from {minimum} to {maximum}"
        return self._number(name, default, int, minimum, maximum, what)

    def get_float(self, name: str, default: float, *, minimum: float, maximum: float) -> float:
        what = f"a number from {minimum:g} to {maximum:g}"
        return self._number(name, default, float, minimum, maximum, what)

    def _number(self, name: str, default: N, kind: type[N], minimum: N, maximum: N, what: str) -> N:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            value = kind(raw)
        except ValueError:
            raise ConfigError(f"{name}={raw!r} is invalid: expected {what}") from None
        if not minimum <= value <= maximum:
            raise ConfigError(f"{name}={raw!r} is invalid: expected {what}")
        return value

    def get_list(self, name: str) -> list[str]:
        raw = self._raw(name)
        return [] if raw is None else [item.strip() for item in raw.split(",") if item.strip()]

    def get_url(self, name: str) -> str | None:
        raw = self._raw(name)
        if raw is None:
            return None
        for part in raw.split(","):
            parsed = urlparse(part.strip())
            if parsed.scheme not in ("nats", "tls", "ws", "wss") or not parsed.hostname:
                # Never echo a URL that may hold credentials.
                shown = raw if "@" not in raw else "<redacted>"
                raise ConfigError(
                    f"{name}={shown!r} is invalid: expected nats://HOST:PORT"
                    " (comma-separate several servers)"
                )
        return raw

    def get_accounts(self) -> tuple[str, ...]:
        names = self.get_list("WHATSAPP_ACCOUNTS")
        source = "WHATSAPP_ACCOUNTS"
        if not names and (single := self._raw("WHATSAPP_ACCOUNT_ID")):
            names, source = [single], "WHATSAPP_ACCOUNT_ID"
        for name in names:
            if not _ACCOUNT_RE.fullmatch(name):
                raise ConfigError(
                    f"{source} has invalid account {name!r}: use 1-64 of A-Z a-z 0-9 _ -"
                )
        if len(set(names)) != len(names):
            raise ConfigError(f"{source} lists an account twice: {','.join(names)}")
        return tuple(names) or (DEFAULT_ACCOUNT,)
