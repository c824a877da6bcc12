"""The sim transport passes the transport contract (tests/channel/transport_contract.py)."""

from __future__ import annotations

import pytest

from contracts import subjects
from contracts.codec import decode, encode
from contracts.payloads import SimControl, SimInbound, SimOutbound
from services.runtime.bus import Bus
from services.runtime.settings import SimFaults
from services.whatsapp.jids import own_jid
from services.whatsapp.sim import SimTransport
from tests.channel.transport_contract import Network, SentView, TransportContract
from tests.conftest import stream_raw

_SIGNALS = {"logged_out": "logged_out", "replaced": "stream_replaced", "banned": "temporary_ban"}


class SimNetworkDriver:
    """The sim network's other side: users publish on `sim.whatsapp.<account>.in`, the
    network's signals go on `.control`, what the account sent is stored on SIM_OUT."""

    def __init__(self, bus: Bus) -> None:
        self.bus = bus

    def transport(self) -> SimTransport:
        return SimTransport(self.bus, SimFaults())

    def own_jid(self, account: str) -> str:
        return own_jid(account)

    async def user_message(
        self,
        account: str,
        *,
        chat: str,
        sender: str,
        text: str,
        message_id: str,
        mentions: tuple[str, ...] = (),
        quoted_id: str = "",
        sender_alt: str = "",
    ) -> None:
        payload = SimInbound(
            chat=chat,
            sender=sender,
            text=text,
            message_id=message_id,
            mentions=list(mentions),
            quoted_id=quoted_id,
            sender_alt=sender_alt,
        )
        await self.bus.publish_bytes(
            subjects.sim_in(account), encode(payload), msg_id=f"sim-in:{message_id}"
        )

    async def receipt(self, account: str, chat: str, ids: list[str], status: str) -> None:
        control = SimControl(event="receipt", chat=chat, message_ids=ids, status=status)
        await self.bus.nc.publish(subjects.sim_control(account), encode(control))

    async def end_signal(self, account: str, kind: str) -> None:
        control = SimControl(event=_SIGNALS[kind], reason=f"contract: {kind}")  # type: ignore[arg-type]
        await self.bus.nc.publish(subjects.sim_control(account), encode(control))

    async def sent(self, account: str) -> list[SentView]:
        outs = [
            decode(data, SimOutbound)
            for _, data, _ in await stream_raw(self.bus, "SIM_OUT", subjects.sim_out(account))
        ]
        return [SentView(o.chat, o.text, o.reply_to) for o in outs]


class TestSimTransport(TransportContract):
    @pytest.fixture
    def network(self, bus: Bus) -> Network:
        return SimNetworkDriver(bus)
