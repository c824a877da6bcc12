"""A fake WhatsApp network shared by several processes: the test's nats-server plays
WhatsApp's servers, and each `svc` process's real `NewAClient` talks to it through
`FakeBridge`, a stand-in for neonize's Go bridge (`NewAClient._NewAClient__client`).

Design (the simplest one that is correct across processes):
- One arbiter, `FakeWhatsApp`, runs in the test process on the test's bus. Every bridge
  call that changes or needs the network's state (connect, send, stop) is a NATS request
  on the one subject `fakewa.rpc`, and the arbiter handles them one at a time (a single
  subscription, under one lock with the inbound feed): "which socket holds device D" is
  decided in one place, in one order, as WhatsApp's servers decide it. No check-then-act
  race between processes is possible, because no process checks anything itself.
- The rules faked are WhatsApp's: one connected socket per device; a connect of a device
  connected elsewhere sends StreamReplaced to the older socket and cuts it off (its later
  sends fail with `websocket not connected`); a send of the connected socket is recorded
  and answered with a server message id; what users send is kept while no socket is
  connected and handed to the next one (stream FAKEWA holds `fakewa.in.<device>`, so a
  test's publish is never lost); a message stays the network's until a socket acks it
  (whatsmeow acks once its event handler returned, before neonize's Python coroutine
  ran), so one pushed to a socket whose process died is handed to the next socket; a
  connect emits Connected. Faults on demand: a send answered late (`slow_next_sends`:
  the message is out, the sender may time out unsure) or with a Go error
  (`fail_next_sends`).
- Stream FAKEWA also holds the network's log, `fakewa.log.<device>`: every connect and
  every accepted send, with the socket and the process id (a holder id carries its pid),
  in the order the arbiter accepted them. `one_socket_at_a_time(records)` checks that a
  send only ever came from the device's latest socket.
- `FakeBridge` lives in the `svc` process, on the loop neonize calls it from (neonize's
  async client awaits every bridge call there), with a nats-py connection of its own,
  opened by the connect (`Neonize`) and closed by `Stop`. Events reach neonize as
  whatsmeow sends them: through the client's real entry point (`event_cb`, i.e.
  `client.event.execute`) called from a thread of the bridge's own, one event after the
  other in arrival order; the protos are real (`tests/whatsapp/neonize_events.py`),
  built by the arbiter and shipped as bytes with their event code in a header.
- Resuming a device that is not in the session store aborts the process, as whatsmeow's
  Go panic does (exit 134): the transport must check the store first.

`install(client, account)` is what `SVC_TEST_NEONIZE_BRIDGE=tests.whatsapp.fake_network:install`
names: it swaps a freshly built client's bridge for a `FakeBridge` on `NATS_URL`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import queue
import secrets
import sys
import threading
import time
from typing import Any, Literal

import msgspec
import nats
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js.api import StreamConfig

from contracts.subjects import encode_chat
from services.runtime.bus import Bus
from services.whatsapp.neonize_store import jid_string, neonize_module

STREAM = "FAKEWA"
RPC = "fakewa.rpc"
RPC_TIMEOUT = 5.0
CODE = "Fakewa-Code"  # header: the neonize event code of an event's bytes
ACK = "Fakewa-Ack"  # header: the message id a socket acks once it took the event

# What whatsmeow answers in each case (see WHATSAPP.md: the error strings seen).
NOT_CONNECTED = "websocket not connected"
NIL_CLIENT = "client is nil"
SEND_TIMEOUT = "timed out waiting for message send response"
DIAL_FAILED = "failed to dial whatsapp web websocket: dial tcp: connection refused"

nz = neonize_module("neonize.proto.Neonize_pb2")
wa = neonize_module("neonize.proto.waE2E.WAWebProtobufsE2E_pb2")


def inbound_subject(device: str) -> str:
    """Where a user's message to `device` is published (captured by stream FAKEWA)."""
    return f"fakewa.in.{encode_chat(device)}"


def log_subject(device: str) -> str:
    """Where the network records `device`'s connects and accepted sends."""
    return f"fakewa.log.{encode_chat(device)}"


def socket_subject(socket: str) -> str:
    """Where the network pushes events to one connected socket."""
    return f"fakewa.sock.{socket}"


class UserMessage(msgspec.Struct, frozen=True, kw_only=True):
    """A user's message to a device, as a phone sends it."""

    device: str
    chat: str
    text: str
    message_id: str
    sender: str = ""  # defaults to the chat (a direct chat)
    quoted_id: str = ""
    pushname: str = "Alice"


