"""Typed settings from the environment, validated at start.

A bad value raises ConfigError with one line naming the variable, the value and what
is allowed. Secrets are kept out of repr() so they never reach logs or errors.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Literal, TypeVar, cast
from urllib.parse import parse_qsl, urlencode, urlparse, urlunparse

from contracts.subjects import ACCOUNT_PATTERN
from services.runtime.errors import ConfigError
from services.runtime.retry import RetryPolicy

Role = Literal["all", "core", "whatsapp", "whatsapp-egress", "whatsapp-ingress", "web"]
ROLES: tuple[Role, ...] = (
    "all",
    "core",
    "whatsapp",
    "whatsapp-egress",
    "whatsapp-ingress",
    "web",
)
WEB_DEFAULT_PORT = 8080  # role web serves HTTP even when SVC_HTTP_PORT is unset
TransportName = Literal["sim", "neonize", "cloud"]
LLMName = Literal["echo", "openai"]
LogFormat = Literal["auto", "json", "text"]

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


# A Postgres session store without a connect timeout blocks neonize's connect() forever
# when the database is black-holed; this is added to a DSN that sets none (ADR 0019).
DEFAULT_STORE_CONNECT_TIMEOUT = 10
_PG_SCHEMES = ("postgres", "postgresql")


@dataclass(frozen=True)
class SessionStore:
    """Where neonize keeps the accounts' device keys (WHATSAPP_STORE): a SQLite file on one
    host, or a Postgres DSN shared by every host. The DSN may hold a password: it is a
    Secret, and only `shown` (password masked) may reach logs, errors or status."""

    path: Path | None = None
    dsn: Secret = Secret("")

    @property
    def kind(self) -> Literal["sqlite", "postgres"]:
        """`sqlite` or `postgres`."""
        return "postgres" if self.dsn else "sqlite"

    @property
    def connect_timeout(self) -> float:
        """Seconds a Postgres connection attempt may take (from the DSN); 0 for SQLite."""
        if not self.dsn:
            return 0.0
        query = dict(parse_qsl(urlparse(self.dsn.value).query))
        return float(query.get("connect_timeout", DEFAULT_STORE_CONNECT_TIMEOUT))

    @property
    def shown(self) -> str:
        """The store as it may be printed: the path, or the DSN with its password masked."""
        return redact_dsn(self.dsn.value) if self.dsn else str(self.path)

    def __repr__(self) -> str:
        return f"SessionStore({self.shown!r})"


def redact_dsn(dsn: str) -> str:
    """`dsn` with any password (in the user part or the query) replaced by ***."""
    try:
        parsed = urlparse(dsn)
        netloc = parsed.netloc
        if "@" in netloc:
            userinfo, _, hostport = netloc.rpartition("@")
            user, sep, _ = userinfo.partition(":")
            netloc = f"{user}{':***' if sep else ''}@{hostport}"
        query = [
            (k, "***" if k.lower() == "password" else v)
            for k, v in parse_qsl(parsed.query, keep_blank_values=True)
        ]
        return urlunparse(parsed._replace(netloc=netloc, query=urlencode(query, safe="/:")))
    except ValueError:
        return "<unparsable DSN>"


@dataclass(frozen=True)
class NatsSecurity:
    """How to authenticate to NATS and secure the connection (besides NATS_URL)."""

    creds: Path | None = None  # NATS_CREDS: a .creds file (JWT + nkey seed)
    nkey_seed: Path | None = None  # NATS_NKEY_SEED: a seed file
    token: Secret = Secret("")
    user: str = ""
    password: Secret = Secret("")
    tls_ca: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None


@dataclass(frozen=True)
class SimFaults:
    """Fault injection for the sim transport."""

    latency_ms: float = 0.0
    failure_rate: float = 0.0
    failing_chats: frozenset[str] = frozenset()
    auto_receipts: bool = False
    seed: int | None = None


@dataclass(frozen=True)
class RateLimit:
    """A send budget: `per_minute` on average, bursts of up to `burst`."""

    per_minute: float
    burst: int


@dataclass(frozen=True)
class Delivery:
    """How egress retries and resolves uncertain sends."""

    backoff: tuple[float, ...] = (1.0, 2.0, 5.0, 10.0, 30.0)
    uncertain: Literal["resend", "skip"] = "resend"
    rate_limit: RateLimit | None = None  # default for every account; None: unlimited
    rate_limits: tuple[tuple[str, RateLimit | None], ...] = ()  # per-account overrides
    # The send budget around the reply rate (ADR 0024). WHATSAPP_FIRST_CONTACT_RATE: sends
    # to a chat with no inbound within `active_window` s (SVC_ACTIVE_WINDOW) -- `off`
    # refuses them (dead-lettered), a rate budgets them on top of the reply budget, `any`
    # makes no difference (the sim's default: no budget unless configured).
    first_contact: RateLimit | Literal["off", "any"] = "any"
    active_window: float = 600.0
    # SVC_SAME_TEXT_LIMIT / SVC_SAME_TEXT_WINDOW: one text to more than this many chats
    # within the window waits (None: off).
    same_text_limit: int | None = None
    same_text_window: float = 300.0
    # WHATSAPP_BUDGET_RESTORE: after a ban cut the budget doubles every this many seconds.
    restore_step: float = 1800.0

    @cached_property
    def retry(self) -> RetryPolicy:
        """Transport attempts per job (the first plus one per backoff step) and their
        waits: the egress consumer's one retry policy."""
        return RetryPolicy.from_backoff(self.backoff)

    def limit_for(self, account: str) -> RateLimit | None:
        """The send budget of `account`."""
        return dict(self.rate_limits).get(account, self.rate_limit)


