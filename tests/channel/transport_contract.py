"""The transport contract: what every transport must do, as one reusable test class.

In the style of eventsourcing's `*TestCase` classes: a transport's test module subclasses
`TransportContract` and provides a `network` fixture -- a `Network` driver that plays the
other side (the users and the servers) for that transport: the sim's NATS subjects, a
fake Graph API, neonize's event entry point. Every test here then runs against it:

- a user's message arrives as one `Incoming`, and a send reaches the network;
- a reply quotes the message it answers, and an incoming quote is reported;
- a group message mentioning the account says so (and one mentioning someone else not);
- one person under two ids (LID and phone JID) is one chat;
- receipts name the ids `send` returned;
- each ending signal is delivered as its event and ends the session (`ended()`);
- a burst of messages arrives in order, one at a time;
- a handler that fails does not stall the events after it, and the failed one is
  delivered again (at least once).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Protocol

import pytest

from services.channel.dispatch import EventDispatch
from services.channel.port import (
    Fence,
    Incoming,
    LoggedOut,
    Outgoing,
    Quote,
    Receipt,
    Session,
    SessionEvent,
    StreamReplaced,
    TemporaryBan,
    Transport,
)
from services.runtime.bus import Bus
from services.runtime.lease import Lease
from tests.conftest import wait_until

ACCOUNT = "contract"


@dataclass(frozen=True)
class SentView:
    """A message as the network received it from the account."""

    chat: str
    text: str
    reply_to: str | None


class Network(Protocol):
    """The other side of a transport, driven by the contract tests."""

    def transport(self) -> Transport:
        """A transport connected to this network."""
        ...

    def own_jid(self, account: str) -> str:
        """The JID under which users mention `account`."""
        ...

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
        """A user sends `account` a message."""
        ...

    async def receipt(self, account: str, chat: str, ids: list[str], status: str) -> None:
        """The network reports that messages `ids` the account sent reached `status`."""
        ...

    async def end_signal(self, account: str, kind: str) -> None:
        """The network ends the session: `logged_out`, `replaced` or `banned`."""
        ...

    async def sent(self, account: str) -> list[SentView]:
        """What the account has sent so far, in order."""
        ...


@dataclass
class Recorder:
    """A session's handler that records events; `fail` makes chosen deliveries raise."""

    events: list[SessionEvent] = field(default_factory=list)
    attempts: dict[str, int] = field(default_factory=dict)  # message id -> deliveries
    fail_first: set[str] = field(default_factory=set)  # message ids whose 1st delivery fails
    running: int = 0
    overlapped: bool = False

    async def __call__(self, event: SessionEvent) -> None:
        self.running += 1
        self.overlapped |= self.running > 1
        try:
            await asyncio.sleep(0)  # let any concurrent delivery show itself
            if isinstance(event, Incoming):
                seen = self.attempts.get(event.message_id, 0) + 1
                self.attempts[event.message_id] = seen
                if event.message_id in self.fail_first and seen == 1:
                    raise RuntimeError(f"handler failed on {event.message_id}")
            self.events.append(event)
        finally:
            self.running -= 1

    def incoming(self) -> list[Incoming]:
        return [e for e in self.events if isinstance(e, Incoming)]

    def of(self, kind: type[SessionEvent]) -> list[SessionEvent]:
        return [e for e in self.events if isinstance(e, kind)]


