"""WhatsApp JIDs: groups, own JID, mentions, one person under a LID and a phone JID."""

from __future__ import annotations

from services.whatsapp import jids


def test_a_lid_sender_with_its_phone_jid_beside_it_is_normalised_to_the_phone_jid() -> None:
    who = jids.normalise("987@lid", "987@lid", "1555@s.whatsapp.net")
    assert who == jids.Who(
        chat="1555@s.whatsapp.net", sender="1555@s.whatsapp.net", sender_alt="987@lid"
    )
    # in a group the chat stays the group; only the sender is normalised
    in_group = jids.normalise("1203@g.us", "987@lid", "1555@s.whatsapp.net")
    assert (in_group.chat, in_group.sender) == ("1203@g.us", "1555@s.whatsapp.net")
    # without a phone JID beside it, nothing changes
    assert jids.normalise("987@lid", "987@lid") == jids.Who("987@lid", "987@lid", "")


def test_a_mention_names_the_account_whatever_the_device() -> None:
    own = (jids.own_jid("15550001"),)
    assert own == ("15550001@s.whatsapp.net",)
    assert jids.mentions_account(["15550001:7@s.whatsapp.net"], own)
    assert not jids.mentions_account(["15550002@s.whatsapp.net", "15550001@lid"], own)
    assert not jids.mentions_account([], own)
    assert jids.is_group("1203-4567@g.us")
    assert not jids.is_group("1555@s.whatsapp.net")
