"""The `chats` bucket: per-chat turn position and history, written with a revision check."""

from __future__ import annotations

import asyncio
from collections import OrderedDict

import nats.js.errors
from nats.js.kv import KeyValue

from contracts.codec import decode, encode
from contracts.payloads import ChatState
from contracts.streams import CHATS
from services.runtime.bus import Bus

# Chats whose last state this replica remembers (the oldest forgotten first).
MAX_CACHED = 10_000


class ChatStore:
    """Read a chat's state with its revision; save only over that revision.

    Remembers the last state it read or wrote per chat (`cached`): a replica that settled
    a chat's previous message holds its latest revision unless another replica settled
    one since -- which the caller rules out (ADR 0035) -- and a save over a stale
    revision fails the check anyway, so a stale entry is never written over the record.
    """

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self._kv: KeyValue | None = None
        self._opening = asyncio.Lock()
        self._cache: OrderedDict[str, tuple[ChatState, int]] = OrderedDict()

    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            async with self._opening:  # a first batch's turns open it once, not each
                if self._kv is None:
                    self._kv = await self.bus.js.key_value(CHATS.name)
        return self._kv

    def cached(self, key: str) -> tuple[ChatState, int] | None:
        """The state and revision this replica last read or wrote for `key`, if any."""
        return self._cache.get(key)

    def forget(self) -> None:
        """Drop every remembered state (another replica may have settled any chat)."""
        self._cache.clear()

    def _remember(self, key: str, state: ChatState, revision: int) -> None:
        self._cache[key] = (state, revision)
        self._cache.move_to_end(key)
        if len(self._cache) > MAX_CACHED:
            self._cache.popitem(last=False)

    async def get(self, key: str, chat: str) -> tuple[ChatState, int]:
        """The chat's state and revision (a fresh state and 0 for a new chat)."""
        try:
            entry = await (await self._bucket()).get(key)
        except nats.js.errors.KeyNotFoundError:
            found = ChatState(chat=chat), 0
        else:
            revision = entry.revision or 0
            found = (
                (decode(entry.value, ChatState), revision)
                if entry.value
                else (ChatState(chat=chat), revision)
            )
        self._remember(key, *found)
        return found

    async def save(self, key: str, state: ChatState, revision: int) -> bool:
        """Write `state` if the key is still at `revision`; False if someone wrote first."""
        kv = await self._bucket()
        try:
            if revision == 0:
                written = await kv.create(key, encode(state))
            else:
                written = await kv.update(key, encode(state), last=revision)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.BadRequestError):
            self._cache.pop(key, None)
            return False
        except BaseException:
            self._cache.pop(key, None)  # written or not: unknown
            raise
        self._remember(key, state, written)
        return True