@dataclass(frozen=True)
class NeonizeSettings:
    """How the neonize transport runs its sessions (ADR 0021)."""

    # NEONIZE_SEND_TIMEOUT: a send that has no answer by then is reported uncertain
    # (whatsmeow itself waits 75 s for the server's ack).
    send_timeout: float = 10.0
    # NEONIZE_STOP_TIMEOUT: neonize's stop() blocks while a dial is in flight.
    stop_timeout: float = 10.0
    # NEONIZE_BOT_TAG: whether 1:1 sends carry WhatsApp's bot label (on/off, explicit).
    bot_tag: Literal["on", "off"] = "on"
    # A failed initial connect is retried after 1 s, doubling up to 60 s (jittered).
    backoff_initial: float = 1.0
    backoff_max: float = 60.0


# With neonize the send timeout is 10 s: a TTL of 30 s proves 24 s, two sends' worth.
NEONIZE_DEFAULT_LEASE_TTL = 30
# The same for the Cloud API (WHATSAPP_CLOUD_SEND_TIMEOUT, also 10 s by default).
CLOUD_DEFAULT_LEASE_TTL = 30
# A Cloud API number's default throughput is 80 messages/s (more answers 130429): the
# budget default with cloud, as per-minute rate and burst (ADR 0028).
CLOUD_DEFAULT_LIMIT = RateLimit(per_minute=4800, burst=80)


# A real WhatsApp number gets banned for bulk sending. With no official figure, stay at a
# person's pace: one reply every 5 s on average, 3 back to back (a reply in parts).
NEONIZE_DEFAULT_LIMIT = RateLimit(per_minute=12, burst=3)
# A person types a few messages a minute; a burst of 10 covers pasting a list line by line.
DEFAULT_CHAT_RATE = RateLimit(per_minute=20, burst=10)
# The same text to more than 5 chats within SVC_SAME_TEXT_WINDOW waits (a broadcast
# pattern WhatsApp bans for); a person never pastes one message to that many chats.
NEONIZE_SAME_TEXT_LIMIT = 5


PresenceMode = Literal["off", "read", "read+typing"]
PRESENCE_MODES: tuple[str, ...] = ("off", "read", "read+typing")


@dataclass(frozen=True)
class SessionWatch:
    """The owner's zombie watchdog (ADR 0025): SVC_ZOMBIE_AFTER seconds of silence on a
    connected session report it and recycle it (once per cap window); 0 turns it off."""

    zombie_after: float = 900.0


DEFAULT_CLOUD_API_URL = "https://graph.facebook.com"
DEFAULT_CLOUD_API_VERSION = "v21.0"
_CLOUD_API_VERSION_RE = re.compile(r"v\d+\.\d+")
# The keys of one account in WHATSAPP_CLOUD_ACCOUNTS_FILE; every one but phone_number_id
# falls back to the single-account variable of the same name (one Meta app, many numbers).
_CLOUD_KEYS = ("phone_number_id", "token", "app_secret", "verify_token", "template", "language")
_CLOUD_SECRETS = ("token", "app_secret", "verify_token")


@dataclass(frozen=True)
class CloudAccount:
    """One number on the WhatsApp Cloud API (ADR 0026). The token, app secret and verify
    token are Secrets: never in logs, events, status or errors."""

    phone_number_id: str
    token: Secret
    app_secret: Secret
    verify_token: Secret
    template: str = ""  # sent instead when a reply is outside the 24-hour window (131047)
    language: str = "en_US"  # the template's language code


@dataclass(frozen=True)
class CloudSettings:
    """The Cloud API transport's settings: the Graph API base and each account's number."""

    api_url: str = DEFAULT_CLOUD_API_URL
    api_version: str = DEFAULT_CLOUD_API_VERSION
    accounts: tuple[tuple[str, CloudAccount], ...] = ()
    # WHATSAPP_CLOUD_SEND_TIMEOUT: a send with no answer by then is reported uncertain
    # (ADR 0028); the lease proof covers it, so the lease TTL must cover twice this.
    send_timeout: float = 10.0
    # WHATSAPP_CLOUD_CONFIRM_WAIT: how long an uncertain send waits for a status webhook
    # to confirm it (SendLedger.confirmed) before DELIVERY_UNCERTAIN decides.
    confirm_wait: float = 5.0

    def account(self, name: str) -> CloudAccount:
        """The Cloud API configuration of account `name` (KeyError if it has none)."""
        return dict(self.accounts)[name]