class TransportContract:
    """Subclass with a `network` fixture returning a `Network`; every test runs on it."""

    @pytest.fixture
    def network(self, bus: Bus) -> Network:
        raise NotImplementedError("a transport's test module provides its network")

    @asynccontextmanager
    async def attached(
        self, bus: Bus, network: Network, recorder: Recorder
    ) -> AsyncIterator[tuple[Session, Lease]]:
        """The account's session as its lease holder (receiving), events to `recorder`."""
        transport = network.transport()
        lease = Lease(bus, transport.channel, ACCOUNT, "contract-holder", 30)
        assert await lease.try_acquire()
        try:
            async with (
                EventDispatch(recorder, name=ACCOUNT, retry_delays=(0.01, 0.05)) as events,
                transport.session(ACCOUNT, events, receive=True) as session,
            ):
                yield session, lease
        finally:
            await lease.release()

    @staticmethod
    def fence(lease: Lease) -> Fence:
        return Fence(lease.holder, lease.token, deadline=time.monotonic() + 10)

    async def test_a_message_arrives_once_and_a_send_reaches_the_network(
        self, bus: Bus, network: Network
    ) -> None:
        recorder = Recorder()
        async with self.attached(bus, network, recorder) as (session, lease):
            # When a user writes and the account sends
            await network.user_message(
                ACCOUNT, chat="15550001@s.whatsapp.net", sender="15550001@s.whatsapp.net",
                text="hello", message_id="m-hello",
            )  # fmt: skip
            await wait_until(lambda: recorder.incoming(), what="the message")
            sent_id = await session.send(
                Outgoing("15550001@s.whatsapp.net", "hi back", "job-1", self.fence(lease))
            )
        # Then the message arrived as one Incoming with its fields, not a group, no mention
        (got,) = recorder.incoming()
        assert (got.chat, got.sender, got.text, got.message_id) == (
            "15550001@s.whatsapp.net", "15550001@s.whatsapp.net", "hello", "m-hello",
        )  # fmt: skip
        assert (got.is_group, got.mentioned, got.quoted_id) == (False, False, "")
        # And the send reached the network under the id it returned, without a quote
        assert sent_id
        assert await network.sent(ACCOUNT) == [SentView("15550001@s.whatsapp.net", "hi back", None)]

    async def test_a_reply_quotes_the_message_it_answers_and_quotes_arrive(
        self, bus: Bus, network: Network
    ) -> None:
        recorder = Recorder()
        async with self.attached(bus, network, recorder) as (session, lease):
            # Given a user's message that itself quotes an earlier one
            await network.user_message(
                ACCOUNT, chat="15550002@s.whatsapp.net", sender="15550002@s.whatsapp.net",
                text="and this?", message_id="m-2", quoted_id="m-1",
            )  # fmt: skip
            await wait_until(lambda: recorder.incoming(), what="the message")
            # When the account replies quoting it
            quote = Quote("m-2", sender="15550002@s.whatsapp.net", text="and this?")
            out = Outgoing("15550002@s.whatsapp.net", "this.", "job-q", self.fence(lease), quote)
            await session.send(out)
        # Then the incoming quote was reported, and the network got the reply as a quote
        assert recorder.incoming()[0].quoted_id == "m-1"
        assert await network.sent(ACCOUNT) == [SentView("15550002@s.whatsapp.net", "this.", "m-2")]

    async def test_a_group_message_says_whether_it_mentions_the_account(
        self, bus: Bus, network: Network
    ) -> None:
        recorder = Recorder()
        group = "120363000000001@g.us"
        async with self.attached(bus, network, recorder):
            # When one group message mentions the account and another mentions someone else
            me = network.own_jid(ACCOUNT)
            await network.user_message(
                ACCOUNT, chat=group, sender="15550003@s.whatsapp.net", text="@bot hi",
                message_id="m-at-me", mentions=(me,),
            )  # fmt: skip
            await network.user_message(
                ACCOUNT, chat=group, sender="15550003@s.whatsapp.net", text="@ann hi",
                message_id="m-at-ann", mentions=("15550009@s.whatsapp.net",),
            )  # fmt: skip
            await wait_until(lambda: len(recorder.incoming()) == 2, what="both messages")
        # Then both are group messages; only the first says the account is mentioned
        at_me, at_ann = recorder.incoming()
        assert (at_me.chat, at_me.is_group, at_me.mentioned) == (group, True, True)
        assert me in at_me.mentions
        assert (at_ann.is_group, at_ann.mentioned) == (True, False)
        assert at_ann.sender == "15550003@s.whatsapp.net"

    async def test_one_person_under_a_lid_and_a_phone_jid_is_one_chat(
        self, bus: Bus, network: Network
    ) -> None:
        recorder = Recorder()
        async with self.attached(bus, network, recorder):
            # When the same person writes once by phone JID and once by LID (phone beside it)
            phone, lid = "15550004@s.whatsapp.net", "98765000004@lid"
            await network.user_message(
                ACCOUNT, chat=phone, sender=phone, text="one", message_id="m-phone"
            )
            await network.user_message(
                ACCOUNT, chat=lid, sender=lid, text="two", message_id="m-lid", sender_alt=phone
            )
            await wait_until(lambda: len(recorder.incoming()) == 2, what="both messages")
        # Then both name the same chat and sender; the LID is kept beside it
        by_phone, by_lid = recorder.incoming()
        assert (by_phone.chat, by_phone.sender) == (phone, phone)
        assert (by_lid.chat, by_lid.sender, by_lid.sender_alt) == (phone, phone, lid)

    async def test_receipts_name_the_ids_send_returned(self, bus: Bus, network: Network) -> None:
        recorder = Recorder()
        chat = "15550005@s.whatsapp.net"
        async with self.attached(bus, network, recorder) as (session, lease):
            # Given two sends
            first = await session.send(Outgoing(chat, "one", "job-r1", self.fence(lease)))
            second = await session.send(Outgoing(chat, "two", "job-r2", self.fence(lease)))
            # When the network reports them read
            await network.receipt(ACCOUNT, chat, [first, second], "read")
            await wait_until(lambda: recorder.of(Receipt), what="the receipt")
        # Then the receipt names exactly those ids
        (receipt,) = recorder.of(Receipt)
        assert isinstance(receipt, Receipt)
        assert (receipt.chat, receipt.status) == (chat, "read")
        assert set(receipt.transport_message_ids) == {first, second}

    @pytest.mark.parametrize(
        ("kind", "event", "state"),
        [
            ("logged_out", LoggedOut, "needs_pairing"),
            ("replaced", StreamReplaced, "replaced"),
            ("banned", TemporaryBan, "banned"),
        ],
    )
    async def test_an_ending_signal_is_delivered_and_ends_the_session(
        self, bus: Bus, network: Network, kind: str, event: type[SessionEvent], state: str
    ) -> None:
        recorder = Recorder()
        async with self.attached(bus, network, recorder) as (session, _lease):
            ending = asyncio.ensure_future(session.ended())
            # When the network ends the session
            await network.end_signal(ACCOUNT, kind)
            # Then the session reports its own end, with the state and a reason
            end = await asyncio.wait_for(ending, 10)
            assert (end.state, bool(end.reason)) == (state, True)
            await wait_until(lambda: recorder.of(event), what=f"the {event.__name__} event")

    async def test_a_burst_arrives_in_order_one_at_a_time(self, bus: Bus, network: Network) -> None:
        recorder = Recorder()
        chat = "15550006@s.whatsapp.net"
        ids = [f"m-burst-{n:03d}" for n in range(60)]
        async with self.attached(bus, network, recorder):
            # When a user sends a burst of messages, back to back (the network accepts
            # each before the next is sent)
            for i, mid in enumerate(ids):
                await network.user_message(
                    ACCOUNT, chat=chat, sender=chat, text=f"n{i}", message_id=mid
                )
            await wait_until(
                lambda: {e.message_id for e in recorder.incoming()} >= set(ids), what="the burst"
            )
        # Then each arrived (at least once), in the order sent, and the handler never ran
        # twice at once
        delivered = [e.message_id for e in recorder.incoming()]
        assert list(dict.fromkeys(delivered)) == ids
        assert not recorder.overlapped

    async def test_a_failing_handler_does_not_stall_the_events_after_it(
        self, bus: Bus, network: Network
    ) -> None:
        # Given a handler whose first delivery of one message fails
        recorder = Recorder(fail_first={"m-poison"})
        chat = "15550007@s.whatsapp.net"
        async with self.attached(bus, network, recorder):
            for mid in ("m-before", "m-poison", "m-after"):
                await network.user_message(
                    ACCOUNT, chat=chat, sender=chat, text=mid, message_id=mid
                )
            # Then the message after it still arrives, and the failed one is delivered again
            await wait_until(
                lambda: (
                    {"m-before", "m-poison", "m-after"}
                    <= {e.message_id for e in recorder.incoming()}
                ),
                what="every message, the failed one again",
            )
        assert recorder.attempts["m-poison"] >= 2
        assert not recorder.overlapped
