"""The web side's identity (ADR 0040): console users, API tokens, sessions, login throttling.

Records live in KV buckets (`web_users`, `web_tokens`, `web_sessions`, `web_throttle`) so
every `svc run web` replica sees a change at once; every change is also recorded as an
event on the `WEB` stream (`web.users.<name>`, `web.tokens.<id>`, `web.logins.<name>`),
the audit trail. No secret is ever in an event: not a password, a token, a hash or a
session id (session keys in KV are the sha256 of the cookie's value).
"""

from __future__ import annotations

import re
from typing import Annotated, Literal

import msgspec

from contracts.events import Event, UtcDatetime

WebRole = Literal["viewer", "operator", "admin"]
WEB_ROLES: tuple[WebRole, ...] = ("viewer", "operator", "admin")
# What each role may do includes everything the roles before it may (DESIGN.md).
ROLE_RANK: dict[str, int] = {role: rank for rank, role in enumerate(WEB_ROLES)}

# User and token names: one subject token and one KV key, readable in a log line.
NAME_PATTERN = r"[A-Za-z0-9_-]{1,64}"
_NAME_RE = re.compile(NAME_PATTERN)
# A token id: 12 lowercase hex digits, the public part of a bearer token.
TOKEN_ID_PATTERN = r"[0-9a-f]{12}"  # noqa: S105 (a pattern, not a secret)
_TOKEN_ID_RE = re.compile(TOKEN_ID_PATTERN)
# Bearer tokens look like `sbt_<id>_<secret>`: the id finds the record, the secret is
# checked against its sha256. The prefix lets secret scanners recognise a leaked token.
TOKEN_PREFIX = "sbt_"  # noqa: S105 (a prefix, not a secret)
UNKNOWN_USER = "_"  # the subject token of a login attempt under a name no user can have

Name = Annotated[str, msgspec.Meta(pattern=f"^{NAME_PATTERN}$")]


class WebContractError(ValueError):
    """A name, role or token id that cannot be used (the message says why, in one line)."""


def check_name(name: str, what: str = "user name") -> str:
    """`name` if it is a valid user or token name, else WebContractError (one line)."""
    if not _NAME_RE.fullmatch(name):
        shown = name if len(name) <= 40 else name[:40] + "..."
        raise WebContractError(f"{what} {shown!r} is invalid: use 1-64 letters, digits, '_' or '-'")
    return name


def check_role(role: str) -> WebRole:
    """`role` if it is one of viewer, operator, admin, else WebContractError."""
    if role not in WEB_ROLES:
        raise WebContractError(f"unknown role {role!r}: expected one of {', '.join(WEB_ROLES)}")
    return role


def check_token_id(token_id: str) -> str:
    """`token_id` if it has the shape of a token id, else WebContractError."""
    if not _TOKEN_ID_RE.fullmatch(token_id):
        raise WebContractError(f"{token_id[:40]!r} is not a token id (12 hex digits)")
    return token_id


def allows(role: str, needed: str) -> bool:
    """Whether `role` may do what `needed` may (viewer < operator < admin)."""
    return ROLE_RANK.get(role, -1) >= ROLE_RANK[needed]


# --- KV records --------------------------------------------------------------------------


class UserRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A console user (`web_users`, key `<name>`). `password_hash` is argon2id (PHC string)."""

    name: str
    role: WebRole
    password_hash: str
    created_at: UtcDatetime
    # Sessions remember this: a user removed and added again under the same name does not
    # get the old user's sessions back.
    user_id: str = ""


class TokenRecord(msgspec.Struct, frozen=True, kw_only=True):
    """An API token (`web_tokens`, key `<id>`); `hash` is the sha256 (hex) of its secret."""

    id: str
    name: str
    role: WebRole
    hash: str
    created_at: UtcDatetime
    last_used: UtcDatetime | None = None


class SessionRecord(msgspec.Struct, frozen=True, kw_only=True):
    """A console session (`web_sessions`, key: sha256 hex of the cookie's value; per-key
    TTL = the session's lifetime). `csrf` is the token forms and cookie API calls echo."""

    user: str
    user_id: str
    role: WebRole
    csrf: str
    created_at: UtcDatetime
    client: str = ""


class ThrottleRecord(msgspec.Struct, frozen=True, kw_only=True):
    """Failed logins counted under one key (`web_throttle`, `user.<name>` or
    `addr.<address>`; per-key TTL = the throttle window, renewed by each failure)."""

    failures: int
    last_at: UtcDatetime


# --- Events (the audit trail, on WEB) ----------------------------------------------------


class UserAdded(Event, frozen=True, kw_only=True):
    """A console user was created."""

    name: str
    role: WebRole
    actor: str = ""
    via: str = "cli"


class UserRemoved(Event, frozen=True, kw_only=True):
    """A console user was removed; `sessions_ended` of their sessions were ended."""

    name: str
    actor: str = ""
    via: str = "cli"
    sessions_ended: int = 0


class TokenCreated(Event, frozen=True, kw_only=True):
    """An API token was created (its secret was shown once, never stored)."""

    token_id: str
    name: str
    role: WebRole
    actor: str = ""
    via: str = "cli"


class TokenRevoked(Event, frozen=True, kw_only=True):
    """An API token was revoked."""

    token_id: str
    name: str
    actor: str = ""
    via: str = "cli"


class LoginSucceeded(Event, frozen=True, kw_only=True):
    """A user logged in to the console from `client`."""

    user: str
    client: str = ""


class LoginFailed(Event, frozen=True, kw_only=True):
    """A login was refused: `reason` is bad_credentials or throttled. `user` is `_` when
    the name typed is no user's (it may be a password typed in the wrong field)."""

    user: str
    client: str = ""
    reason: str = "bad_credentials"


class LoggedOut(Event, frozen=True, kw_only=True):
    """A console session ended by logging out."""

    user: str
    client: str = ""


WebEvent = (
    UserAdded | UserRemoved | TokenCreated | TokenRevoked | LoginSucceeded | LoginFailed | LoggedOut
)
WEB_EVENT_TYPES: tuple[type[Event], ...] = (
    UserAdded,
    UserRemoved,
    TokenCreated,
    TokenRevoked,
    LoginSucceeded,
    LoginFailed,
    LoggedOut,
)


# --- Subjects ----------------------------------------------------------------------------


def user_subject(name: str) -> str:
    """Where a user's lifecycle events go."""
    return f"web.users.{check_name(name)}"


def token_subject(token_id: str) -> str:
    """Where a token's lifecycle events go."""
    return f"web.tokens.{check_token_id(token_id)}"


def login_subject(user: str) -> str:
    """Where login, failed-login and logout events of `user` go (`_`: not a valid name)."""
    return f"web.logins.{user if _NAME_RE.fullmatch(user) else UNKNOWN_USER}"


def throttle_key(kind: Literal["user", "addr"], value: str) -> str:
    """The `web_throttle` key of a user name or a client address (made key-safe)."""
    safe = re.sub(r"[^A-Za-z0-9_-]", "_", value)[:128] or "_"
    return f"{kind}.{safe}"