def load_cloud_settings(env: Mapping[str, str], accounts: tuple[str, ...]) -> CloudSettings:
    """The Cloud API settings for `accounts` (WHATSAPP_ACCOUNTS), validated: one line per
    problem, never showing a secret. One account may use the single-account variables
    (WHATSAPP_CLOUD_PHONE_NUMBER_ID, _TOKEN, _APP_SECRET, _VERIFY_TOKEN); many use
    WHATSAPP_CLOUD_ACCOUNTS_FILE, a JSON or TOML (*.toml) file of account id -> {
    phone_number_id, token, app_secret, verify_token, template?, language?}, whose
    omitted keys but phone_number_id fall back to those variables."""
    get = _Reader(env)
    api_url = get.get_str("WHATSAPP_CLOUD_API_URL", DEFAULT_CLOUD_API_URL).rstrip("/")
    parsed = urlparse(api_url)
    if parsed.scheme not in ("http", "https") or not parsed.hostname:
        raise ConfigError(
            f"WHATSAPP_CLOUD_API_URL={api_url!r} is invalid: expected http(s)://HOST[:PORT]"
            f" (default {DEFAULT_CLOUD_API_URL})"
        )
    version = get.get_str("WHATSAPP_CLOUD_API_VERSION", DEFAULT_CLOUD_API_VERSION)
    if not _CLOUD_API_VERSION_RE.fullmatch(version):
        raise ConfigError(
            f"WHATSAPP_CLOUD_API_VERSION={version!r} is invalid: expected vMAJOR.MINOR,"
            f" e.g. {DEFAULT_CLOUD_API_VERSION}"
        )
    shared = {key: get.get_str(f"WHATSAPP_CLOUD_{key.upper()}", "") for key in _CLOUD_KEYS}
    path = get.get_file("WHATSAPP_CLOUD_ACCOUNTS_FILE")
    if path is None:
        if len(accounts) != 1:
            raise ConfigError(
                f"WHATSAPP_ACCOUNTS lists {len(accounts)} accounts: give each its number in"
                " WHATSAPP_CLOUD_ACCOUNTS_FILE (account id -> {phone_number_id, token, ...})"
            )
        entries: dict[str, dict[str, str]] = {accounts[0]: {}}
        where = "WHATSAPP_CLOUD_*"
    else:
        entries = _read_cloud_file(path)
        where = str(path)
        for name in entries:
            if name not in accounts:
                raise ConfigError(
                    f"{where} configures account {name!r}, which WHATSAPP_ACCOUNTS does not"
                    f" list ({','.join(accounts)}): add it there or remove it from the file"
                )
    configured: list[tuple[str, CloudAccount]] = []
    numbers: dict[str, str] = {}
    for name in accounts:
        if name not in entries:
            raise ConfigError(
                f"account {name!r} (WHATSAPP_ACCOUNTS) has no entry in {where}: add"
                f" {name!r}: {{phone_number_id, token, app_secret, verify_token}}"
            )
        entry = entries[name]
        value = {key: entry.get(key) or shared[key] for key in _CLOUD_KEYS}
        if path is not None:
            value["phone_number_id"] = entry.get("phone_number_id", "")
        for key in ("phone_number_id", *_CLOUD_SECRETS):
            if not value[key]:
                raise ConfigError(
                    f"account {name!r} has no {key}: set it in {where}"
                    if path is not None
                    else f"WHATSAPP_CLOUD_{key.upper()} is not set: the cloud transport needs"
                    f" it for account {name!r}"
                )
        number = value["phone_number_id"]
        if not number.isdigit():
            raise ConfigError(
                f"account {name!r} has phone_number_id {number!r}: expected the digits of the"
                " Phone number ID shown in the Meta app's WhatsApp API setup (not the phone number)"
            )
        if number in numbers:
            raise ConfigError(
                f"accounts {numbers[number]!r} and {name!r} have the same phone_number_id"
                f" {number}: each account is one number"
            )
        numbers[number] = name
        configured.append(
            (
                name,
                CloudAccount(
                    phone_number_id=number,
                    token=Secret(value["token"]),
                    app_secret=Secret(value["app_secret"]),
                    verify_token=Secret(value["verify_token"]),
                    template=value["template"],
                    language=value["language"] or "en_US",
                ),
            )
        )
    return CloudSettings(
        api_url=api_url,
        api_version=version,
        accounts=tuple(configured),
        send_timeout=get.get_float("WHATSAPP_CLOUD_SEND_TIMEOUT", 10.0, minimum=0.1, maximum=600),
        confirm_wait=get.get_float("WHATSAPP_CLOUD_CONFIRM_WAIT", 5.0, minimum=0, maximum=600),
    )