class Record(msgspec.Struct, frozen=True, kw_only=True):
    """One entry of the network's log: a socket connected, or a send it accepted."""

    kind: Literal["connected", "sent"]
    device: str
    socket: str
    pid: int
    chat: str = ""
    text: str = ""
    quoted_id: str = ""
    message_id: str = ""
    at: float = 0.0


class _Call(msgspec.Struct, frozen=True, kw_only=True):
    op: Literal["connect", "send", "stop", "ack"]
    socket: str
    device: str
    pid: int = 0
    chat: str = ""
    message: bytes = b""
    message_id: str = ""


class _Answer(msgspec.Struct, frozen=True, kw_only=True):
    error: str = ""
    message_id: str = ""
    timestamp: int = 0


def message_text(message: Any) -> tuple[str, str]:
    """(text, quoted message id) of a sent waE2E Message."""
    if message.HasField("extendedTextMessage"):
        ext = message.extendedTextMessage
        return ext.text, ext.contextInfo.stanzaID
    return message.conversation, ""


def one_socket_at_a_time(records: list[Record]) -> None:
    """WhatsApp's rule, checked over the log in its order: every send of a device came
    from the socket that connected it last (an older socket sent nothing after that)."""
    latest: dict[str, str] = {}
    for n, record in enumerate(records):
        if record.kind == "connected":
            latest[record.device] = record.socket
        else:
            assert latest.get(record.device) == record.socket, (
                f"log #{n}: socket {record.socket} (pid {record.pid}) sent after socket"
                f" {latest.get(record.device)} had connected {record.device}"
            )


