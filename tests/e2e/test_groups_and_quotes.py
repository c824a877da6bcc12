"""Group mentions and quoted replies, end to end through separate `svc` processes on the sim.

Before the channel layer carried them, no group message from a transport said it
mentioned the account (so every one was skipped under the default mention rule), and
the quote a reply names was dropped before the send.
"""

from __future__ import annotations

import pytest

from contracts.events import MessageReceived, MessageSent, TurnCompleted
from services.ops.simclient import SimUser, own_jid
from services.runtime.bus import Bus
from tests.conftest import Processes, read_stream, wait_until
from tests.e2e.conftest import consumers_ready

pytestmark = pytest.mark.slow

GROUP = "120363000000042@g.us"
ANN, BOB = "15550001@s.whatsapp.net", "15550002@s.whatsapp.net"


async def _turns(bus: Bus) -> dict[str, TurnCompleted]:
    """Turns recorded so far, by the message id they answer."""
    received = {
        e.id: e.message_id
        for _, e in await read_stream(bus, "INBOUND")
        if isinstance(e, MessageReceived)
    }
    return {
        received[e.inbound_id]: e
        for _, e in await read_stream(bus, "AGENT")
        if isinstance(e, TurnCompleted) and e.inbound_id in received
    }


async def test_a_mention_in_a_group_is_answered_as_a_quote_and_other_group_talk_is_not(
    processes: Processes, served: tuple[str, Bus]
) -> None:
    url, bus = served
    core = processes.start("run", "core", NATS_URL=url)
    whatsapp = processes.start("run", "whatsapp", NATS_URL=url)
    await wait_until(lambda: consumers_ready(bus), what="core and whatsapp up")
    async with SimUser(bus, "default") as user:
        # Given group talk that does not mention the account, then a message that does
        chatter = await user.send(GROUP, "lunch at noon?", sender=BOB, sender_name="Bob")
        asked = await user.send(
            GROUP,
            "@bot what time is it in Lisbon?",
            sender=ANN,
            sender_name="Ann",
            mentions=[own_jid("default"), BOB],
            quoted_id=chatter.message_id,
        )
        # And a 1:1 message
        direct = await user.send(ANN, "hello in private")
        logs = lambda: processes.log(core) + processes.log(whatsapp)  # noqa: E731
        assert await user.wait_replies(30, exchange=asked), logs()
        assert await user.wait_replies(30, exchange=direct), logs()

        # Then the mention is answered in the group, quoting the message it answers
        assert asked.reply is not None
        assert (asked.reply.chat, asked.reply.reply_to) == (GROUP, asked.message_id)
        assert asked.reply.text == "echo: @bot what time is it in Lisbon?"
        # and the 1:1 message is answered without a quote (SVC_QUOTE_REPLIES=groups)
        assert direct.reply is not None
        assert (direct.reply.chat, direct.reply.reply_to) == (ANN, None)
        asked_job, direct_job = asked.reply.job_id, direct.reply.job_id

        # And the talk without a mention got a recorded turn that answers nothing
        turns = await _turns(bus)
        assert turns[chatter.message_id].skipped == "group message without a mention"
        assert turns[chatter.message_id].reply_ids == []
        assert chatter.reply is None
        assert not [o for o in user.others if o.chat == GROUP]

    # The inbound record keeps who was mentioned and what was quoted; the send records
    # the quote it carried
    (received,) = [
        e
        for _, e in await read_stream(bus, "INBOUND")
        if isinstance(e, MessageReceived) and e.message_id == asked.message_id
    ]
    assert isinstance(received, MessageReceived)
    assert (received.is_group, received.mentioned) == (True, True)
    assert received.mentions == [own_jid("default"), BOB]
    assert (received.quoted_id, received.sender, received.sender_name) == (
        chatter.message_id,
        ANN,
        "Ann",
    )
    # (the network gets a message before its MessageSent is recorded: wait for both)
    quoted: dict[str, str | None] = {}

    async def recorded() -> bool:
        for _, e in await read_stream(bus, "DELIVERY"):
            if isinstance(e, MessageSent) and isinstance(e.reply_to, str | None):
                quoted[e.job_id] = e.reply_to
        return {asked_job, direct_job} <= set(quoted)

    await wait_until(recorded, what="MessageSent of both replies")
    assert quoted[asked_job] == asked.message_id
    assert quoted[direct_job] is None