def _read_cloud_file(path: Path) -> dict[str, dict[str, str]]:
    """WHATSAPP_CLOUD_ACCOUNTS_FILE's accounts; errors name the file and the line, never a
    value (the file holds secrets)."""
    name = f"WHATSAPP_CLOUD_ACCOUNTS_FILE={str(path)!r}"
    text = path.read_text(encoding="utf-8", errors="replace")
    data: object
    if path.suffix.lower() == ".toml":
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{name} is not valid TOML: {exc}") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"{name} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
                " (use a .toml name for TOML)"
            ) from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(
            f"{name} is invalid: expected an object of account id -> {{phone_number_id,"
            " token, app_secret, verify_token, template?}}"
        )
    out: dict[str, dict[str, str]] = {}
    for account, entry in data.items():
        if not _ACCOUNT_RE.fullmatch(account):
            raise ConfigError(
                f"{name} has invalid account {account!r}: use 1-64 of A-Z a-z 0-9 _ -"
            )
        if not isinstance(entry, dict):
            raise ConfigError(f"{name}: account {account!r} must be an object of settings")
        unknown = sorted(set(entry) - set(_CLOUD_KEYS))
        if unknown:
            raise ConfigError(
                f"{name}: account {account!r} has unknown key {unknown[0]!r}: expected"
                f" {', '.join(_CLOUD_KEYS)}"
            )
        for key, value in entry.items():
            if isinstance(value, int) and not isinstance(value, bool) and key == "phone_number_id":
                value = str(value)  # a bare number in the file is fine
            if not isinstance(value, str):
                raise ConfigError(f"{name}: account {account!r} key {key!r} must be a string")
            entry[key] = value.strip()
        out[account] = entry
    return out


@dataclass(frozen=True)
class CoreSettings:
    """How the core runs turns."""

    system_prompt: str = "You are a helpful assistant answering WhatsApp messages. Be brief."
    history_messages: int = 20
    history_chars: int = 8000
    max_tool_rounds: int = 4
    tool_timeout: float = 10.0
    llm_timeout: float = 60.0
    llm_retries: int = 2
    turn_attempts: int = 5
    fallback_reply: str = "Sorry, I could not answer that just now. Please try again later."
    group_replies: Literal["mention", "all", "none"] = "mention"
    # Which replies quote the message they answer (SVC_QUOTE_REPLIES): in a group a quote
    # says whom the agent answers; in a 1:1 chat it only adds noise, so `groups` is the
    # default. `always` / `never` as they say.
    quote_replies: Literal["groups", "always", "never"] = "groups"
    reply_limit: int = 4096
    # Per-chat inbound rate (SVC_CHAT_RATE, None: off) and what happens to a message over
    # it (SVC_CHAT_FLOOD): `hold` answers it later, in order; `refuse` records
    # MessageRefused and never calls the model. See ADR 0015.
    chat_rate: RateLimit | None = DEFAULT_CHAT_RATE
    chat_flood: Literal["hold", "refuse"] = "hold"
    # Access policy (ADR 0023): the reply an unknown sender gets under `approval`
    # (SVC_ACCESS_WAITING_TEXT), at most once per SVC_ACCESS_WAITING_PERIOD seconds.
    access_waiting_text: str = (
        "Thanks for your message. This number only answers approved contacts: your message"
        " has been passed on and will be answered once you are approved."
    )
    access_waiting_period: float = 86_400.0
    # The echo model's simulated thinking time (SVC_ECHO_LATENCY_MS), for load tests.
    echo_latency_ms: float = 0.0
    # Read receipts and typing per account (SVC_PRESENCE, SVC_PRESENCE_ACCOUNTS), ADR 0025.
    presence: PresenceMode = "read+typing"
    presence_accounts: tuple[tuple[str, PresenceMode], ...] = ()

    def presence_for(self, account: str) -> PresenceMode:
        """What `account` shows its chats during a turn."""
        return dict(self.presence_accounts).get(account, self.presence)


@dataclass(frozen=True)
class HttpSettings:
    """The role's HTTP server (webhooks; later health, metrics and the console)."""

    host: str = "127.0.0.1"
    port: int | None = None  # None: no HTTP server; 0: a free port (logged at start)
    # SVC_WEBHOOK_MAX_BYTES: a webhook body over this is refused (413) before it is read whole.
    webhook_max_bytes: int = 1 << 20


@dataclass(frozen=True)
class WebSettings:
    """The console and API (role web, and role all with SVC_HTTP_PORT; ADR 0040)."""

    # SVC_WEB_INSECURE_COOKIES=1: session cookies without `Secure`, for plain-http dev only.
    insecure_cookies: bool = False
    session_ttl: int = 8 * 3600  # SVC_WEB_SESSION_TTL: seconds a login lasts
    login_failures: int = 5  # SVC_WEB_LOGIN_FAILURES: failures per user/address before 429
    login_window: int = 900  # SVC_WEB_LOGIN_WINDOW: seconds a failure is counted for


