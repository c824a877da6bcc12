"""`svc users` and `svc tokens`: console users and API tokens (ADR 0040), over the
identity store the web role reads (services/web/identity.py). Rows never hold a secret."""

from __future__ import annotations

from typing import Any

from contracts.web import TokenRecord, UserRecord
from services.runtime.bus import Bus
from services.web.identity import Identity, iso


def user_row(user: UserRecord) -> dict[str, Any]:
    """What `svc users ls` shows of a user (never the hash)."""
    return {"name": user.name, "role": user.role, "created_at": iso(user.created_at)}


def token_row(token: TokenRecord) -> dict[str, Any]:
    """What `svc tokens ls` shows of a token (never the secret or its hash)."""
    return {
        "id": token.id,
        "name": token.name,
        "role": token.role,
        "created_at": iso(token.created_at),
        "last_used": iso(token.last_used),
    }


async def add_user(bus: Bus, name: str, role: str, password: str, *, actor: str) -> dict[str, Any]:
    """Create a console user."""
    return user_row(await Identity(bus).add_user(name, role, password, actor=actor))


async def list_users(bus: Bus) -> list[dict[str, Any]]:
    """Every console user."""
    return [user_row(u) for u in await Identity(bus).users()]


async def remove_user(bus: Bus, name: str, *, actor: str) -> int:
    """Remove a console user; how many of their sessions ended."""
    return await Identity(bus).remove_user(name, actor=actor)


async def create_token(bus: Bus, name: str, role: str, *, actor: str) -> tuple[dict[str, Any], str]:
    """Create an API token: its row, and the token itself (to print once)."""
    record, secret = await Identity(bus).create_token(name, role, actor=actor)
    return token_row(record), secret


async def list_tokens(bus: Bus) -> list[dict[str, Any]]:
    """Every live API token."""
    return [token_row(t) for t in await Identity(bus).tokens()]


async def revoke_token(bus: Bus, ref: str, *, actor: str) -> dict[str, Any]:
    """Revoke the token with this id or name."""
    return token_row(await Identity(bus).revoke_token(ref, actor=actor))
