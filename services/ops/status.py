"""`svc status`: streams, consumers, leases, accounts and dead letters at a glance.

Per account (`accounts`): the session state and reason (the lease decides: a parked
lease's state and end, a held lease's holder and token; the `sessions` board says what
the holder last reported -- connecting, connected, disconnected), the paired device with
its phone digits masked, and the time of the last message on the account's INBOUND and
DELIVERY subjects (one last-by-subject get each, never a scan), and the send budget the
owner runs (`budget`: reply and first-contact budgets, the factor a ban cut it to, and
`waiting`: jobs held for budget now; ADR 0024).

Per live worker (`workers`, ADR 0030): every `switchboard-<role>` NATS micro instance
that answers `$SRV.INFO` (standbys and core replicas included), with what its `status`
endpoint says now: the accounts it holds and stands by for, its consumer counts.
"""

from __future__ import annotations

import asyncio
import re
import time
from datetime import datetime
from typing import Any, TypeVar

import msgspec
import nats.errors
import nats.js.errors

from contracts.payloads import DeviceRecord, SessionStatus
from contracts.streams import (
    BUCKETS,
    DEADLETTER,
    DELIVERY,
    DEVICES,
    INBOUND,
    LEASES,
    SESSIONS,
    STREAMS,
)
from contracts.subjects import DEADLETTER_OPS_SUBJECT
from services.ops.dlq import discarded
from services.runtime.bus import Bus
from services.runtime.lease import read_lease
from services.runtime.micro import discover, live_status
from services.runtime.provisioning import retention_name


async def collect_status(bus: Bus, **discovery: float) -> dict[str, Any]:
    """Everything `svc status` shows, as plain data (`discovery`: how long to gather the
    workers' `$SRV.INFO` answers, see `services.runtime.micro.scatter`)."""
    js = bus.js
    streams: list[dict[str, Any]] = []
    names = [s.name for s in STREAMS] + [f"KV_{b.name}" for b in BUCKETS]
    for name in names:
        try:
            info = await js.stream_info(name)
        except nats.js.errors.NotFoundError:
            streams.append({"name": name, "missing": True})
            continue
        consumers = []
        for c in await js.consumers_info(name):
            consumers.append(
                {
                    "name": c.name,
                    "filter": c.config.filter_subject,
                    "pending": c.num_pending,
                    "ack_pending": c.num_ack_pending,
                    "redelivered": c.num_redelivered,
                    "waiting": c.num_waiting,
                }
            )
        state = info.state
        streams.append(
            {
                "name": name,
                "retention": retention_name(info.config),
                "messages": state.messages,
                "bytes": state.bytes,
                "first_seq": state.first_seq,
                "last_seq": state.last_seq,
                "consumers": consumers,
            }
        )
    leases = await _leases(bus)
    accounts = await _accounts(bus, leases)
    dead = next((s for s in streams if s["name"] == DEADLETTER.name), {})
    letters = int(dead.get("messages", 0))
    gone = discarded(letters, dead.get("first_seq"), dead.get("last_seq"))
    if letters:
        # Each requeue/drop record on deadletter._ops closes one letter.
        ops = await js.stream_info(DEADLETTER.name, subjects_filter=DEADLETTER_OPS_SUBJECT)
        handled = sum((ops.state.subjects or {}).values())
        letters -= 2 * handled
    return {
        "at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "streams": streams,
        "leases": leases,
        "accounts": accounts,
        "dead_letters": max(0, letters),
        "dead_letters_dropped": gone,
        "workers": await collect_workers(bus, **discovery),
    }