@dataclass(frozen=True)
class Settings:
    """Everything a role needs, parsed and validated."""

    nats_url: str | None
    role: Role = "all"
    data_dir: Path = Path(".svc")
    accounts: tuple[str, ...] = (DEFAULT_ACCOUNT,)
    transport: TransportName = "sim"
    whatsapp_store: SessionStore = SessionStore(path=Path(".svc") / "whatsapp.sqlite")
    lease_ttl: int = 10
    neonize: NeonizeSettings = NeonizeSettings()
    llm: LLMName = "echo"
    llm_model: str = "echo"
    openai_base_url: str = "https://api.openai.com/v1"
    openai_api_key: Secret = Secret("")
    stream_replicas: int = 1
    connect_timeout: float = 5.0
    # SVC_NATS_MONITOR_PORT: role all's embedded nats-server monitoring port (None: closed).
    nats_monitor_port: int | None = None
    log_level: str = "INFO"
    log_format: LogFormat = "auto"
    nats_security: NatsSecurity = NatsSecurity()
    sim: SimFaults = SimFaults()
    delivery: Delivery = Delivery()
    core: CoreSettings = CoreSettings()
    session: SessionWatch = SessionWatch()
    # Set when WHATSAPP_TRANSPORT=cloud, from load_cloud_settings (ADR 0026).
    cloud: CloudSettings | None = None
    # SVC_HTTP_HOST / SVC_HTTP_PORT: the role's HTTP server (None: none; 0 picks a free port).
    http: HttpSettings = HttpSettings()
    web: WebSettings = WebSettings()

    @property
    def effective_nats_url(self) -> str:
        """The URL to connect to when no embedded server is started."""
        return self.nats_url or DEFAULT_NATS_URL