class FakeWhatsApp:
    """The network's servers: arbitrates the bridges' calls, keeps and hands over what
    users send, records what it accepted. `async with FakeWhatsApp(bus) as net:`."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus
        self.connected: dict[str, str] = {}  # device -> its one connected socket
        # device -> what users sent that no socket acked yet, and the sockets it was pushed to
        self.pending: dict[str, list[tuple[UserMessage, set[str]]]] = {}
        self.failures: dict[str, list[str]] = {}  # device -> Go errors for its next sends
        self.slow: dict[str, list[float]] = {}  # device -> answer delays of its next sends
        self._late: set[asyncio.Task[None]] = set()
        self._lock = asyncio.Lock()
        self._ids = itertools.count(1)
        self._subs: list[Any] = []

    async def __aenter__(self) -> FakeWhatsApp:
        with contextlib.suppress(Exception):  # a second network on the same server
            await self.bus.js.add_stream(
                StreamConfig(name=STREAM, subjects=["fakewa.in.*", "fakewa.log.*"])
            )
        self._subs.append(await self.bus.nc.subscribe(RPC, cb=self._on_call))
        self._subs.append(
            await self.bus.js.subscribe("fakewa.in.*", cb=self._on_user, ordered_consumer=True)
        )
        await self.bus.nc.flush()
        return self

    async def __aexit__(self, *exc: object) -> None:
        for late in list(self._late):
            late.cancel()
        for sub in self._subs:
            with contextlib.suppress(Exception):
                await sub.unsubscribe()

    async def user_says(
        self, device: str, chat: str, text: str, message_id: str, **more: str
    ) -> None:
        """A user writes to `device` (kept by the network until a socket takes it)."""
        message = UserMessage(device=device, chat=chat, text=text, message_id=message_id, **more)
        await self.bus.js.publish(inbound_subject(device), msgspec.json.encode(message))

    def slow_next_sends(self, device: str, *delays: float) -> None:
        """`device`'s next accepted sends are answered only after these delays (seconds),
        one each: the message is out, the sender may give up waiting (outcome unknown)."""
        self.slow.setdefault(device, []).extend(delays)

    def fail_next_sends(self, device: str, *errors: str) -> None:
        """`device`'s next sends fail with these Go error strings, one each."""
        self.failures.setdefault(device, []).extend(errors)

    async def records(self, device: str | None = None) -> list[Record]:
        """The network's log (every connect and accepted send), in its order."""
        from tests.conftest import stream_raw

        subject = log_subject(device) if device else "fakewa.log.*"
        return [
            msgspec.json.decode(data, type=Record)
            for _, data, _ in await stream_raw(self.bus, STREAM, subject)
        ]

    async def sends(self, device: str | None = None) -> list[Record]:
        """The sends the network accepted, in its order."""
        return [r for r in await self.records(device) if r.kind == "sent"]

    async def _on_call(self, msg: Msg) -> None:
        call = msgspec.json.decode(msg.data, type=_Call)
        async with self._lock:
            if call.op == "connect":
                answer = await self._connect(call)
            elif call.op == "send":
                answer = await self._send(call)
            elif call.op == "ack":
                kept = self.pending.get(call.device, [])
                kept[:] = [p for p in kept if p[0].message_id != call.message_id]
                return  # a published ack, no answer
            else:
                if self.connected.get(call.device) == call.socket:
                    del self.connected[call.device]
                answer = _Answer()
        delay = (
            self.slow[call.device].pop(0) if answer.message_id and self.slow.get(call.device) else 0
        )
        if delay:
            late = asyncio.create_task(self._answer_late(msg, answer, delay))
            self._late.add(late)
            late.add_done_callback(self._late.discard)
            return
        await msg.respond(msgspec.json.encode(answer))
        if call.op == "connect":
            async with self._lock:
                await self._push(call.socket, nz.Connected(status=True))
                await self._hand_over(call.device)

    async def _answer_late(self, msg: Msg, answer: _Answer, delay: float) -> None:
        await asyncio.sleep(delay)  # the fault itself: an answer that comes late
        with contextlib.suppress(Exception):  # the asker may be gone
            await msg.respond(msgspec.json.encode(answer))

    async def _connect(self, call: _Call) -> _Answer:
        older = self.connected.get(call.device)
        self.connected[call.device] = call.socket
        if older is not None and older != call.socket:
            await self._push(older, nz.StreamReplaced())
        await self._record(
            Record(kind="connected", device=call.device, socket=call.socket, pid=call.pid)
        )
        return _Answer()

    async def _send(self, call: _Call) -> _Answer:
        if self.connected.get(call.device) != call.socket:
            return _Answer(error=NOT_CONNECTED)
        if self.failures.get(call.device):
            return _Answer(error=self.failures[call.device].pop(0))
        text, quoted = message_text(wa.Message.FromString(call.message))
        message_id = f"3EB0{next(self._ids):016X}"
        await self._record(
            Record(
                kind="sent",
                device=call.device,
                socket=call.socket,
                pid=call.pid,
                chat=call.chat,
                text=text,
                quoted_id=quoted,
                message_id=message_id,
                at=time.time(),
            )
        )
        return _Answer(message_id=message_id, timestamp=int(time.time()))

    async def _on_user(self, msg: Msg) -> None:
        message = msgspec.json.decode(msg.data, type=UserMessage)
        async with self._lock:
            self.pending.setdefault(message.device, []).append((message, set()))
            await self._hand_over(message.device)

    async def _hand_over(self, device: str) -> None:
        socket = self.connected.get(device)
        if socket is None:
            return  # kept until a socket connects, as WhatsApp keeps it
        from tests.whatsapp import neonize_events as events

        for m, pushed in self.pending.get(device, []):
            if socket in pushed:
                continue
            pushed.add(socket)
            body = (
                events.extended_body(m.text, quoted_id=m.quoted_id)
                if m.quoted_id
                else events.text_body(m.text)
            )
            await self._push(
                socket,
                events.message(
                    body,
                    chat=m.chat,
                    sender=m.sender,
                    message_id=m.message_id,
                    pushname=m.pushname,
                ),
                ack=m.message_id,
            )

    async def _push(self, socket: str, event: Any, *, ack: str = "") -> None:
        code = neonize_module("neonize.events").EVENT_TO_INT[type(event)]
        headers = {CODE: str(code), ACK: ack} if ack else {CODE: str(code)}
        await self.bus.nc.publish(
            socket_subject(socket), event.SerializeToString(), headers=headers
        )

    async def _record(self, record: Record) -> None:
        await self.bus.js.publish(log_subject(record.device), msgspec.json.encode(record))


