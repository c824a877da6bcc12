"""What is still queued on OUTBOUND, per account and chat, with each job's send state
from the `sends` bucket (the console's outbound page and GET /api/v1/outbound)."""

from __future__ import annotations

from typing import Any

from contracts import subjects
from contracts.codec import decode
from contracts.errors import ContractError
from contracts.events import CHANNEL_WHATSAPP, SendMessage
from contracts.streams import OUTBOUND
from services.channel.ledger import SendLedger
from services.runtime.bus import Bus
from services.runtime.reader import queued

# Read by direct gets (a work queue admits no second consumer), one per job plus one for
# its send record: bounded, so a flooded queue cannot make one request read it all.
MAX_JOBS = 5000
PREVIEW_CHARS = 80


async def queued_jobs(bus: Bus, account: str | None = None) -> list[dict[str, Any]]:
    """The jobs still on OUTBOUND (of `account`, or all), ordered by account, chat and
    queue position (the order each chat's jobs are sent in); at most MAX_JOBS of them.
    `send_state` is `queued` until the owner first tries the job, then its SendRecord's."""
    subject = subjects.outbound_filter(CHANNEL_WHATSAPP, account) if account else "outbound.>"
    ledgers: dict[str, SendLedger] = {}
    rows: list[dict[str, Any]] = []
    async for stored in queued(bus, OUTBOUND.name, subject=subject):
        if len(rows) >= MAX_JOBS:
            break
        at = stored.time.isoformat(timespec="seconds") if stored.time else ""
        try:
            job = decode(stored.data, SendMessage)
        except ContractError:
            rows.append(_row(stored.seq, at, stored.subject, send_state="undecodable"))
            continue
        ledger = ledgers.setdefault(job.account, SendLedger(bus, job.account))
        record = await ledger.get(job.job_id)
        text = job.text if len(job.text) <= PREVIEW_CHARS else job.text[: PREVIEW_CHARS - 3] + "..."
        rows.append(
            _row(
                stored.seq,
                at,
                stored.subject,
                account=job.account,
                chat=job.chat,
                job_id=job.job_id,
                text=text,
                send_state=record.state if record else "queued",
                attempt=record.attempt if record else 0,
                holder=record.holder if record else "",
                lease_token=record.lease_token if record else 0,
                last_error=record.errors[-1].error if record and record.errors else "",
            )
        )
    rows.sort(key=lambda r: (r["account"], r["chat"], r["seq"]))
    return rows


def _row(seq: int, at: str, subject: str, **fields: Any) -> dict[str, Any]:
    row: dict[str, Any] = {
        "seq": seq,
        "at": at,
        "account": "",
        "chat": "",
        "job_id": "",
        "text": "",
        "send_state": "",
        "attempt": 0,
        "holder": "",
        "lease_token": 0,
        "last_error": "",
        "subject": subject,
    }
    row.update(fields)
    return row


def per_chat(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """How many jobs each (account, chat) has queued, and since when."""
    counts: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        key = (row["account"], row["chat"])
        found = counts.setdefault(
            key, {"account": key[0], "chat": key[1], "queued": 0, "oldest": row["at"]}
        )
        found["queued"] += 1
        found["oldest"] = min(found["oldest"], row["at"]) if row["at"] else found["oldest"]
    return list(counts.values())
