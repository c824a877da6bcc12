"""The access read model: who may talk to the agent, folded from the ACCESS stream.

Pure: `AccessView.apply(event)` folds one event; `resolve(...)` decides whether a sender
(or group) may reach the model and which rule decided; `rows()` is the view as sorted
plain data (what `svc access ls --json` prints, and what a replay must reproduce).

Resolution (ADR 0023): a matching block pattern at the account or the channel scope
always wins; then the mode of the account (if set), else of the channel, else `open`.
`open` lets everyone in; `allowlist` and `approval` let in what an allow pattern (account
or channel) matches or what was approved for the account; anyone else is refused
(`allowlist`) or pending (`approval`). In a group the group JID is what allow patterns
and approvals match; a block matches the group or the sender.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from fnmatch import fnmatchcase
from typing import Any

from contracts.events import (
    AccessApproved,
    AccessEvent,
    AccessModeSet,
    AccessRequested,
    AccessRuleAdded,
    AccessRuleRemoved,
)

HANDLED_TYPES = (AccessModeSet, AccessRuleAdded, AccessRuleRemoved, AccessApproved, AccessRequested)
DEFAULT_MODE = "open"

Scope = tuple[str, str]  # (channel, account); account "" is the channel-wide scope


def scope_name(scope: Scope) -> str:
    """`whatsapp` or `whatsapp/<account>`, as listings show a scope."""
    channel, account = scope
    return f"{channel}/{account}" if account else channel


def matches(pattern: str, jid: str) -> bool:
    """Whether `pattern` (a JID, a phone number, or a glob over either) names `jid`.
    A pattern without `@` is matched against the JID's user part too (`1555*`,
    `+15551234567`)."""
    if not jid:
        return False
    if fnmatchcase(jid, pattern):
        return True
    if "@" not in pattern:
        user = jid.split("@", 1)[0].split(":", 1)[0]
        return fnmatchcase(user, pattern.removeprefix("+"))
    return False


@dataclass(frozen=True)
class Decision:
    """Whether a message may reach the model; `pending` when it waits for approval."""

    allowed: bool
    rule: str  # e.g. `access:block`, `access:allowlist`, `access:approval`
    detail: str
    pending: bool = False


@dataclass
class Request:
    """One waiting message of a pending sender."""

    inbound_id: str
    inbound_seq: int
    message_id: str
    chat: str
    at: datetime
    waiting_job: str


@dataclass
class Pending:
    """A sender (or group) waiting for approval on one account."""

    requests: list[Request] = field(default_factory=list)
    last_waiting_at: datetime | None = None  # the last waiting reply sent to it


@dataclass
class AccessView:
    """Access policy state; `apply` every ACCESS event in stream order."""

    modes: dict[Scope, str] = field(default_factory=dict)
    rules: dict[Scope, dict[str, str]] = field(default_factory=dict)  # pattern -> kind
    approved: dict[Scope, set[str]] = field(default_factory=dict)
    pending: dict[tuple[str, str, str], Pending] = field(default_factory=dict)
    position: int = 0  # the last applied stream sequence
    requested: set[str] = field(default_factory=set)  # inbound ids already recorded

    def apply(self, event: AccessEvent, seq: int = 0) -> None:
        """Fold one event (idempotent per inbound message for requests)."""
        match event:
            case AccessModeSet():
                self.modes[(event.channel, event.account)] = event.mode
            case AccessRuleAdded():
                scope = (event.channel, event.account)
                self.rules.setdefault(scope, {})[event.pattern] = event.kind
                # A block settles a pending sender: its waiting messages stay refused. (An
                # allow does not: `approve` is what answers the waiting messages.)
                for key in [k for k in self.pending if k[0] == event.channel]:
                    if event.kind != "block":
                        break
                    if (not event.account or key[1] == event.account) and matches(
                        event.pattern, key[2]
                    ):
                        del self.pending[key]
            case AccessRuleRemoved():
                scope = (event.channel, event.account)
                rules = self.rules.get(scope, {})
                if rules.get(event.pattern) == event.kind:
                    del rules[event.pattern]
            case AccessApproved():
                self.approved.setdefault((event.channel, event.account), set()).add(event.jid)
                self.pending.pop((event.channel, event.account, event.jid), None)
            case AccessRequested():
                if event.inbound_id and event.inbound_id in self.requested:
                    return
                if event.inbound_id:
                    self.requested.add(event.inbound_id)
                found = self.pending.setdefault(
                    (event.channel, event.account, event.jid), Pending()
                )
                found.requests.append(
                    Request(
                        event.inbound_id,
                        event.inbound_seq,
                        event.message_id,
                        event.chat,
                        event.at,
                        event.waiting_job,
                    )
                )
                if event.waiting_job:
                    found.last_waiting_at = event.at
        if seq:
            self.position = max(self.position, seq)

    def mode(self, channel: str, account: str) -> str:
        """The mode in effect for an account: its own, else its channel's, else open."""
        return self.modes.get((channel, account), self.modes.get((channel, ""), DEFAULT_MODE))

    def resolve(
        self,
        channel: str,
        account: str,
        sender: str,
        chat: str,
        *,
        is_group: bool = False,
        sender_alt: str = "",
    ) -> Decision:
        """Whether a message from `sender` in `chat` may reach the model, and why."""
        scopes = ((channel, account), (channel, ""))
        senders = [j for j in (sender, sender_alt) if j]
        blockable = [chat, *senders] if is_group else [*senders, chat]
        admitted = [chat] if is_group else [*senders, chat]
        for scope in scopes:
            for pattern, kind in sorted(self.rules.get(scope, {}).items()):
                if kind == "block" and any(matches(pattern, j) for j in blockable):
                    return Decision(
                        False, "access:block", f"block {pattern!r} at {scope_name(scope)}"
                    )
        mode = self.mode(channel, account)
        where = scope_name(
            (channel, account) if (channel, account) in self.modes else (channel, "")
        )
        if mode == "open":
            return Decision(True, "access:open", f"mode open at {where}")
        for scope in scopes:
            for pattern, kind in sorted(self.rules.get(scope, {}).items()):
                if kind == "allow" and any(matches(pattern, j) for j in admitted):
                    return Decision(
                        True, "access:allow", f"allow {pattern!r} at {scope_name(scope)}"
                    )
        approved = self.approved.get((channel, account), set())
        if hit := next((j for j in admitted if j in approved), None):
            return Decision(True, "access:approved", f"{hit} approved at {channel}/{account}")
        who = chat if is_group else sender
        if mode == "allowlist":
            return Decision(False, "access:allowlist", f"{who} is not on the allowlist ({where})")
        return Decision(
            False, "access:approval", f"{who} waits for approval ({where})", pending=True
        )

    def pending_for(self, channel: str, account: str, jid: str) -> Pending | None:
        """The pending entry of `jid` on an account, if any."""
        return self.pending.get((channel, account, jid))

    def waiting_due(
        self, channel: str, account: str, jid: str, now: datetime, period: timedelta
    ) -> bool:
        """Whether `jid` is owed a waiting reply: none sent yet, or the last one is at
        least `period` old (derived from AccessRequested, so it holds across restarts)."""
        found = self.pending.get((channel, account, jid))
        last = found.last_waiting_at if found else None
        return last is None or now - last >= period

    def rows(self) -> dict[str, list[dict[str, Any]]]:
        """The whole view as sorted plain data (deterministic: a replay must equal it)."""
        return {
            "modes": [
                {"scope": scope_name(s), "channel": s[0], "account": s[1], "mode": m}
                for s, m in sorted(self.modes.items())
            ],
            "rules": [
                {
                    "scope": scope_name(s),
                    "channel": s[0],
                    "account": s[1],
                    "pattern": p,
                    "kind": k,
                }
                for s, rules in sorted(self.rules.items())
                for p, k in sorted(rules.items())
            ],
            "approved": [
                {"channel": s[0], "account": s[1], "jid": j}
                for s, jids in sorted(self.approved.items())
                for j in sorted(jids)
            ],
            "pending": [
                {
                    "channel": k[0],
                    "account": k[1],
                    "jid": k[2],
                    "messages": len(p.requests),
                    "first_at": p.requests[0].at.isoformat() if p.requests else "",
                    "last_at": p.requests[-1].at.isoformat() if p.requests else "",
                    "last_waiting_reply_at": (
                        p.last_waiting_at.isoformat() if p.last_waiting_at else ""
                    ),
                }
                for k, p in sorted(self.pending.items())
            ],
        }