class FakeBridge:
    """What a `NewAClient` calls instead of neonize's Go library, on the fake network."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.socket = f"{os.getpid()}-{secrets.token_hex(4)}"
        self.device = ""
        self.nc: Client | None = None
        self.stopped = asyncio.Event()
        self.replaced = False
        self._events: queue.SimpleQueue[tuple[int, bytes, str] | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._go: threading.Thread | None = None

    async def Neonize(self, *args: Any) -> bytes:
        name, uuid, jidbuf, event_cb = args[0], args[1], args[2], args[8]
        if not jidbuf:
            return b"fake network: only resuming a paired device (jid=) is faked"
        self.device = jid_string(nz.JID.FromString(jidbuf))
        try:
            in_store = await asyncio.to_thread(_devices_in, name.decode())
        except ValueError:
            return b"failed to open the session store"
        if self.device not in in_store:
            # whatsmeow's Go side panics on a device missing from its store: so do we.
            print(
                f"panic: fake network: device {self.device} is not in the store",
                file=sys.stderr,
                flush=True,
            )
            os.abort()
        self._loop = asyncio.get_running_loop()
        self._go = threading.Thread(
            target=self._deliver, args=(uuid, event_cb), name=f"fakewa-{self.socket}", daemon=True
        )
        self._go.start()
        try:
            self.nc = await nats.connect(self.url, name=f"fakewa-{self.socket}")
            await self.nc.subscribe(socket_subject(self.socket), cb=self._on_event)
            answer = await self._call("connect")
        except Exception:
            answer = _Answer(error=DIAL_FAILED)
        if answer.error:
            await self._close()
            return answer.error.encode()
        try:
            await self.stopped.wait()  # Go's Neonize() returns once the client is stopped
        except asyncio.CancelledError:
            await self.Stop(uuid)  # neonize then stops the real library, not this bridge
            raise
        return b""

    async def SendMessage(self, uuid: bytes, to: bytes, _n: int, message: bytes, _m: int) -> bytes:
        if self.nc is None or self.stopped.is_set():
            return nz.SendMessageReturnFunction(Error=NIL_CLIENT).SerializeToString()
        chat = jid_string(nz.JID.FromString(to))
        try:
            answer = await self._call("send", chat=chat, message=message)
        except Exception:  # no answer: the server may or may not have taken it
            answer = _Answer(error=SEND_TIMEOUT)
        if answer.error:
            return nz.SendMessageReturnFunction(Error=answer.error).SerializeToString()
        timings = nz.MessageDebugTimings(
            Queue=0, Marshal=0, GetParticipants=0, GetDevices=0, GroupEncrypt=0,
            PeerEncrypt=0, Send=0, Resp=0, Retry=0,
        )  # fmt: skip
        response = nz.SendResponse(
            ID=answer.message_id, Timestamp=answer.timestamp, ServerID=0, DebugTimings=timings
        )
        return nz.SendMessageReturnFunction(SendResponse=response).SerializeToString()

    async def SendChatPresence(self, *_: Any) -> bytes:
        return b"" if self.nc and not self.replaced else NOT_CONNECTED.encode()

    async def MarkRead(self, *_: Any) -> bytes:
        return b"" if self.nc and not self.replaced else NOT_CONNECTED.encode()

    async def IsConnected(self, *_: Any) -> bool:
        return self.nc is not None and not (self.replaced or self.stopped.is_set())

    async def IsLoggedIn(self, *_: Any) -> bool:
        return await self.IsConnected()

    async def Stop(self, uuid: bytes) -> None:
        if self.nc is not None and not self.stopped.is_set():
            with contextlib.suppress(Exception):
                await self._call("stop")
        self.stopped.set()
        await self._close()

    async def die(self) -> None:
        """The process is gone (kill -9): the connection drops, nothing is said."""
        self.stopped.set()
        await self._close()

    async def _call(self, op: Literal["connect", "send", "stop"], **more: Any) -> _Answer:
        assert self.nc is not None
        call = _Call(op=op, socket=self.socket, device=self.device, pid=os.getpid(), **more)
        reply = await self.nc.request(RPC, msgspec.json.encode(call), timeout=RPC_TIMEOUT)
        return msgspec.json.decode(reply.data, type=_Answer)

    async def _on_event(self, msg: Msg) -> None:
        code = int((msg.headers or {})[CODE])
        if code == neonize_module("neonize.events").EVENT_TO_INT[nz.StreamReplaced]:
            self.replaced = True
        self._events.put((code, msg.data, (msg.headers or {}).get(ACK, "")))

    def _deliver(self, uuid: bytes, event_cb: Any) -> None:
        """The "Go thread": hands each event to neonize's entry point, in order."""
        while (item := self._events.get()) is not None:
            code, data, ack = item
            buf = ctypes.create_string_buffer(data, len(data))
            event_cb(uuid, ctypes.addressof(buf), len(data), code)
            if ack and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is gone: no ack
                    asyncio.run_coroutine_threadsafe(self._ack(ack), self._loop)

    async def _ack(self, message_id: str) -> None:
        if self.nc is None:
            return
        call = _Call(op="ack", socket=self.socket, device=self.device, message_id=message_id)
        with contextlib.suppress(Exception):
            await self.nc.publish(RPC, msgspec.json.encode(call))

    async def _close(self) -> None:
        self._events.put(None)
        nc, self.nc = self.nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()


def _devices_in(name: str) -> set[str]:
    factory = neonize_module("neonize.aioze.client").ClientFactory
    return {f"{d.JID.User}@{d.JID.Server}" for d in factory.get_all_devices_from_db(name)}


def install(client: Any, account: str) -> None:
    """The `SVC_TEST_NEONIZE_BRIDGE` hook: `client` (a fresh NewAClient of `account`)
    talks to the fake network on `NATS_URL` instead of WhatsApp."""
    url = os.environ.get("NATS_URL")
    if not url:
        raise RuntimeError("the fake WhatsApp network needs NATS_URL (the test's nats-server)")
    client._NewAClient__client = FakeBridge(url)
