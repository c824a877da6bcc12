"""Users, API tokens, sessions and login throttling, stored in JetStream KV (ADR 0040).

Every replica reads the buckets on every request (no cache), so a logout, a revoked token
or a removed user is seen by all of them at once. Writes are revision-checked; sessions
and failed-login counters expire by per-key TTL. Each change is also recorded on `WEB`.
Secrets never leave this module except the two values shown once to their owner: a new
token (`create_token`) and a new session cookie (`login`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Literal, TypeVar

import msgspec
import nats.js.errors
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from nats.js.kv import KeyValue

from contracts.codec import decode, encode
from contracts.errors import ContractError
from contracts.events import Event, new_id, utcnow
from contracts.streams import WEB_SESSIONS, WEB_THROTTLE, WEB_TOKENS, WEB_USERS
from contracts.web import (
    TOKEN_PREFIX,
    UNKNOWN_USER,
    LoggedOut,
    LoginFailed,
    LoginSucceeded,
    SessionRecord,
    ThrottleRecord,
    TokenCreated,
    TokenRecord,
    TokenRevoked,
    UserAdded,
    UserRecord,
    UserRemoved,
    WebContractError,
    WebRole,
    check_name,
    check_role,
    check_token_id,
    login_subject,
    throttle_key,
    token_subject,
    user_subject,
)
from services.runtime.bus import Bus
from services.runtime.errors import ServiceError
from services.runtime.metrics import instruments

log = logging.getLogger(__name__)

T = TypeVar("T")
_MISSING = (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError)
_WRONG_SEQUENCE = 10071
MAX_PASSWORD_CHARS = 1024  # argon2 hashes anything; a bound keeps a request cheap
MIN_PASSWORD_CHARS = 8
LAST_USED_EVERY = 60.0  # seconds between `last_used` writes of one token
_LOGIN_OK = {"outcome": "ok"}
_LOGIN_FAILED = {"outcome": "failed"}
_LOGIN_THROTTLED = {"outcome": "throttled"}


class IdentityError(ServiceError):
    """A refused identity change or lookup; the message is one line, never a secret."""

    status = 409
    code = "conflict"


class UnknownError(IdentityError):
    """No such user or token."""

    status = 404
    code = "not_found"


class InvalidError(IdentityError):
    """A name, role or password that cannot be used."""

    status = 422
    code = "invalid"


class BadCredentialsError(IdentityError):
    """Wrong user name or password (which one is never said)."""

    status = 401
    code = "bad_credentials"


class ThrottledError(IdentityError):
    """Too many failed logins for this user or address; retry after `retry_after` s."""

    status = 429
    code = "throttled"

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


@dataclass(frozen=True)
class Principal:
    """Who makes a request: a logged-in user (with the session's CSRF token) or a token."""

    name: str
    kind: Literal["user", "token"]
    role: WebRole
    csrf: str = ""  # a session's; empty for a bearer token (which needs none)


@dataclass(frozen=True)
class Throttle:
    """Failed logins allowed per user and per address within `window` seconds."""

    failures: int = 5
    window: int = 900


def sha256_hex(value: str) -> str:
    """The sha256 (hex) of `value`: how token secrets and session ids are stored."""
    return hashlib.sha256(value.encode()).hexdigest()


def check_password(password: str) -> str:
    """`password` if usable, else InvalidError (one line, never the password)."""
    if not password:
        raise InvalidError("the password is empty: give one on stdin (--password-stdin)")
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidError(f"the password is too short: at least {MIN_PASSWORD_CHARS} characters")
    if len(password) > MAX_PASSWORD_CHARS:
        raise InvalidError(f"the password is too long: at most {MAX_PASSWORD_CHARS} characters")
    return password


def _valid(name: str) -> bool:
    try:
        check_name(name)
    except WebContractError:
        return False
    return True


def _checked(check: Callable[[str], str], value: str) -> str:
    try:
        return check(value)
    except WebContractError as exc:
        raise InvalidError(str(exc)) from None


def _role(value: str) -> WebRole:
    try:
        return check_role(value)
    except WebContractError as exc:
        raise InvalidError(str(exc)) from None


class Identity:
    """The identity store on one connection. `hasher` is argon2id (argon2-cffi's defaults:
    RFC 9106's low-memory profile); hashing runs off the event loop."""

    def __init__(
        self,
        bus: Bus,
        *,
        throttle: Throttle = Throttle(),
        session_ttl: int = 8 * 3600,
        hasher: PasswordHasher | None = None,
    ) -> None:
        self.bus = bus
        self.throttle = throttle
        self.session_ttl = session_ttl
        self.hasher = hasher or PasswordHasher()
        self._buckets: dict[str, KeyValue] = {}
        self._dummy_hash: str | None = None

    async def _kv(self, name: str) -> KeyValue:
        kv = self._buckets.get(name)
        if kv is None:
            kv = self._buckets[name] = await self.bus.js.key_value(name)
        return kv

    async def _record(self, subject: str, event: Event) -> None:
        await self.bus.publish(subject, event)

    # --- users ---------------------------------------------------------------------------

    async def add_user(
        self, name: str, role: str, password: str, *, actor: str, via: str = "cli"
    ) -> UserRecord:
        """Create a user; InvalidError on a bad name/role/password, IdentityError if taken."""
        name = _checked(check_name, name)
        valid_role = _role(role)
        check_password(password)
        hashed = await asyncio.to_thread(self.hasher.hash, password)
        record = UserRecord(
            name=name, role=valid_role, password_hash=hashed, created_at=utcnow(), user_id=new_id()
        )
        kv = await self._kv(WEB_USERS.name)
        try:
            await kv.create(name, encode(record))
        except nats.js.errors.KeyWrongLastSequenceError:
            raise IdentityError(f"user {name!r} already exists (remove it first)") from None
        await self._record(
            user_subject(name), UserAdded(name=name, role=valid_role, actor=actor, via=via)
        )
        return record

    async def user(self, name: str) -> UserRecord | None:
        """The user called `name`, or None."""
        try:
            check_name(name)
        except WebContractError:
            return None
        found = await self._get(WEB_USERS.name, name, UserRecord)
        return found[0] if found else None

    async def users(self) -> list[UserRecord]:
        """Every user, by name."""
        return sorted(
            (r for r, _ in await self._all_keyed(WEB_USERS.name, UserRecord)), key=lambda u: u.name
        )

    async def remove_user(self, name: str, *, actor: str, via: str = "cli") -> int:
        """Remove a user and end their sessions everywhere; how many sessions ended."""
        name = _checked(check_name, name)
        found = await self._get(WEB_USERS.name, name, UserRecord)
        if found is None:
            raise UnknownError(f"no user {name!r}: see 'svc users ls'")
        kv = await self._kv(WEB_USERS.name)
        try:
            await kv.delete(name, last=found[1])
        except nats.js.errors.APIError:
            raise IdentityError(f"user {name!r} changed while removing it; retry") from None
        ended = await self._end_sessions(lambda s: s.user == name)
        await self._record(
            user_subject(name),
            UserRemoved(name=name, actor=actor, via=via, sessions_ended=ended),
        )
        return ended

    # --- tokens --------------------------------------------------------------------------

    async def create_token(
        self, name: str, role: str, *, actor: str, via: str = "cli"
    ) -> tuple[TokenRecord, str]:
        """Create a token; return its record and the bearer string (shown once, never kept)."""
        name = _checked(check_name, name)
        valid_role = _role(role)
        if any(t.name == name for t in await self.tokens()):
            raise IdentityError(f"a token named {name!r} exists: revoke it or pick another name")
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        record = TokenRecord(
            id=token_id,
            name=name,
            role=valid_role,
            hash=sha256_hex(secret),
            created_at=utcnow(),
        )
        kv = await self._kv(WEB_TOKENS.name)
        await kv.create(token_id, encode(record))
        await self._record(
            token_subject(token_id),
            TokenCreated(token_id=token_id, name=name, role=valid_role, actor=actor, via=via),
        )
        return record, f"{TOKEN_PREFIX}{token_id}_{secret}"

    async def tokens(self) -> list[TokenRecord]:
        """Every live token, by name."""
        return sorted(
            (r for r, _ in await self._all_keyed(WEB_TOKENS.name, TokenRecord)),
            key=lambda t: t.name,
        )

    async def find_token(self, ref: str) -> TokenRecord:
        """The token `ref` names (its id or its name), or UnknownError."""
        for token in await self.tokens():
            if ref in (token.id, token.name):
                return token
        raise UnknownError(f"no token with id or name {ref[:64]!r}: see 'svc tokens ls'")

    async def revoke_token(self, ref: str, *, actor: str, via: str = "cli") -> TokenRecord:
        """Revoke the token `ref` names (id or name); it is refused at once everywhere."""
        token = await self.find_token(ref)
        kv = await self._kv(WEB_TOKENS.name)
        await kv.delete(token.id)
        await self._record(
            token_subject(token.id),
            TokenRevoked(token_id=token.id, name=token.name, actor=actor, via=via),
        )
        return token

    async def check_token(self, bearer: str) -> Principal | None:
        """The principal of a bearer token, or None when it is malformed, unknown or revoked."""
        if not bearer.startswith(TOKEN_PREFIX) or len(bearer) > 200:
            return None
        token_id, sep, secret = bearer[len(TOKEN_PREFIX) :].partition("_")
        try:
            check_token_id(token_id)
        except WebContractError:
            return None
        if not sep or not secret:
            return None
        found = await self._get(WEB_TOKENS.name, token_id, TokenRecord)
        if found is None:
            return None
        record, revision = found
        if not hmac.compare_digest(record.hash, sha256_hex(secret)):
            return None
        await self._touch(record, revision)
        return Principal(name=record.name, kind="token", role=record.role)

    async def _touch(self, record: TokenRecord, revision: int) -> None:
        """Record `last_used`, at most once a minute per token (best effort)."""
        now = utcnow()
        if record.last_used and (now - record.last_used).total_seconds() < LAST_USED_EVERY:
            return
        kv = await self._kv(WEB_TOKENS.name)
        touched = msgspec.structs.replace(record, last_used=now)
        # Another replica touched it (or it was revoked just now): either is fine.
        with contextlib.suppress(nats.js.errors.APIError):
            await kv.update(record.id, encode(touched), last=revision)

    # --- sessions ------------------------------------------------------------------------

    async def login(self, name: str, password: str, client: str) -> tuple[str, SessionRecord]:
        """Check the password (throttled per user and per address); start a session.
        Returns the cookie value (shown once to the browser) and the session."""
        # A name that is no user's is never stored as typed, not even in a key: people type
        # their password into the user field. It is recorded as `_`, counted under a hash.
        keys = [
            throttle_key("user", sha256_hex(name)[:32]),
            throttle_key("addr", client or "unknown"),
        ]
        found = await self._get(WEB_USERS.name, name, UserRecord) if _valid(name) else None
        shown = found[0].name if found else UNKNOWN_USER
        await self._refuse_if_throttled(shown, client, keys)
        ok = await asyncio.to_thread(
            self._verify, found[0].password_hash if found else None, password[:MAX_PASSWORD_CHARS]
        )
        if found is None or not ok:
            for key in keys:
                await self._fail(key)
            await self._record(login_subject(shown), LoginFailed(user=shown, client=client))
            instruments().web_logins.add(1, _LOGIN_FAILED)
            raise BadCredentialsError("wrong user name or password")
        user = found[0]
        await self._forget(keys[0])  # a success clears the user's counter, not the address's
        cookie = secrets.token_urlsafe(32)
        session = SessionRecord(
            user=user.name,
            user_id=user.user_id,
            role=user.role,
            csrf=secrets.token_urlsafe(24),
            created_at=utcnow(),
            client=client,
        )
        kv = await self._kv(WEB_SESSIONS.name)
        await kv.create(sha256_hex(cookie), encode(session), msg_ttl=self.session_ttl)
        await self._record(login_subject(user.name), LoginSucceeded(user=user.name, client=client))
        instruments().web_logins.add(1, _LOGIN_OK)
        return cookie, session

    def _verify(self, hashed: str | None, password: str) -> bool:
        """argon2 verification; an unknown user costs the same (a dummy hash is checked)."""
        if hashed is None:
            if self._dummy_hash is None:
                self._dummy_hash = self.hasher.hash(secrets.token_urlsafe(16))
            hashed = self._dummy_hash
            password = "\x00" + password  # never equal to the random dummy
        try:
            return self.hasher.verify(hashed, password)
        except (VerificationError, InvalidHashError):
            return False

    async def session(self, cookie: str) -> Principal | None:
        """The principal of a session cookie, or None when it is unknown, expired, ended,
        or its user was removed (or removed and added again)."""
        if not cookie or len(cookie) > 200:
            return None
        found = await self._get(WEB_SESSIONS.name, sha256_hex(cookie), SessionRecord)
        if found is None:
            return None
        session = found[0]
        user = await self.user(session.user)
        if user is None or user.user_id != session.user_id:
            return None
        return Principal(name=user.name, kind="user", role=user.role, csrf=session.csrf)

    async def logout(self, cookie: str, client: str) -> bool:
        """End the session of `cookie` everywhere; whether there was one."""
        key = sha256_hex(cookie)
        found = await self._get(WEB_SESSIONS.name, key, SessionRecord)
        if found is None:
            return False
        kv = await self._kv(WEB_SESSIONS.name)
        await kv.delete(key)
        await self._record(
            login_subject(found[0].user), LoggedOut(user=found[0].user, client=client)
        )
        return True

    async def _end_sessions(self, which: Callable[[SessionRecord], bool]) -> int:
        kv = await self._kv(WEB_SESSIONS.name)
        ended = 0
        for session, key in await self._all_keyed(WEB_SESSIONS.name, SessionRecord):
            if which(session):
                await kv.delete(key)
                ended += 1
        return ended

    # --- login throttling ----------------------------------------------------------------

    async def _refuse_if_throttled(self, name: str, client: str, keys: list[str]) -> None:
        """429 when a key counted too many failures; `name` is what the event records."""
        now = utcnow()
        for key in keys:
            found = await self._get(WEB_THROTTLE.name, key, ThrottleRecord)
            if found is None or found[0].failures < self.throttle.failures:
                continue
            until = found[0].last_at + timedelta(seconds=self.throttle.window)
            if until <= now:
                continue
            retry = max(1, math.ceil((until - now).total_seconds()))
            await self._record(
                login_subject(name), LoginFailed(user=name, client=client, reason="throttled")
            )
            instruments().web_logins.add(1, _LOGIN_THROTTLED)
            what = "this user" if key.startswith("user.") else "this address"
            raise ThrottledError(
                f"too many failed logins for {what}: try again in {retry} s", retry_after=retry
            )

    async def _fail(self, key: str) -> None:
        """Count one failure under `key` (revision-checked; the TTL restarts)."""
        kv = await self._kv(WEB_THROTTLE.name)
        for _ in range(10):
            found = await self._get(WEB_THROTTLE.name, key, ThrottleRecord)
            failures = found[0].failures + 1 if found else 1
            value = encode(ThrottleRecord(failures=failures, last_at=utcnow()))
            try:
                if found is None:
                    await kv.create(key, value, msg_ttl=self.throttle.window)
                else:
                    # A raw publish keeps the per-key TTL (kv.update would drop it).
                    await self.bus.js.publish(
                        f"$KV.{WEB_THROTTLE.name}.{key}",
                        value,
                        msg_ttl=self.throttle.window,
                        headers={"Nats-Expected-Last-Subject-Sequence": str(found[1])},
                    )
            except nats.js.errors.APIError as exc:
                if isinstance(exc, nats.js.errors.KeyWrongLastSequenceError) or (
                    exc.err_code == _WRONG_SEQUENCE
                ):
                    continue  # another replica counted one just now: count on top of it
                raise
            return
        log.warning("failed login not counted: the counter kept changing")

    async def _forget(self, key: str) -> None:
        kv = await self._kv(WEB_THROTTLE.name)
        if await self._get(WEB_THROTTLE.name, key, ThrottleRecord) is not None:
            await kv.delete(key)

    # --- KV helpers ----------------------------------------------------------------------

    async def _get(self, bucket: str, key: str, kind: type[T]) -> tuple[T, int] | None:
        kv = await self._kv(bucket)
        try:
            entry = await kv.get(key)
        except _MISSING:
            return None
        if not entry.value:
            return None
        try:
            return decode(entry.value, kind), int(entry.revision or 0)
        except ContractError:
            log.warning("unreadable identity record skipped", extra={"bucket": bucket})
            return None

    async def _all_keyed(self, bucket: str, kind: type[T]) -> list[tuple[T, str]]:
        kv = await self._kv(bucket)
        try:
            keys = await kv.keys()
        except nats.js.errors.NoKeysError:
            return []
        found: list[tuple[T, str]] = []
        for key in keys:
            got = await self._get(bucket, key, kind)
            if got is not None:
                found.append((got[0], key))
        return found


def iso(at: datetime | None) -> str:
    """`at` as RFC 3339 seconds, or an empty string."""
    return at.isoformat(timespec="seconds") if at else ""