def load_settings(env: Mapping[str, str] | None = None, *, role: str | None = None) -> Settings:
    """Parse and validate settings from `env` (default: os.environ)."""
    env = os.environ if env is None else env
    get = _Reader(env)
    role_value = role if role is not None else get.get_str("SVC_ROLE", "all")
    if role is not None and role not in ROLES:
        raise ConfigError(
            f"unknown role {role!r} (the ROLE argument): expected one of {', '.join(ROLES)}"
        )
    llm = get.get_choice("SVC_LLM", "echo", ("echo", "openai"))
    data_dir = Path(get.get_str("SVC_DATA_DIR", ".svc"))
    neonize = env.get("WHATSAPP_TRANSPORT", "").strip().lower() == "neonize"
    cloud = env.get("WHATSAPP_TRANSPORT", "").strip().lower() == "cloud"
    settings = Settings(
        nats_url=get.get_url("NATS_URL"),
        role=cast(Role, _choice("SVC_ROLE", role_value, ROLES)),
        data_dir=data_dir,
        accounts=get.get_accounts(),
        transport=cast(
            TransportName, get.get_choice("WHATSAPP_TRANSPORT", "sim", ("sim", "neonize", "cloud"))
        ),
        whatsapp_store=get.get_store("WHATSAPP_STORE", data_dir / "whatsapp.sqlite"),
        lease_ttl=get.get_int(
            "WHATSAPP_LEASE_TTL",
            NEONIZE_DEFAULT_LEASE_TTL if neonize else CLOUD_DEFAULT_LEASE_TTL if cloud else 10,
            minimum=2,
            maximum=3600,
        ),
        neonize=NeonizeSettings(
            send_timeout=get.get_float("NEONIZE_SEND_TIMEOUT", 10.0, minimum=0.1, maximum=600),
            stop_timeout=get.get_float("NEONIZE_STOP_TIMEOUT", 10.0, minimum=0.1, maximum=600),
            bot_tag=cast(
                Literal["on", "off"], get.get_choice("NEONIZE_BOT_TAG", "on", ("on", "off"))
            ),
        ),
        llm=cast(LLMName, llm),
        llm_model=get.get_str("SVC_LLM_MODEL", "echo" if llm == "echo" else "gpt-4o-mini"),
        openai_base_url=get.get_str("OPENAI_BASE_URL", "https://api.openai.com/v1"),
        openai_api_key=Secret(env.get("OPENAI_API_KEY", "")),
        stream_replicas=get.get_int("SVC_STREAM_REPLICAS", 1, minimum=1, maximum=5),
        connect_timeout=get.get_float("NATS_CONNECT_TIMEOUT", 5.0, minimum=0.1, maximum=300),
        nats_monitor_port=get.get_int("SVC_NATS_MONITOR_PORT", 0, minimum=0, maximum=65535)
        if get.is_set("SVC_NATS_MONITOR_PORT")
        else None,
        log_level=get.get_choice("SVC_LOG_LEVEL", "INFO", _LOG_LEVELS, upper=True),
        log_format=cast(
            LogFormat, get.get_choice("SVC_LOG_FORMAT", "auto", ("auto", "json", "text"))
        ),
        nats_security=get.get_security(),
        sim=SimFaults(
            latency_ms=get.get_float("SIM_SEND_LATENCY_MS", 0.0, minimum=0, maximum=60_000),
            failure_rate=get.get_float("SIM_FAILURE_RATE", 0.0, minimum=0, maximum=1),
            failing_chats=frozenset(get.get_list("SIM_FAILING_CHATS")),
            auto_receipts=get.get_bool("SIM_AUTO_RECEIPTS", False),
            seed=get.get_int("SIM_SEED", -1, minimum=-1, maximum=2**31)
            if "SIM_SEED" in env
            else None,
        ),
        delivery=Delivery(
            backoff=get.get_backoff("DELIVERY_BACKOFF", (1.0, 2.0, 5.0, 10.0, 30.0)),
            uncertain=cast(
                Literal["resend", "skip"],
                get.get_choice("DELIVERY_UNCERTAIN", "resend", ("resend", "skip")),
            ),
            rate_limit=get.get_rate(
                "WHATSAPP_RATE_LIMIT",
                NEONIZE_DEFAULT_LIMIT if neonize else CLOUD_DEFAULT_LIMIT if cloud else None,
            ),
            rate_limits=get.get_rates("WHATSAPP_RATE_LIMITS"),
            first_contact=get.get_first_contact(
                "WHATSAPP_FIRST_CONTACT_RATE", "off" if neonize else "any"
            ),
            active_window=get.get_float("SVC_ACTIVE_WINDOW", 600.0, minimum=1, maximum=86_400 * 7),
            same_text_limit=get.get_limit(
                "SVC_SAME_TEXT_LIMIT", NEONIZE_SAME_TEXT_LIMIT if neonize else None
            ),
            same_text_window=get.get_float(
                "SVC_SAME_TEXT_WINDOW", 300.0, minimum=0.01, maximum=86_400
            ),
            restore_step=get.get_float(
                "WHATSAPP_BUDGET_RESTORE", 1800.0, minimum=0.01, maximum=86_400 * 7
            ),
        ),
        core=CoreSettings(
            system_prompt=get.get_str("SVC_SYSTEM_PROMPT", CoreSettings.system_prompt),
            history_messages=get.get_int("SVC_HISTORY_MESSAGES", 20, minimum=0, maximum=1000),
            history_chars=get.get_int("SVC_HISTORY_CHARS", 8000, minimum=0, maximum=200_000),
            max_tool_rounds=get.get_int("SVC_MAX_TOOL_ROUNDS", 4, minimum=0, maximum=50),
            tool_timeout=get.get_float("SVC_TOOL_TIMEOUT", 10.0, minimum=0.1, maximum=600),
            llm_timeout=get.get_float("SVC_LLM_TIMEOUT", 60.0, minimum=0.1, maximum=600),
            llm_retries=get.get_int("SVC_LLM_RETRIES", 2, minimum=0, maximum=20),
            turn_attempts=get.get_int("SVC_TURN_ATTEMPTS", 5, minimum=1, maximum=50),
            fallback_reply=env.get("SVC_FALLBACK_REPLY", CoreSettings.fallback_reply),
            group_replies=cast(
                Literal["mention", "all", "none"],
                get.get_choice("SVC_GROUP_REPLIES", "mention", ("mention", "all", "none")),
            ),
            quote_replies=cast(
                Literal["groups", "always", "never"],
                get.get_choice("SVC_QUOTE_REPLIES", "groups", ("groups", "always", "never")),
            ),
            reply_limit=get.get_int("SVC_REPLY_LIMIT", 4096, minimum=100, maximum=65_536),
            chat_rate=get.get_rate("SVC_CHAT_RATE", DEFAULT_CHAT_RATE),
            chat_flood=cast(
                Literal["hold", "refuse"],
                get.get_choice("SVC_CHAT_FLOOD", "hold", ("hold", "refuse")),
            ),
            echo_latency_ms=get.get_float("SVC_ECHO_LATENCY_MS", 0.0, minimum=0, maximum=60_000),
            access_waiting_text=get.get_str(
                "SVC_ACCESS_WAITING_TEXT", CoreSettings.access_waiting_text
            ),
            access_waiting_period=get.get_float(
                "SVC_ACCESS_WAITING_PERIOD", 86_400.0, minimum=0, maximum=366 * 86_400.0
            ),
            presence=cast(
                PresenceMode, get.get_choice("SVC_PRESENCE", "read+typing", PRESENCE_MODES)
            ),
            presence_accounts=get.get_presences("SVC_PRESENCE_ACCOUNTS"),
        ),
        session=SessionWatch(
            zombie_after=get.get_float("SVC_ZOMBIE_AFTER", 900.0, minimum=0, maximum=86_400),
        ),
        http=HttpSettings(
            host=get.get_str("SVC_HTTP_HOST", "127.0.0.1"),
            port=get.get_int("SVC_HTTP_PORT", 0, minimum=0, maximum=65535)
            if get.is_set("SVC_HTTP_PORT")
            else WEB_DEFAULT_PORT
            if role_value == "web"
            else None,
            webhook_max_bytes=get.get_int(
                "SVC_WEBHOOK_MAX_BYTES", 1 << 20, minimum=1024, maximum=64 << 20
            ),
        ),
        web=WebSettings(
            insecure_cookies=get.get_bool("SVC_WEB_INSECURE_COOKIES", False),
            session_ttl=get.get_int(
                "SVC_WEB_SESSION_TTL", 8 * 3600, minimum=60, maximum=30 * 86_400
            ),
            login_failures=get.get_int("SVC_WEB_LOGIN_FAILURES", 5, minimum=1, maximum=1000),
            login_window=get.get_int("SVC_WEB_LOGIN_WINDOW", 900, minimum=1, maximum=86_400),
        ),
    )
    if settings.transport == "cloud":
        settings = replace(settings, cloud=load_cloud_settings(env, settings.accounts))
    if settings.llm == "openai" and not settings.openai_api_key:
        raise ConfigError("OPENAI_API_KEY is not set: SVC_LLM=openai needs an API key")
    return settings


