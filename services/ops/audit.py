"""`svc audit`: read the streams (ephemeral consumers and direct gets only, so a live
system is not disturbed) in the order the rules need, and judge with projections.audit.

The order: ACCOUNTS, INBOUND, the core consumer's ack floor, AGENT, DEADLETTER, OUTBOUND's
queued jobs, DELIVERY, SIM_OUT. Each later read covers what the earlier one could not see
yet: a turn is recorded before its inbound is acked, a job's outcome before the job leaves
the work queue. Memory grows with messages and jobs, never with the events about them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from typing import Any

import nats.js.errors

from contracts.codec import decode, decoder
from contracts.errors import ContractError
from contracts.events import (
    AccountEvent,
    AgentEvent,
    DeadLetterEvent,
    DeliveryEvent,
    MessageReceived,
    SendMessage,
)
from contracts.payloads import SimOutbound
from contracts.streams import (
    ACCESS,
    ACCOUNTS,
    AGENT,
    CORE_CONSUMER,
    DEADLETTER,
    DELIVERY,
    INBOUND,
    OUTBOUND,
    PLUGINS,
    SIM_OUT,
)
from projections.audit import Auditor, Report
from services.runtime.bus import Bus
from services.runtime.provisioning import require_streams
from services.runtime.reader import queued, read

# A stored message without a time (not from JetStream) sorts first.
_NO_TIME = datetime.min.replace(tzinfo=UTC)


@dataclass(frozen=True)
class Scope:
    """What to audit: one account or all, a time window, the grace for "lost", and
    whether to rebuild the plugin projection twice (None: when PLUGINS is small)."""

    account: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    grace: float = 60.0
    replay: bool | None = None


# Every stream the audit reads.
AUDITED = tuple(
    s.name for s in (ACCOUNTS, INBOUND, AGENT, DEADLETTER, OUTBOUND, DELIVERY, SIM_OUT, PLUGINS)
)
REPLAY_BY_DEFAULT_UPTO = 100_000  # PLUGINS events; above that only with --replay


async def audit(
    bus: Bus, scope: Scope, *, progress: Callable[[str, int], None] | None = None
) -> tuple[Report, float]:
    """Run every rule over the log; return the report and the seconds it took."""
    started = time.perf_counter()
    # A stream that does not exist reads as empty: judging that would say "ok" about
    # nothing. Refuse, naming what is missing (a fresh server where no role has started).
    await require_streams(bus.js, AUDITED, "nothing to audit, so no verdict")
    auditor = Auditor(
        since=scope.since, until=scope.until, grace=scope.grace, account=scope.account
    )
    acct = scope.account or "*"
    for stream in (ACCOUNTS.name, AGENT.name, DELIVERY.name):
        if (first := await _first_if_truncated(bus, stream)) is not None:
            auditor.history_starts(stream, first)
    tick = progress or (lambda _stream, _n: None)

    async def each(stream: str, subject: str, kind: Any, feed: Callable[..., None]) -> None:
        decoding = decoder(kind)
        n = 0
        async for stored in read(bus, stream, subject=subject):
            n += 1
            if n % 50_000 == 0:
                tick(stream, n)
            try:
                event = decoding(stored.data)
            except ContractError:
                auditor.skipped(stream)
                continue
            feed(stored.seq, stored.time or _NO_TIME, event)
        tick(stream, n)

    await each(ACCOUNTS.name, f"accounts.*.{acct}", AccountEvent, auditor.account_event)
    await each(INBOUND.name, f"inbound.*.{acct}.*", MessageReceived, auditor.inbound)
    auditor.core_progress(await _core_ack_floor(bus))
    await each(AGENT.name, f"agent.*.{acct}.*", AgentEvent, auditor.turn)
    await each(DEADLETTER.name, ">", DeadLetterEvent, auditor.dead_letter)
    await _queued_jobs(bus, f"outbound.*.{acct}.*", auditor)
    await each(DELIVERY.name, f"delivery.*.{acct}.*", DeliveryEvent, auditor.delivery)

    async for stored in read(bus, SIM_OUT.name, subject=f"sim.whatsapp.{acct}.out"):
        try:
            sent = decode(stored.data, SimOutbound)
        except ContractError:
            auditor.skipped(SIM_OUT.name)
            continue
        account = stored.subject.split(".")[2]
        auditor.network_send(
            stored.seq,
            stored.time or _NO_TIME,
            account,
            sent.chat,
            sent.job_id,
            sent.holder,
            sent.lease_token,
        )
    await _replay_twice(bus, scope, auditor)
    report = auditor.finish(datetime.now(UTC))
    return report, time.perf_counter() - started


async def _replay_twice(bus: Bus, scope: Scope, auditor: Auditor) -> None:
    """Invariant 5 on the real log: rebuild the plugin projection twice, in memory, up to
    the same sequence, and compare every row."""
    from services.plugins.projection import PluginProjection
    from services.plugins.registry import discover, manifests

    await _replay_access_twice(bus, scope, auditor)
    try:
        upto = (await bus.js.stream_info(PLUGINS.name)).state.last_seq
    except nats.js.errors.NotFoundError:
        return
    if scope.replay is False or (scope.replay is None and upto > REPLAY_BY_DEFAULT_UPTO):
        return
    dumps = []
    for _ in range(2):
        async with PluginProjection(bus, ":memory:", manifests(discover()), fresh=True) as p:
            await p.catch_up(upto=upto)
            dumps.append(await p.dump())
    first, second = dumps
    differ = [table for table in first if first[table] != second.get(table)]
    auditor.replayed(PLUGINS.name, upto, {f"{t} rows": len(r) for t, r in first.items()}, differ)


async def _replay_access_twice(bus: Bus, scope: Scope, auditor: Auditor) -> None:
    """The same for the access view (ADR 0023): ACCESS folded twice up to one sequence."""
    from projections.access import AccessView
    from services.core.access import catch_up

    try:
        upto = (await bus.js.stream_info(ACCESS.name)).state.last_seq
    except nats.js.errors.NotFoundError:
        return
    if (
        not upto
        or scope.replay is False
        or (scope.replay is None and upto > REPLAY_BY_DEFAULT_UPTO)
    ):
        return
    rows = []
    for _ in range(2):
        view = AccessView()
        await catch_up(bus, view, upto=upto)
        rows.append(view.rows())
    first, second = rows
    differ = [table for table in first if first[table] != second.get(table)]
    auditor.replayed(ACCESS.name, upto, {f"{t} rows": len(r) for t, r in first.items()}, differ)


async def _first_if_truncated(bus: Bus, stream: str) -> datetime | None:
    """When `stream` no longer starts at sequence 1 (aged out, purged): its oldest
    message's time."""
    try:
        info = await bus.js.stream_info(stream)
        if info.state.first_seq <= 1 or not info.state.messages:
            return None
        first = await bus.js.get_msg(stream, info.state.first_seq, next=True)
    except nats.js.errors.NotFoundError:
        return None
    return first.time


