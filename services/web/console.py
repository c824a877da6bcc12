"""What the console and the API do, as plain async functions over the bus (pages and API
handlers both call these; ADR 0041). Each one calls the operation under services/ops/
the CLI calls; errors are ApiError with a status and a one-line detail."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors

from contracts import subjects
from contracts.errors import ContractError
from contracts.events import (
    CHANNEL_WHATSAPP,
    OperatorOrigin,
    SendMessage,
    TurnCompleted,
    derived_id,
    new_id,
)
from contracts.streams import ACCOUNTS
from services.runtime.bus import Bus
from services.web.errors import ApiError
from services.web.identity import Principal

T = TypeVar("T")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
MAX_TEXT_CHARS = 65_536  # WhatsApp's own limit for one text message
OPERATOR_MODEL = "operator"  # TurnCompleted.model of an operator-originated turn


class Page(msgspec.Struct, frozen=True, kw_only=True):
    """One page of a list: `next_cursor` is null on the last page."""

    items: list[Any]
    next_cursor: str | None = None


def _cursor(offset: int) -> str:
    return base64.urlsafe_b64encode(f"o:{offset}".encode()).decode().rstrip("=")


def _offset(cursor: str | None) -> int:
    if not cursor:
        return 0
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    kind, _, number = raw.partition(":")
    if kind != "o" or not number.isdigit():
        raise ApiError(400, "cursor is not one this API returned: start without it", "bad_cursor")
    return int(number)


def page(items: Sequence[T], limit: int | None, cursor: str | None) -> Page:
    """`items[cursor:cursor+limit]` with the cursor of the next page (opaque to clients)."""
    size = DEFAULT_LIMIT if limit is None else limit
    if not 1 <= size <= MAX_LIMIT:
        raise ApiError(400, f"limit must be 1..{MAX_LIMIT}", "bad_limit")
    start = _offset(cursor)
    chunk = list(items[start : start + size])
    more = start + size < len(items)
    return Page(items=chunk, next_cursor=_cursor(start + size) if more else None)


def check_account(account: str) -> str:
    """`account` if valid, else 422."""
    try:
        return subjects.check_account(account)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid_account") from None


def check_chat(chat: str) -> str:
    """The chat JID `chat` names (a JID or its subject token), else 422."""
    from services.ops.explain import check_chat as check

    try:
        return check(chat)
    except ContractError as exc:
        raise ApiError(422, str(exc), "invalid_chat") from None


async def known_account(bus: Bus, account: str) -> None:
    """404 unless the account has ever been registered (a typo would queue forever)."""
    subject = subjects.accounts(CHANNEL_WHATSAPP, check_account(account))
    try:
        await bus.js.get_last_msg(ACCOUNTS.name, subject)
    except nats.js.errors.NotFoundError:
        raise ApiError(
            404, f"no account {account!r}: no worker ever registered it", "unknown_account"
        ) from None


async def send(
    bus: Bus,
    account: str,
    chat: str,
    text: str,
    *,
    principal: Principal,
    client: str,
    idempotency_key: str | None = None,
) -> str:
    """A proactive send, recorded as an operator-originated turn (ADR 0041): first a
    TurnCompleted naming who sent it from where (its `reply_ids` the job), then the
    SendMessage job on OUTBOUND -- the same path, order, lease and fencing as an agent's
    reply. With an idempotency key a retried request makes no second job. The job id."""
    account = check_account(account)
    jid = check_chat(chat)
    if not text.strip():
        raise ApiError(422, "text is empty", "empty_text")
    if len(text) > MAX_TEXT_CHARS:
        raise ApiError(422, f"text is too long: at most {MAX_TEXT_CHARS} characters", "too_long")
    await known_account(bus, account)
    if idempotency_key is not None:
        if not 1 <= len(idempotency_key) <= 200:
            raise ApiError(400, "Idempotency-Key must be 1-200 characters", "bad_idempotency_key")
        job_id = derived_id("operator-send", principal.kind, principal.name, idempotency_key)
    else:
        job_id = new_id()
    turn = TurnCompleted(
        id=derived_id("operator-turn", job_id),
        account=account,
        chat=jid,
        inbound_id="",
        model=OPERATOR_MODEL,
        reply_ids=[job_id],
        origin=OperatorOrigin(actor=principal.name, kind=principal.kind, client=client, via="web"),
    )
    job = SendMessage(
        id=job_id, job_id=job_id, account=account, chat=jid, text=text, cause_id=turn.id
    )
    try:
        # The turn first, as the core does: a job is never on OUTBOUND unexplained.
        await bus.publish(subjects.agent(CHANNEL_WHATSAPP, account, jid), turn)
        await bus.publish(subjects.outbound(CHANNEL_WHATSAPP, account, jid), job)
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise ApiError(
            503,
            f"JetStream did not store the send ({type(exc).__name__}); retry"
            " with the same Idempotency-Key",
            "unavailable",
        ) from None
    return job_id


def builtins(value: Any) -> Any:
    """`value` as plain JSON data (structs, datetimes)."""
    return msgspec.to_builtins(value)