async def collect_workers(bus: Bus, **discovery: float) -> list[dict[str, Any]]:
    """One row per live worker found by NATS micro discovery, with its live state."""
    found = await discover(bus.nc, **discovery)
    answers = await asyncio.gather(*(live_status(bus.nc, f) for f in found))
    rows = []
    for instance, live in zip(found, answers, strict=True):
        meta = instance.metadata
        row: dict[str, Any] = {
            "name": instance.name,
            "role": meta.get("role", instance.name.removeprefix("switchboard-")),
            "id": instance.id,
            "version": instance.version,
            "host": meta.get("host", ""),
            "pid": meta.get("pid", ""),
            "holder": meta.get("holder", ""),
            "answered": live is not None,
        }
        if live is not None:
            row.update(
                {
                    key: live[key]
                    for key in ("started", "accounts", "owned", "standby", "ingress", "core")
                    if key in live
                }
            )
        rows.append(row)
    return rows


async def _leases(bus: Bus) -> list[dict[str, Any]]:
    """Every lease in the bucket (none when it does not exist yet: no role has run)."""
    js = bus.js
    prefix = f"$KV.{LEASES.name}."
    try:
        kv = await js.key_value(LEASES.name)
        # The stream's subject list, not kv.keys(): that would leave a consumer behind.
        info = await js.stream_info(f"KV_{LEASES.name}", subjects_filter=f"{prefix}>")
    except nats.js.errors.NotFoundError:
        return []
    leases: list[dict[str, Any]] = []
    for key in sorted(s.removeprefix(prefix) for s in (info.state.subjects or {})):
        try:
            found = await read_lease(kv, key)
        except msgspec.DecodeError:  # written by hand; shown, never a crash of the status
            leases.append(
                {
                    "parked": f"unreadable value: remove it with 'nats kv del {LEASES.name} {key}'",
                    "key": key,
                    "holder": "",
                    "token": 0,
                    "revision": 0,
                    "acquired_at": "",
                    "state": "",
                    "until": "",
                }
            )
            continue
        if found is not None:
            value, revision = found
            leases.append(
                {
                    "parked": value.parked,
                    "key": key,
                    "holder": value.holder,
                    "token": value.token,
                    "revision": revision,
                    "acquired_at": value.acquired_at,
                    "state": value.state,
                    "until": value.until,
                }
            )
    return leases


T = TypeVar("T")

# The states a live owner reports; without a lease behind them they are stale.
_LIVE = ("connecting", "connected", "disconnected", "zombie")
_PHONE = re.compile(r"^(\d+)(.*)$")


def mask_device(jid: str) -> str:
    """A device JID with its phone digits masked but the first and last four:
    `15551230001:7@s.whatsapp.net` -> `1555***0001:7@s.whatsapp.net`."""
    match = _PHONE.match(jid)
    if not match:
        return jid
    digits, rest = match.groups()
    shown = f"{digits[:4]}***{digits[-4:]}" if len(digits) > 8 else f"{digits[:2]}***"
    return shown + rest


async def _bucket_keys(bus: Bus, bucket: str) -> list[str]:
    """Every key of `bucket` (none when it does not exist yet)."""
    prefix = f"$KV.{bucket}."
    try:
        info = await bus.js.stream_info(f"KV_{bucket}", subjects_filter=f"{prefix}>")
    except nats.js.errors.NotFoundError:
        return []
    return sorted(s.removeprefix(prefix) for s in (info.state.subjects or {}))


async def _bucket_values(bus: Bus, bucket: str, kind: type[T]) -> dict[str, T]:
    """Every readable value of `bucket` by key (a value written by hand is left out)."""
    keys = await _bucket_keys(bus, bucket)
    if not keys:
        return {}
    kv = await bus.js.key_value(bucket)
    found: dict[str, T] = {}
    for key in keys:
        try:
            entry = await kv.get(key)
            if entry.value:
                found[key] = msgspec.json.decode(entry.value, type=kind)
        except (nats.js.errors.KeyNotFoundError, msgspec.DecodeError):
            continue
    return found


async def _last_at(bus: Bus, stream: str, subject: str) -> str:
    """When the last message on `subject` (a wildcard) was stored, or "" if none.

    A last-by-subject get takes wildcards (nats-server 2.10+); one that fails for any
    reason (no message, an older server) shows as unknown rather than failing the status.
    """
    try:
        msg = await bus.js.get_last_msg(stream, subject)
    except (nats.js.errors.Error, nats.errors.Error):
        return ""
    at: datetime | None = msg.time
    if at is None:
        return ""
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


