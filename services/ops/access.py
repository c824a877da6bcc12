"""`svc access`: every write is checked and recorded as an event on ACCESS; every read
replays ACCESS into a fresh view (ADR 0023)."""

from __future__ import annotations

import getpass
from typing import Any

import msgspec
import nats.js.errors

from contracts import subjects
from contracts.codec import decode
from contracts.errors import ContractError
from contracts.events import (
    AccessApproved,
    AccessKind,
    AccessMode,
    AccessModeSet,
    AccessRuleAdded,
    AccessRuleRemoved,
    Message,
    MessageReceived,
    derived_id,
    utcnow,
)
from contracts.streams import ACCESS, INBOUND
from projections.access import AccessView
from services.core.access import catch_up
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.provisioning import missing_streams

MODES: tuple[AccessMode, ...] = ("open", "allowlist", "approval")
_PATTERN_LIMIT = 256


def check_pattern(pattern: str) -> str:
    """A JID, a phone number or a glob over either; one clear line if it cannot be one."""
    if not pattern.strip() or any(c.isspace() for c in pattern) or len(pattern) > _PATTERN_LIMIT:
        raise ConfigError(
            f"pattern {subjects.shown(pattern)} is invalid: use a JID, a phone number or a"
            " glob without spaces, e.g. '15551234567@s.whatsapp.net', '1555*' or '*@g.us'"
        )
    return pattern


def scope(channel: str | None, account: str | None) -> tuple[str, str]:
    """(channel, account) the flags name; account "" is the channel-wide scope."""
    try:
        ch = subjects.check_channel(channel or "whatsapp")
        subjects.access(ch, account or "")  # validates the account (and the reserved `_`)
    except ContractError as exc:
        raise ConfigError(str(exc)) from None
    return ch, account or ""


def check_approvable(jid: str) -> str:
    """A JID to approve: `user@server`, no spaces (as `svc access pending` lists it)."""
    user, at, server = jid.partition("@")
    if not (user and at and server) or any(c.isspace() for c in jid) or len(jid) > 256:
        raise ConfigError(
            f"JID {subjects.shown(jid)} is invalid: pass the sender's JID as `svc access"
            " pending` lists it, e.g. 15551234567@s.whatsapp.net (a group: ...@g.us)"
        )
    return jid


async def replayed(bus: Bus) -> AccessView:
    """ACCESS replayed from sequence 1 (an empty view when the stream does not exist)."""
    view = AccessView()
    if not await missing_streams(bus.js, [ACCESS.name]):
        await catch_up(bus, view)
    return view


async def _record(bus: Bus, event: Message, channel: str, account: str) -> int:
    ack = await bus.publish(subjects.access(channel, account), event)
    return int(ack.seq)


async def set_mode(
    bus: Bus, mode: str, channel: str, account: str, *, actor: str | None = None
) -> tuple[AccessModeSet, int]:
    """Record a scope's mode."""
    chosen = next((m for m in MODES if m == mode), None)
    if chosen is None:
        raise ConfigError(f"mode {mode!r} is invalid: use one of {', '.join(MODES)}")
    who = actor if actor is not None else getpass.getuser()
    event = AccessModeSet(channel=channel, account=account, mode=chosen, actor=who)
    return event, await _record(bus, event, channel, account)


async def add_rule(
    bus: Bus,
    kind: AccessKind,
    pattern: str,
    channel: str,
    account: str,
    *,
    actor: str | None = None,
) -> tuple[AccessRuleAdded, int]:
    """Record an allow or block pattern for a scope."""
    event = AccessRuleAdded(
        channel=channel,
        account=account,
        pattern=check_pattern(pattern),
        kind=kind,
        actor=actor if actor is not None else getpass.getuser(),
    )
    return event, await _record(bus, event, channel, account)


async def remove_rule(
    bus: Bus, kind: AccessKind, pattern: str, channel: str, account: str
) -> tuple[AccessRuleRemoved, int]:
    """Take a pattern out of a scope (it must be there: one line saying so if not)."""
    view = await replayed(bus)
    if view.rules.get((channel, account), {}).get(pattern) != kind:
        where = f"{channel}/{account}" if account else channel
        raise ConfigError(
            f"no {kind} pattern {pattern!r} at {where}: `svc access ls` lists the rules"
        )
    event = AccessRuleRemoved(
        channel=channel, account=account, pattern=pattern, kind=kind, actor=getpass.getuser()
    )
    return event, await _record(bus, event, channel, account)


async def pending(bus: Bus, account: str | None = None) -> list[dict[str, Any]]:
    """Senders waiting for approval (of one account, or all)."""
    rows = (await replayed(bus)).rows()["pending"]
    return [r for r in rows if account is None or r["account"] == account]


async def approve(
    bus: Bus, jid: str, channel: str, account: str, *, actor: str | None = None
) -> tuple[AccessApproved, int, list[str]]:
    """Approve `jid` on an account, then send its waiting messages back to the core (as
    new MessageReceived, ids derived from the originals) so each is answered in order.
    Returns the event, its sequence and the released inbound ids."""
    if not account:
        raise ConfigError("approve needs --account: an approval is for one account")
    check_approvable(jid)
    view = await replayed(bus)
    waiting = view.pending_for(channel, account, jid)
    requests = sorted(waiting.requests, key=lambda r: r.inbound_seq) if waiting else []
    released = [r.inbound_id for r in requests if r.inbound_seq]
    event = AccessApproved(
        channel=channel,
        account=account,
        jid=jid,
        released=released,
        actor=actor if actor is not None else getpass.getuser(),
    )
    seq = await _record(bus, event, channel, account)
    # After the approval is recorded: a core that sees a released message sees the approval.
    for request in requests:
        if request.inbound_seq:
            await _release(bus, request.inbound_seq, request.inbound_id)
    return event, seq, released


async def _release(bus: Bus, seq: int, inbound_id: str) -> None:
    try:
        stored = await bus.js.get_msg(INBOUND.name, seq)
    except nats.js.errors.NotFoundError:
        return  # aged out of INBOUND: its refusal stays its outcome
    if stored.data is None:
        return
    try:
        original = decode(stored.data, MessageReceived)
    except ContractError:
        return
    if original.id != inbound_id:
        return
    copy = msgspec.structs.replace(
        original, id=derived_id("access-released", original.id), at=utcnow()
    )
    subject = subjects.inbound(copy.channel, copy.account, copy.chat)
    await bus.publish(subject, copy)


async def listing(bus: Bus) -> dict[str, Any]:
    """The whole access view (modes, rules, approved, pending) and its ACCESS position."""
    view = await replayed(bus)
    return {"position": view.position, **view.rows()}
