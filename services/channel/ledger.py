"""The `sends` bucket: each job's delivery state, and transport id -> job for receipts."""

from __future__ import annotations

import asyncio

import msgspec
import nats.errors
import nats.js.errors
from nats.js.api import PubAck
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.codec import decode, encode
from contracts.payloads import SendRecord, SentIndex
from contracts.streams import SENDS
from services.runtime.bus import Bus


class SendLedger:
    """Read and write SendRecords; the record written before a send is what makes a crash
    between the transport call and `MessageSent` visible (`DeliveryUncertain`)."""

    def __init__(self, bus: Bus, account: str) -> None:
        self.bus = bus
        self.account = account
        self._kv: KeyValue | None = None
        self.recent: dict[str, SentIndex] = {}  # transport id -> job, newest sends first
        self._recent_cap = 10_000

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.js.key_value(SENDS.name)
        return self._kv

    async def get(self, job_id: str) -> SendRecord | None:
        """The job's record, or None if it was never attempted."""
        try:
            entry = await (await self._bucket()).get(subjects.send_key(self.account, job_id))
        except nats.js.errors.KeyNotFoundError:
            return None
        if not entry.value:
            return None
        try:
            return decode(entry.value, SendRecord)
        except msgspec.DecodeError:
            return None

    async def put(self, record: SendRecord) -> int:
        """Write the job's record (last write wins: one owner per account writes); return
        the entry's revision."""
        return await (await self._bucket()).put(
            subjects.send_key(self.account, record.job_id), encode(record)
        )

    async def put_async(self, record: SendRecord) -> asyncio.Future[PubAck]:
        """`put`, sent without waiting (the future resolves to the write's ack): what lets
        the `sent` record go out with the job's other writes and be waited for once."""
        key = subjects.send_key(self.account, record.job_id)
        return await self.bus.js.publish_async(f"$KV.{SENDS.name}.{key}", encode(record))

    async def undo(self, job_id: str, revision: int, previous: SendRecord | None) -> bool:
        """Put back what the record was before the write at `revision` (a `sending` whose
        send never started), unless someone wrote since: then theirs stands. True if undone."""
        kv = await self._bucket()
        key = subjects.send_key(self.account, job_id)
        try:
            if previous is None:
                await kv.delete(key, last=revision)
            else:
                await kv.update(key, encode(previous), last=revision)
        except (nats.js.errors.Error, nats.errors.Error):
            return False
        return True

    async def raise_boundary(self, delivered_upto: int) -> int:
        """Record that jobs up to stream seq `delivered_upto` were handed to an owner, and
        return the highest such boundary ever recorded: every job at or below it may have
        been mid-send when its owner stopped. Kept durably so an owner dying during a
        takeover cannot lose it."""
        kv = await self._bucket()
        key = f"{self.account}.=inflight"
        try:
            entry = await kv.get(key)
            known = int(entry.value or b"0")
        except nats.js.errors.KeyNotFoundError:
            known = 0
        if delivered_upto > known:
            await kv.put(key, str(delivered_upto).encode())
            return delivered_upto
        return known

    async def index(self, transport_message_id: str, job_id: str, chat: str) -> None:
        """Remember which job a transport message id belongs to."""
        entry = SentIndex(job_id=job_id, chat=chat)
        self.recent[transport_message_id] = entry
        if len(self.recent) > self._recent_cap:
            self.recent.pop(next(iter(self.recent)))
        key = subjects.sent_index_key(self.account, transport_message_id)
        await (await self._bucket()).put(key, encode(entry))

    async def confirm(self, job_id: str, transport_message_id: str) -> None:
        """Record that the network reported `job_id` as sent, under `transport_message_id`
        (a Cloud API status webhook echoes the job id in `biz_opaque_callback_data`): what
        resolves a send whose outcome the egress could not tell. Written by any receiver,
        read by the owner (`confirmed`); kept apart from the owner's SendRecord."""
        await self._mark(subjects.confirm_key(self.account, job_id), transport_message_id)

    async def confirmed(self, job_id: str) -> str | None:
        """The transport message id the network confirmed for `job_id`, or None."""
        return await self._marked(subjects.confirm_key(self.account, job_id))

    async def followed_up(self, job_id: str, follow_up: str) -> None:
        """Record that `job_id`'s refusal was followed up by the job `follow_up` (enqueued)."""
        await self._mark(subjects.followup_key(self.account, job_id), follow_up)

    async def follow_up_of(self, job_id: str) -> str | None:
        """The job that followed up `job_id`'s refusal, if one was enqueued."""
        return await self._marked(subjects.followup_key(self.account, job_id))

    async def _mark(self, key: str, value: str) -> None:
        await (await self._bucket()).put(key, value.encode())

    async def _marked(self, key: str) -> str | None:
        try:
            entry = await (await self._bucket()).get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def job_of(self, transport_message_id: str) -> SentIndex | None:
        """The job a transport message id belongs to, if we sent it."""
        if found := self.recent.get(transport_message_id):
            return found
        key = subjects.sent_index_key(self.account, transport_message_id)
        try:
            entry = await (await self._bucket()).get(key)
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode(entry.value, SentIndex) if entry.value else None