async def collect_accounts(bus: Bus) -> list[dict[str, Any]]:
    """The accounts part of `svc status` alone (no stream or worker discovery)."""
    return await _accounts(bus, await _leases(bus))


async def _accounts(bus: Bus, leases: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per account known to the leases, the board or the device records."""
    boards = await _bucket_values(bus, SESSIONS.name, SessionStatus)
    devices = await _bucket_values(bus, DEVICES.name, DeviceRecord)
    by_key = {lease["key"]: lease for lease in leases}
    rows = []
    for key in sorted(set(by_key) | set(boards) | set(devices)):
        channel, _, account = key.partition(".")
        if not account:
            continue
        lease, board, device = by_key.get(key), boards.get(key), devices.get(key)
        row: dict[str, Any] = {
            "account": account,
            "channel": channel,
            "state": "standby",
            "reason": "",
            "until": "",
            "holder": "",
            "token": 0,
            "since": "",
            "connected_at": "",
            "device": mask_device(device.device_id if device else board.device if board else ""),
            "budget": None,
            "waiting": 0,
        }
        if lease is not None and lease["parked"]:
            # Parked: the lease says why and until when, whatever the board last heard.
            row.update(
                state=lease["state"] or "parked",
                reason=lease["parked"],
                until=lease["until"],
                holder=lease["holder"],
                token=lease["token"],
            )
            if board is not None and board.token == lease["token"]:
                row["since"] = _iso(board.since)
        elif lease is not None:
            row.update(holder=lease["holder"], token=lease["token"], state="connecting")
            if board is not None and board.token == lease["token"]:
                row.update(
                    state=board.state,
                    reason=board.reason,
                    since=_iso(board.since),
                    connected_at=_iso(board.connected_at),
                )
                if board.budget is not None:
                    row.update(
                        budget=msgspec.to_builtins(board.budget), waiting=board.budget.waiting
                    )
        elif board is not None:
            # Nobody holds it: a board still saying "connected" is stale (its owner died).
            stale = board.state in _LIVE
            row.update(
                reason="nobody holds the lease" if stale else board.reason,
                since="" if stale else _iso(board.since),
            )
        else:
            row["reason"] = "nobody holds the lease"
        row["last_inbound"] = await _last_at(bus, INBOUND.name, f"inbound.{channel}.{account}.*")
        row["last_outbound"] = await _last_at(bus, DELIVERY.name, f"delivery.{channel}.{account}.*")
        rows.append(row)
    return rows


def _iso(at: datetime | None) -> str:
    return at.isoformat(timespec="seconds").replace("+00:00", "Z") if at else ""


def render_status(status: dict[str, Any]) -> str:
    """The human view of `collect_status`."""
    lines = [
        "STREAM       RETENTION  MESSAGES  LAST SEQ  CONSUMERS (pending/ack pending/redelivered)"
    ]
    for s in status["streams"]:
        if s.get("missing"):
            lines.append(f"{s['name']:<12} (missing: run 'svc streams ensure')")
            continue
        consumers = ", ".join(
            f"{c['name']} {c['pending']}/{c['ack_pending']}/{c['redelivered']}"
            for c in s["consumers"]
        )
        lines.append(
            f"{s['name']:<12} {s['retention'] or '-':<10} {s['messages']:>8}"
            f"  {s['last_seq']:>8}  {consumers or '-'}"
        )
    lines.append("")
    if status["leases"]:
        lines.append("LEASE                    HOLDER                                TOKEN  SINCE")
        for lease in status["leases"]:
            if lease["parked"]:
                lines.append(
                    f"{lease['key']:<24} PARKED: {lease['parked']} ('svc accounts resume')"
                )
                continue
            lines.append(
                f"{lease['key']:<24} {lease['holder']:<37} {lease['token']:>5}"
                f"  {lease['acquired_at']}"
            )
    else:
        lines.append("LEASES: none held")
    if status.get("accounts"):
        lines.append("")
        lines.append(
            "ACCOUNT              STATE          HOLDER                                TOKEN"
            "  DEVICE                          LAST IN               LAST OUT"
        )
        for a in status["accounts"]:
            state = a["state"] + (f" until {a['until']}" if a["until"] else "")
            lines.append(
                f"{a['channel'] + '.' + a['account']:<20} {a['state']:<14} {a['holder'] or '-':<37}"
                f" {a['token']:>5}  {a['device'] or '-':<31} {a['last_inbound'] or '-':<21}"
                f" {a['last_outbound'] or '-'}"
            )
            if a["reason"] or a["until"]:
                lines.append(f"  {state}: {a['reason'] or '-'}{_recovery(a['state'])}")
            if a.get("budget"):
                lines.append(f"  budget: {budget_line(a['budget'])}, {a['waiting']} waiting")
    lines.extend(_render_workers(status.get("workers", [])))
    lines.append(f"\nDEAD LETTERS: {status['dead_letters']} open ('svc dlq ls')")
    if status.get("dead_letters_dropped"):
        lines.append(
            f"  {status['dead_letters_dropped']} older dead letters were dropped by the"
            " DEADLETTER limits (max age / bytes)"
        )
    return "\n".join(lines)


def _render_workers(workers: list[dict[str, Any]]) -> list[str]:
    """The WORKERS table: one line per live micro instance (`nats micro ls` shows them)."""
    if not workers:
        return ["", "WORKERS: none answered $SRV.INFO (NATS micro)"]
    lines = ["", "WORKER             ID                      HOST              PID  STATE"]
    for w in workers:
        lines.append(
            f"{w['role']:<18} {w['id']:<23} {w['host'][:16]:<16} {w['pid']:>5}  {_worker_state(w)}"
        )
        if w["holder"]:
            lines.append(f"  holder {w['holder']}")
    return lines


def _worker_state(worker: dict[str, Any]) -> str:
    """What a worker does now, in a few words."""
    if not worker["answered"]:
        return "(no answer from its status endpoint)"
    parts = []
    if "owned" in worker:
        owned = ", ".join(worker["owned"]) or "none"
        parts.append(f"owns {owned}")
        if worker.get("standby"):
            parts.append(f"standby for {', '.join(worker['standby'])}")
    if "ingress" in worker:
        parts.append(f"receives {', '.join(worker['ingress']) or 'none'}")
    if "core" in worker:
        core = worker["core"]
        parts.append(
            f"consumer {core['stream']}/{core['consumer']}: {core['handled']} handled,"
            f" {core['dead_lettered']} dead-lettered"
        )
    return "; ".join(parts) or "-"


def budget_line(budget: dict[str, Any] | None) -> str:
    """One line of an account's send budget (as `svc status` and the console print it)."""
    if not budget:
        return ""
    text = (
        f"replies {budget['reply']}, first contact {budget['first_contact']},"
        f" same text {budget['same_text']}"
    )
    if budget["factor"] < 1:
        text += f", cut to {budget['factor']:g} ({budget['reason']})"
        if budget.get("next_step_at"):
            text += f", next step {budget['next_step_at']}"
    return text


def _recovery(state: str) -> str:
    """How an operator gets an account out of `state` (see the runbook's Account states)."""
    match state:
        case "needs_pairing" | "logged_out":
            return " ('svc whatsapp pair', then 'svc accounts resume')"
        case "banned":
            return " (resumes by itself at the end; 'svc accounts resume' to force)"
        case "replaced" | "outdated" | "connect_failed" | "parked":
            return " ('svc accounts resume' once fixed)"
        case "zombie":
            return " ('svc accounts handover' reconnects it elsewhere; see the runbook)"
        case _:
            return ""


def to_json(status: dict[str, Any]) -> str:
    """The `--json` view."""
    return msgspec.json.encode(status).decode()
