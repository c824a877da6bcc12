"""A fake pairing source for a real `svc run whatsapp` process: what
`SVC_TEST_NEONIZE_BRIDGE=tests.web.fake_pairing:install` names.

The worker builds its real neonize pairing client (`new_pairing_client`); the seam swaps
only the client's Go bridge for `FakePairing`, which plays whatsmeow and the phone, paced
by the test over NATS so every step can be watched (no timing):

- on connect: QR code 1 (through the client's real QR callback, from a thread of its own);
- each message on `fakepair.<account>.scan` moves one step: QR code 2 (the rotation),
  then the phone confirms: the device row in the session store and PairStatus SUCCESS
  with `DEVICE` -- as whatsmeow saves the device, then reports it;
- with a phone number: the pairing code `ABCD-1234` once asked for (after the first QR).

The seam is honoured only for modules under `tests.` (services/whatsapp/neonize.py), and
the worker logs a TEST SEAM warning when it is set: it cannot be reached by accident.
The QR texts carry a random part, so a test can look for them in logs and streams.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import secrets
from pathlib import Path
from typing import Any

import nats

from services.runtime.settings import SessionStore
from services.whatsapp.neonize_store import neonize_module
from tests.whatsapp import neonize_events as nev

nz = neonize_module("neonize.proto.Neonize_pb2")
EVENT_CODES: dict[Any, int] = neonize_module("neonize.events").EVENT_TO_INT
DEVICE = "15550000001:7@s.whatsapp.net"
CODE = "ABCD-1234"
CODES = 2  # QR codes before the phone confirms


def scan_subject(account: str) -> str:
    """Where the test moves the fake phone one step."""
    return f"fakepair.{account}.scan"


def qr_text(n: int, salt: str) -> str:
    """The fake whatsmeow's QR code number `n` (as whatsmeow's: `2@...`)."""
    return f"2@fake-pairing-qr-{n}-{salt}"


class FakePairing:
    """Stands in for neonize's Go bridge while a client pairs (see the module)."""

    def __init__(self, account: str) -> None:
        self.account = account
        self.stopped = asyncio.Event()
        self.phone = ""
        self.code_asked = asyncio.Event()
        self.qr_sent = 0

    async def Neonize(self, *args: Any) -> bytes:
        name, uuid, new_device, qr_cb, event_cb = args[0], args[1], args[4], args[6], args[8]
        if not new_device:  # not a pairing: nothing to fake here
            await self.stopped.wait()
            return b""
        # The phone is outside the system: under per-role users it connects as its own
        url = os.environ.get("FAKE_PAIRING_NATS_URL") or os.environ["NATS_URL"]
        nc = await nats.connect(url, name="fake-pairing")
        try:
            scans = await nc.subscribe(scan_subject(self.account))
            salt = secrets.token_hex(6)
            for n in range(1, CODES + 1):
                if n > 1 and not await self._next(scans):
                    return b""
                code = ctypes.create_string_buffer(qr_text(n, salt).encode())
                self.qr_sent += 1
                # From a thread, as whatsmeow calls back from Go's
                await asyncio.to_thread(qr_cb, None, ctypes.addressof(code))
            if not await self._next(scans):
                return b""
            from tests.whatsapp.test_neonize_store import add_device

            store = SessionStore(path=Path(name.decode()))
            await asyncio.to_thread(add_device, store, DEVICE)
            event = nz.PairStatus(
                ID=nev.jid(DEVICE), Status=nz.PairStatus.SUCCESS, BusinessName="", Platform=""
            ).SerializeToString()
            buf = ctypes.create_string_buffer(event, len(event))
            code_of = EVENT_CODES[nz.PairStatus]
            await asyncio.to_thread(event_cb, uuid, ctypes.addressof(buf), len(event), code_of)
            await self.stopped.wait()  # Go's Neonize() returns when the client is stopped
        finally:
            with contextlib.suppress(Exception):
                await nc.close()
        return b""

    async def _next(self, scans: Any) -> bool:
        """The test's next step, or False once the client was stopped."""
        step = asyncio.ensure_future(scans.next_msg(timeout=300))
        stop = asyncio.ensure_future(self.stopped.wait())
        done, _ = await asyncio.wait({step, stop}, return_when=asyncio.FIRST_COMPLETED)
        step.cancel()
        stop.cancel()
        return step in done and not step.cancelled() and step.exception() is None

    async def Stop(self, uuid: bytes) -> None:
        self.stopped.set()

    async def PairPhone(self, uuid: bytes, payload: bytes, size: int) -> bytes:
        if self.qr_sent == 0:  # neonize's client has no Go client before the first QR
            return nz.PairPhoneReturnFunction(Error="client is nil").SerializeToString()
        self.phone = nz.PairPhoneParams.FromString(payload).phone
        self.code_asked.set()
        return nz.PairPhoneReturnFunction(Code=CODE).SerializeToString()


def install(client: Any, account: str) -> None:
    """The seam's installer: swap the freshly built client's Go bridge for the fake."""
    client._NewAClient__client = FakePairing(account)
