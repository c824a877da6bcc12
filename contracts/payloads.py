"""Payloads of the simulated WhatsApp network (`sim.whatsapp.<account>.in|out`)."""

from __future__ import annotations

from typing import Literal

import msgspec


class SimInbound(msgspec.Struct, frozen=True, kw_only=True):
    """A simulated user's message to an account."""

    chat: str
    sender: str
    text: str
    message_id: str


class SimControl(msgspec.Struct, frozen=True, kw_only=True):
    """A session signal the simulated network sends the account's attached owner."""

    event: Literal["stream_replaced", "logged_out", "temporary_ban"]
    reason: str = ""


class SimOutbound(msgspec.Struct, frozen=True, kw_only=True):
    """A message the account's owner sent through the simulated network."""

    chat: str
    text: str
    job_id: str
    holder: str
    lease_token: int