async def _core_ack_floor(bus: Bus) -> int:
    """The INBOUND sequence up to which the core has acked everything (0: no core yet)."""
    try:
        info = await bus.js.consumer_info(INBOUND.name, CORE_CONSUMER)
    except nats.js.errors.NotFoundError:
        return 0
    return int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0


async def _queued_jobs(bus: Bus, subject: str, auditor: Auditor) -> None:
    """Jobs still in the OUTBOUND work queue."""
    async for stored in queued(bus, OUTBOUND.name, subject=subject):
        try:
            job = decode(stored.data, SendMessage)
        except ContractError:
            auditor.skipped(OUTBOUND.name)
            continue
        auditor.pending(stored.seq, stored.time or _NO_TIME, job)


def to_builtins(report: Report, elapsed: float, scope: Scope) -> dict[str, Any]:
    """The report as JSON-ready data (`svc audit --json`)."""
    by_rule = report.by_rule()
    return {
        "ok": report.ok,
        "scope": {
            "account": scope.account,
            "since": scope.since.isoformat() if scope.since else None,
            "until": scope.until.isoformat() if scope.until else None,
            "grace_s": scope.grace,
        },
        "elapsed_s": round(elapsed, 3),
        "events": report.counts,
        "skipped": report.skipped,
        "rules": {
            rule: {
                "ok": not found,
                "ran": rule in report.checked,
                "checked": report.checked.get(rule, {}),
                "violations": [
                    {**asdict(v), "event_ids": list(v.event_ids), "refs": list(v.refs)}
                    for v in found
                ],
            }
            for rule, found in by_rule.items()
        },
        "summary": {
            "history_starts": {k: v.isoformat() for k, v in report.horizons.items()},
            "dead_letters": report.dead_letters,
            "uncertain": report.uncertain,
            "pending_jobs": report.pending_jobs,
            "oldest_pending": report.oldest_pending.isoformat() if report.oldest_pending else None,
            "waiting_inbound": report.waiting_inbound,
            "leases": {
                account: [
                    {
                        "at": e.at.isoformat(),
                        "event": e.event,
                        "holder": e.holder,
                        "token": e.token,
                        "reason": e.reason,
                    }
                    for e in entries
                ]
                for account, entries in sorted(report.leases.items())
            },
        },
    }


