"""The home of per-account session state: which paired device an account resumes.

A session transport (neonize) keeps each account's device keys in its own session store
(SQLite on one host, or Postgres shared by every host for failover). What any host needs
besides to resume the account -- which device of that store is the account's -- is
recorded here, in the `devices` KV bucket, by the pairing command; a transport reads it
before it connects, and an account without a record is parked as needing pairing
instead of connecting (resuming a device missing from the store aborts neonize).
"""

from __future__ import annotations

import nats.js.errors
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.codec import decode, encode
from contracts.events import utcnow
from contracts.payloads import DeviceRecord
from contracts.streams import DEVICES
from services.runtime.bus import Bus


class DeviceRegistry:
    """Read and write the accounts' device records of one channel."""

    def __init__(self, bus: Bus, channel: str) -> None:
        self.bus = bus
        self.channel = subjects.check_channel(channel)
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.js.key_value(DEVICES.name)
        return self._kv

    async def get(self, account: str) -> DeviceRecord | None:
        """The account's device, or None if it was never paired (or was unlinked)."""
        try:
            entry = await (await self._bucket()).get(subjects.lease_key(self.channel, account))
        except nats.js.errors.KeyNotFoundError:
            return None
        return decode(entry.value, DeviceRecord) if entry.value else None

    async def record(self, account: str, device_id: str, *, by: str = "") -> DeviceRecord:
        """Record that `account` now resumes `device_id` (after a pairing)."""
        subjects.check_jid(device_id, "device id")
        record = DeviceRecord(
            channel=self.channel,
            account=account,
            device_id=device_id,
            paired_at=utcnow(),
            paired_by=by,
        )
        await (await self._bucket()).put(subjects.lease_key(self.channel, account), encode(record))
        return record

    async def forget(self, account: str) -> None:
        """Remove the account's device (the network unlinked it: it must be paired again)."""
        key = subjects.lease_key(self.channel, account)
        try:
            await (await self._bucket()).delete(key)
        except nats.js.errors.KeyNotFoundError:
            return

    async def all(self) -> list[DeviceRecord]:
        """Every account's device record of this channel, by account."""
        await self._bucket()
        # The stream's subject list, not kv.keys(): that would leave a consumer behind.
        prefix = f"$KV.{DEVICES.name}.{self.channel}."
        info = await self.bus.js.stream_info(f"KV_{DEVICES.name}", subjects_filter=f"{prefix}>")
        found = []
        for subject in sorted(info.state.subjects or {}):
            record = await self.get(subject.removeprefix(prefix))
            if record is not None:
                found.append(record)
        return found
