"""Pairing from the console (issue 18): the web role asks a `whatsapp` worker to pair an
account and reads the attempt's state back, over core NATS request/reply only.

Nothing here is ever stored in a stream: a QR code is short-lived pairing material (it
links a phone to the account), so it travels only in the reply to whoever asked. The
start and the outcome are recorded as `PairingStarted` / `PairingFinished` on ACCOUNTS.

- `svc.pair.<channel>.start` (queue group `pairing`): `StartPairing` -> `PairingStart`;
  one worker takes it, holds the account's lease and runs the pairing.
- `svc.pair.<channel>.attempt.<attempt>`: any payload -> `PairingState`; answered only
  by the worker running that attempt, for a while after it ended.
"""

from __future__ import annotations

import re
from typing import Literal

import msgspec

from contracts.errors import InvalidSubjectError
from contracts.subjects import check_channel, shown

PAIRING_QUEUE = "pairing"
PairingPhase = Literal["starting", "qr", "code", "paired", "failed"]
_ATTEMPT_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")


def check_attempt(attempt: str) -> str:
    """`attempt` if it is a valid attempt id, else raise."""
    if not _ATTEMPT_RE.fullmatch(attempt):
        raise InvalidSubjectError(
            f"pairing attempt {shown(attempt)} is invalid: use 1-64 of A-Z a-z 0-9 _ -"
        )
    return attempt


def start_subject(channel: str) -> str:
    """`svc.pair.<channel>.start`: a worker starts a pairing."""
    return f"svc.pair.{check_channel(channel)}.start"


def attempt_subject(channel: str, attempt: str) -> str:
    """`svc.pair.<channel>.attempt.<attempt>`: the attempt's worker answers its state."""
    return f"svc.pair.{check_channel(channel)}.attempt.{check_attempt(attempt)}"


class StartPairing(msgspec.Struct, frozen=True, kw_only=True):
    """Pair `account` (a pairing code for `phone` if given, else QR codes)."""

    account: str
    phone: str = ""
    force: bool = False
    actor: str = ""
    via: str = ""
    client: str = ""


class PairingStart(msgspec.Struct, frozen=True, kw_only=True):
    """A worker's answer: the attempt it runs, or `error` (one line) when refused."""

    attempt: str = ""
    error: str = ""
    status: int = 202  # 409: refused (owned, already paired), 422: bad input


class PairingState(msgspec.Struct, frozen=True, kw_only=True):
    """Where an attempt is: `seq` grows with every change (a new QR, the code, the end).
    `qr` is the current QR code's text (phase qr only), `code` the pairing code (phase
    code), `line` the one-line outcome (paired or failed)."""

    attempt: str
    account: str
    phase: PairingPhase
    seq: int = 0
    qr: str = ""
    qr_number: int = 0
    code: str = ""
    line: str = ""

    @property
    def done(self) -> bool:
        """Whether the attempt ended."""
        return self.phase in ("paired", "failed")