def render(report: Report, elapsed: float, scope: Scope) -> str:
    """The report for people: one line per rule, violations with their event ids, summary."""
    total = sum(report.counts.values())
    rate = total / elapsed if elapsed > 0 else 0.0
    where = f"account {scope.account}" if scope.account else "all accounts"
    window = ""
    if scope.since or scope.until:
        window = f", {scope.since.isoformat() if scope.since else '-'}"
        window += f" .. {scope.until.isoformat() if scope.until else '-'}"
    lines = [
        f"audit of {where}{window}: {total:,} events in {elapsed:.2f} s ({rate:,.0f}/s)",
        "  " + ", ".join(f"{s} {n:,}" for s, n in report.counts.items()),
    ]
    if report.skipped:
        skipped = ", ".join(f"{s} {n}" for s, n in report.skipped.items())
        lines.append(f"  skipped (undecodable): {skipped}")
    lines.append("")
    by_rule = report.by_rule()
    for rule, found in by_rule.items():
        checked = ", ".join(f"{what} {n:,}" for what, n in report.checked.get(rule, {}).items())
        verdict = "ok" if not found else f"VIOLATED ({len(found)})"
        if rule not in report.checked:
            verdict, checked = "not run", "(--replay to rebuild the plugin projection twice)"
        lines.append(f"{rule:<12} {verdict:<16} {checked}")
    for rule, found in by_rule.items():
        for v in found:
            lines.append("")
            lines.append(f"[{rule}] {v.account}: {v.message}")
            lines.append(f"    events: {', '.join(v.event_ids)}")
            if v.refs:
                lines.append(f"    stored at: {', '.join(v.refs)}")
    lines.append("")
    lines.append("summary")
    for stream, first in sorted(report.horizons.items()):
        lines.append(
            f"  {stream} no longer holds its beginning (oldest {first.isoformat()}):"
            " what only older events could vouch for was not judged"
        )
    dead = ", ".join(f"{k} {n}" for k, n in sorted(report.dead_letters.items())) or "none"
    lines.append(f"  dead letters: {dead}")
    resolutions: dict[str, int] = {}
    for u in report.uncertain:
        resolutions[u["resolution"] or "?"] = resolutions.get(u["resolution"] or "?", 0) + 1
    uncertain = ", ".join(f"{k} {n}" for k, n in sorted(resolutions.items()))
    lines.append(
        f"  uncertain sends: {len(report.uncertain)}" + (f" ({uncertain})" if uncertain else "")
    )
    for u in report.uncertain[:20]:
        lines.append(
            f"    job {u['job_id']} ({u['account']}, {u['chat']}): {u['holder']} token"
            f" {u['lease_token']} -> {u['resolution']}"
        )
    oldest = f", oldest {report.oldest_pending.isoformat()}" if report.oldest_pending else ""
    lines.append(f"  queued jobs: {report.pending_jobs}{oldest}")
    if report.waiting_inbound:
        lines.append(f"  inbound messages waiting for the core: {report.waiting_inbound}")
    lines.append("  lease timeline:")
    if not report.leases:
        lines.append("    (no lease events)")
    for account, entries in sorted(report.leases.items()):
        lines.append(f"    {account}")
        for e in entries[-50:]:
            token = f" token {e.token}" if e.token else ""
            reason = f" ({e.reason})" if e.reason else ""
            who = f" {e.holder}" if e.holder else ""
            lines.append(
                f"      {e.at.isoformat(timespec='milliseconds')} {e.event}{who}{token}{reason}"
            )
        if len(entries) > 50:
            lines.append(f"      ... {len(entries) - 50} earlier entries (see --json)")
    return "\n".join(lines)
