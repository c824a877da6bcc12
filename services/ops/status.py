"""`svc status`: streams, consumers, leases and dead letters at a glance."""

from __future__ import annotations

import time
from typing import Any

import msgspec
import nats.js.errors

from contracts.streams import BUCKETS, DEADLETTER, LEASES, STREAMS
from contracts.subjects import DEADLETTER_OPS_SUBJECT
from services.ops.dlq import discarded
from services.runtime.bus import Bus
from services.runtime.lease import read_lease
from services.runtime.provisioning import retention_name


async def collect_status(bus: Bus) -> dict[str, Any]:
    """Everything `svc status` shows, as plain data."""
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
        "dead_letters": max(0, letters),
        "dead_letters_dropped": gone,
    }


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
                }
            )
    return leases


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
    lines.append(f"\nDEAD LETTERS: {status['dead_letters']} open ('svc dlq ls')")
    if status.get("dead_letters_dropped"):
        lines.append(
            f"  {status['dead_letters_dropped']} older dead letters were dropped by the"
            " DEADLETTER limits (max age / bytes)"
        )
    return "\n".join(lines)


def to_json(status: dict[str, Any]) -> str:
    """The `--json` view."""
    return msgspec.json.encode(status).decode()