def _parse_rate(name: str, raw: str) -> RateLimit | None:
    if raw.lower() == "off":
        return None
    per_minute, _, burst = raw.partition(":")
    try:
        rate = RateLimit(per_minute=float(per_minute), burst=int(burst) if burst else 1)
    except ValueError:
        rate = None
    if rate is None or not 0 < rate.per_minute <= 1_000_000 or not 1 <= rate.burst <= 100_000:
        raise ConfigError(
            f"{name}={raw!r} is invalid: expected PER_MINUTE[:BURST] (e.g. 30:5) or off"
        )
    return rate


def _check_dsn(name: str, raw: str) -> str:
    """Validate a Postgres DSN; add connect_timeout if it sets none. Errors never show
    the password."""
    shown = redact_dsn(raw)
    try:
        parsed = urlparse(raw)
        parsed.port  # noqa: B018 -- raises ValueError on a bad port
    except ValueError:
        raise ConfigError(
            f"{name}={shown!r} is invalid: expected postgres://USER:PASSWORD@HOST:PORT/DATABASE"
        ) from None
    query = parse_qsl(parsed.query, keep_blank_values=True)
    host_in_query = any(k == "host" and v for k, v in query)
    if not parsed.hostname and not host_in_query:
        raise ConfigError(
            f"{name}={shown!r} is invalid: no host (postgres://USER:PASSWORD@HOST:PORT/DATABASE,"
            " or ?host=/socket/dir for a Unix socket)"
        )
    timeouts = [v for k, v in query if k == "connect_timeout"]
    if not timeouts:
        query.append(("connect_timeout", str(DEFAULT_STORE_CONNECT_TIMEOUT)))
    elif not timeouts[-1].isdigit() or not 1 <= int(timeouts[-1]) <= 300:
        raise ConfigError(
            f"{name}={shown!r} is invalid: connect_timeout must be whole seconds from 1 to 300"
            " (0 would wait forever)"
        )
    return urlunparse(parsed._replace(query=urlencode(query, safe="/:")))


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

    def is_set(self, name: str) -> bool:
        return self._raw(name) is not None

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

    def get_bool(self, name: str, default: bool) -> bool:
        raw = self._raw(name)
        if raw is None:
            return default
        value = raw.lower()
        if value not in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            raise ConfigError(f"{name}={raw!r} is invalid: expected true or false")
        return value in ("1", "true", "yes", "on")

    def get_backoff(self, name: str, default: tuple[float, ...]) -> tuple[float, ...]:
        raw = self._raw(name)
        if raw is None:
            return default
        try:
            steps = tuple(float(part) for part in raw.split(","))
        except ValueError:
            steps = ()
        if not steps or len(steps) > 50 or any(not 0 <= s <= 3600 for s in steps):
            raise ConfigError(
                f"{name}={raw!r} is invalid: expected comma-separated seconds, e.g. 1,2,5,10,30"
            )
        return steps

    def get_rate(self, name: str, default: RateLimit | None) -> RateLimit | None:
        raw = self._raw(name)
        return default if raw is None else _parse_rate(name, raw)

    def get_first_contact(
        self, name: str, default: RateLimit | Literal["off", "any"]
    ) -> RateLimit | Literal["off", "any"]:
        raw = self._raw(name)
        if raw is None:
            return default
        lowered = raw.strip().lower()
        if lowered in ("off", "any"):
            return cast(Literal["off", "any"], lowered)
        try:
            rate = _parse_rate(name, raw.strip())
        except ConfigError:
            rate = None
        if rate is None:
            raise ConfigError(
                f"{name}={raw!r} is invalid: expected off (refuse first contact), any (no"
                " separate budget) or PER_MINUTE[:BURST] (e.g. 2:1)"
            )
        return rate

    def get_limit(self, name: str, default: int | None) -> int | None:
        raw = self._raw(name)
        if raw is None:
            return default
        if raw.strip().lower() == "off":
            return None
        return self.get_int(name, default or 1, minimum=1, maximum=100_000)

    def get_rates(self, name: str) -> tuple[tuple[str, RateLimit | None], ...]:
        out = []
        for item in self.get_list(name):
            account, sep, rate = item.partition("=")
            if not sep or not _ACCOUNT_RE.fullmatch(account.strip()):
                raise ConfigError(
                    f"{name} has invalid entry {item!r}:"
                    " expected ACCOUNT=PER_MINUTE[:BURST] or ACCOUNT=off"
                )
            out.append((account.strip(), _parse_rate(name, rate.strip())))
        return tuple(out)

    def get_presences(self, name: str) -> tuple[tuple[str, PresenceMode], ...]:
        out = []
        for item in self.get_list(name):
            account, sep, mode = item.partition("=")
            mode = mode.strip().lower()
            if not sep or not _ACCOUNT_RE.fullmatch(account.strip()) or mode not in PRESENCE_MODES:
                raise ConfigError(
                    f"{name} has invalid entry {item!r}: expected ACCOUNT=MODE with MODE one of"
                    f" {', '.join(PRESENCE_MODES)} (e.g. {name}=support=off)"
                )
            out.append((account.strip(), cast(PresenceMode, mode)))
        return tuple(out)

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

    def get_store(self, name: str, default: Path) -> SessionStore:
        raw = self._raw(name)
        if raw is None:
            return SessionStore(path=default)
        scheme = raw.partition("://")[0].lower() if "://" in raw else ""
        if scheme in _PG_SCHEMES:
            return SessionStore(dsn=Secret(_check_dsn(name, raw)))
        if scheme:
            raise ConfigError(
                f"{name}={redact_dsn(raw)!r} is invalid: expected a SQLite file path"
                " or a postgres://USER:PASSWORD@HOST:PORT/DATABASE DSN"
            )
        if "?" in raw or "#" in raw:
            # neonize opens `file:<path>?_foreign_keys=on`: these would change the URI.
            raise ConfigError(
                f"{name}={raw!r} is invalid: a SQLite path may not contain '?' or '#'"
            )
        path = Path(raw).expanduser()
        if path.is_dir():
            raise ConfigError(
                f"{name}={raw!r} is invalid: it is a directory; give a file path,"
                f" e.g. {raw.rstrip('/')}/whatsapp.sqlite"
            )
        return SessionStore(path=path)

    def get_file(self, name: str) -> Path | None:
        raw = self._raw(name)
        if raw is None:
            return None
        path = Path(raw).expanduser()
        if not path.is_file():
            raise ConfigError(f"{name}={raw!r} is invalid: no such file (give the path of a file)")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{name}={raw!r} is invalid: the file is not readable by this user")
        return path

    def get_security(self) -> NatsSecurity:
        security = NatsSecurity(
            creds=self.get_file("NATS_CREDS"),
            nkey_seed=self.get_file("NATS_NKEY_SEED"),
            token=Secret(self._raw("NATS_TOKEN") or ""),
            user=self.get_str("NATS_USER", ""),
            password=Secret(self._raw("NATS_PASSWORD") or ""),
            tls_ca=self.get_file("NATS_TLS_CA"),
            tls_cert=self.get_file("NATS_TLS_CERT"),
            tls_key=self.get_file("NATS_TLS_KEY"),
        )
        if bool(security.user) != bool(security.password):
            raise ConfigError("NATS_USER and NATS_PASSWORD go together: set both or neither")
        if bool(security.tls_cert) != bool(security.tls_key):
            raise ConfigError("NATS_TLS_CERT and NATS_TLS_KEY go together: set both or neither")
        if security.creds and security.nkey_seed:
            raise ConfigError("NATS_CREDS and NATS_NKEY_SEED exclude each other: set one")
        ways = [
            bool(security.creds or security.nkey_seed),
            bool(security.token),
            bool(security.user),
        ]
        if sum(ways) > 1:
            raise ConfigError(
                "set one way to log in to NATS: NATS_CREDS or NATS_NKEY_SEED,"
                " NATS_TOKEN, or NATS_USER + NATS_PASSWORD"
            )
        if (security.creds or security.nkey_seed) and importlib.util.find_spec("nkeys") is None:
            name = "NATS_CREDS" if security.creds else "NATS_NKEY_SEED"
            raise ConfigError(f"{name} needs the 'nkeys' package: pip install nkeys")
        return security

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
