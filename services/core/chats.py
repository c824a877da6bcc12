"""The `chats` bucket: per-chat turn position and history, written with a revision check."""

from __future__ import annotations

import nats.js.errors
from nats.js.kv import KeyValue

from contracts.codec import decode, encode
from contracts.payloads import ChatState
from contracts.streams import CHATS
from services.runtime.bus import Bus


class ChatStore:
    """Read a chat's state with its revision; save only over that revision."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.js.key_value(CHATS.name)
        return self._kv

    async def get(self, key: str, chat: str) -> tuple[ChatState, int]:
        """The chat's state and revision (a fresh state and 0 for a new chat)."""
        try:
            entry = await (await self._bucket()).get(key)
        except nats.js.errors.KeyNotFoundError:
            return ChatState(chat=chat), 0
        if not entry.value:
            return ChatState(chat=chat), entry.revision or 0
        return decode(entry.value, ChatState), entry.revision or 0

    async def save(self, key: str, state: ChatState, revision: int) -> bool:
        """Write `state` if the key is still at `revision`; False if someone wrote first."""
        kv = await self._bucket()
        try:
            if revision == 0:
                await kv.create(key, encode(state))
            else:
                await kv.update(key, encode(state), last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            return False
        return True
