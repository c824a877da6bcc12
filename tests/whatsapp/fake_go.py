"""A fake of neonize's Go bridge (`NewAClient._NewAClient__client`), in process.

The real `NewAClient` is kept whole; only the object it calls into Go through is this
one. Like whatsmeow, it calls the client's real callbacks from its own thread:

- pairing: `codes` QR codes through the QR callback, then (if a phone confirms,
  `device`) the device row in the store and a PairStatus SUCCESS event;
- a session: `emit(event)` hands a real `Neonize_pb2` event (tests/whatsapp/
  neonize_events.py) to the client's event entry point (`Event.execute`), in order;
  `Connected` is emitted on connect unless `auto_connected` is off;
- `SendMessage` records the message and answers with a real SendMessageReturnFunction:
  an id, a scripted Go error string, or it blocks (whatsmeow's 75 s wait for the ack);
  while `online` is off it answers `websocket not connected`, as whatsmeow does;
- `connect_errors`: each connect takes the next one and fails with it at once (DNS,
  refused...), as neonize's `Neonize()` returns an error string;
- `Stop` optionally blocks (a dial in flight) until `unblock_stop` is set;
- `MarkRead` / `SendChatPresence` record read receipts and typing states in `presence`
  (in call order), or answer the Go error `presence_error` when it is set.
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

from google.protobuf.message import Message as Proto

from services.runtime.settings import SessionStore
from services.whatsapp.neonize_store import neonize_module
from tests.whatsapp import neonize_events as nev

nz = neonize_module("neonize.proto.Neonize_pb2")
wa = neonize_module("neonize.proto.waE2E.WAWebProtobufsE2E_pb2")
EVENT_CODES: dict[type[Proto], int] = neonize_module("neonize.events").EVENT_TO_INT
_TIMINGS = (
    "Queue", "Marshal", "GetParticipants", "GetDevices", "GroupEncrypt", "PeerEncrypt", "Send",
    "Resp", "Retry",
)  # fmt: skip
BLOCK = "<block>"  # a send script entry: the call never answers until released


@dataclass(frozen=True)
class SentMessage:
    """A message the account sent, as the fake network received it."""

    chat: str
    message: Any  # waE2E.Message

    @property
    def text(self) -> str:
        if self.message.HasField("extendedTextMessage"):
            return str(self.message.extendedTextMessage.text)
        return str(self.message.conversation)

    @property
    def reply_to(self) -> str | None:
        if self.message.HasField("extendedTextMessage"):
            context = self.message.extendedTextMessage.contextInfo
            return str(context.stanzaID) or None
        return None


@dataclass(frozen=True)
class PresenceCall:
    """A read receipt or chat presence the account sent, as the fake network saw it."""

    action: str  # read | typing | paused
    chat: str
    message_ids: tuple[str, ...] = ()
    sender: str = ""


def _jid_text(data: bytes) -> str:
    parsed = nz.JID.FromString(data)
    return f"{parsed.User}@{parsed.Server}"


class FakeGo:
    """Stands in for neonize's Go bridge (see the module docstring)."""

    def __init__(
        self,
        store: SessionStore | None = None,
        *,
        codes: int = 0,
        device: str | None = None,
        auto_connected: bool = True,
    ) -> None:
        self.store = store
        self.codes = codes
        self.device = device
        self.auto_connected = auto_connected
        self.stopped = threading.Event()
        self.code_asked = threading.Event()
        self.qr_sent = 0
        self.phone = ""
        self.neonize_args: tuple[Any, ...] = ()
        self.thread: threading.Thread | None = None
        # session scripting
        self.connect_errors: list[str] = []
        self.connect_times: list[float] = []  # time.monotonic() of each Neonize() call
        self.send_script: list[str] = []  # Go error strings or BLOCK, taken per send
        self.sent: list[SentMessage] = []
        self.send_calls = 0
        self.online = True
        self.release_sends = threading.Event()
        self.block_stop = False
        self.unblock_stop = threading.Event()
        self.stop_calls = 0
        self.presence: list[PresenceCall] = []
        self.presence_error = ""
        self._ids = itertools.count(1)
        self._live: tuple[bytes, Any] | None = None  # (uuid, event callback) of the client
        self._outbox: queue.Queue[Proto] = queue.Queue()
        self._live_changed = threading.Condition()
        self._pump: threading.Thread | None = None

    # -- the Go calls NewAClient makes -----------------------------------------------

    async def Neonize(self, *args: Any) -> bytes:
        self.neonize_args = args
        self.connect_times.append(time.monotonic())
        if self.connect_errors:
            return self.connect_errors.pop(0).encode()  # the dial failed: Neonize returns it
        uuid, qr_cb, event_cb = args[1], args[6], args[8]
        self.stopped.clear()
        if self.codes:  # pairing
            self.thread = threading.Thread(target=self._pairing, args=(uuid, qr_cb, event_cb))
            self.thread.start()
        else:
            with self._live_changed:
                self._live = (uuid, event_cb)
                self._live_changed.notify_all()
            self._ensure_pump()
            if self.auto_connected:
                self.emit(nev.connected())
        await asyncio.to_thread(self.stopped.wait)  # Go's Neonize() returns when stopped
        return b""

    async def SendMessage(
        self, uuid: bytes, to: bytes, to_size: int, message: bytes, message_size: int
    ) -> bytes:
        self.send_calls += 1
        if not self.online:
            return nz.SendMessageReturnFunction(Error="websocket not connected").SerializeToString()
        step = self.send_script.pop(0) if self.send_script else ""
        if step == BLOCK:
            await asyncio.to_thread(self.release_sends.wait)
            step = "timed out waiting for message send response"
        if step:
            return nz.SendMessageReturnFunction(Error=step).SerializeToString()
        chat = nz.JID.FromString(to)
        self.sent.append(SentMessage(f"{chat.User}@{chat.Server}", wa.Message.FromString(message)))
        response = nz.SendResponse(
            Timestamp=1_764_500_000,
            ID=f"3EB0FAKE{next(self._ids):06d}",
            ServerID=0,
            DebugTimings=nz.MessageDebugTimings(**dict.fromkeys(_TIMINGS, 0)),
        )
        return nz.SendMessageReturnFunction(SendResponse=response).SerializeToString()

    async def MarkRead(
        self,
        uuid: bytes,
        ids: bytes,
        timestamp: int,
        chat: bytes,
        chat_size: int,
        sender: bytes,
        sender_size: int,
        receipt: bytes,
    ) -> bytes:
        if self.presence_error:
            return self.presence_error.encode()
        self.presence.append(
            PresenceCall(
                "read" if receipt == b"read" else receipt.decode(),
                _jid_text(chat),
                tuple(ids.decode().split()),
                _jid_text(sender),
            )
        )
        return b""

    async def SendChatPresence(
        self, uuid: bytes, jid: bytes, jid_size: int, state: int, media: int
    ) -> bytes:
        if self.presence_error:
            return self.presence_error.encode()
        action = {0: "typing", 1: "paused"}[state]  # whatsmeow's ChatPresence values
        self.presence.append(PresenceCall(action, _jid_text(jid)))
        return b""

    async def Stop(self, uuid: bytes) -> None:
        self.stop_calls += 1
        if self.block_stop:
            await asyncio.to_thread(self.unblock_stop.wait)
        with self._live_changed:
            self._live = None
        self.stopped.set()

    async def PairPhone(self, uuid: bytes, payload: bytes, size: int) -> bytes:
        if self.qr_sent == 0:  # neonize's client has no Go client before the first QR
            return nz.PairPhoneReturnFunction(Error="client is nil").SerializeToString()
        self.phone = nz.PairPhoneParams.FromString(payload).phone
        self.code_asked.set()
        return nz.PairPhoneReturnFunction(Code="ABCD-1234").SerializeToString()

    # -- what the test drives --------------------------------------------------------

    def emit(self, event: Proto) -> None:
        """Hand `event` to the connected client from the whatsmeow thread (in order)."""
        self._ensure_pump()
        self._outbox.put(event)

    def close(self) -> None:
        """Release anything blocked (sends, stops) and end the whatsmeow thread."""
        self.release_sends.set()
        self.unblock_stop.set()
        self.stopped.set()
        self._outbox.put(_STOP)
        if self._pump is not None:
            with self._live_changed:
                self._live_changed.notify_all()
            self._pump.join(5)

    # -- internals -------------------------------------------------------------------

    def _ensure_pump(self) -> None:
        if self._pump is None:
            self._pump = threading.Thread(target=self._whatsmeow, name="fake-whatsmeow")
            self._pump.start()

    def _whatsmeow(self) -> None:
        while True:
            event = self._outbox.get()
            if event is _STOP:
                return
            with self._live_changed:  # events wait for a connected client
                while self._live is None and not self.release_sends.is_set():
                    self._live_changed.wait(0.1)
                live = self._live
            if live is None:
                return
            uuid, event_cb = live
            data = event.SerializeToString()
            buf = ctypes.create_string_buffer(data, len(data))
            event_cb(uuid, ctypes.addressof(buf), len(data), EVENT_CODES[type(event)])

    phone_mode = False

    def _pairing(self, uuid: bytes, qr_cb: Any, event_cb: Any) -> None:
        from tests.whatsapp.test_neonize_store import add_device

        for n in range(self.codes):
            code = ctypes.create_string_buffer(f"2@qr-code-{n}".encode())
            self.qr_sent += 1  # first: the loop may answer the callback before it returns
            qr_cb(None, ctypes.addressof(code))
        if self.device is None or self.stopped.is_set():
            return
        if self.phone_mode and not self.code_asked.wait(30):
            return
        assert self.store is not None
        add_device(self.store, self.device)  # whatsmeow saves the device, then reports it
        event = nz.PairStatus(
            ID=nev.jid(self.device), Status=nz.PairStatus.SUCCESS, BusinessName="", Platform=""
        ).SerializeToString()
        buf = ctypes.create_string_buffer(event, len(event))
        event_cb(uuid, ctypes.addressof(buf), len(event), EVENT_CODES[nz.PairStatus])


_STOP: Any = object()
