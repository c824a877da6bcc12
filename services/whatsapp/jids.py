"""WhatsApp JIDs: what a group is, the account's own JID, one person under two ids.

WhatsApp may report one person under a phone JID (`15551234567@s.whatsapp.net`) or a
LID (`123456789@lid`), with the other one beside it (whatsmeow's `SenderAlt`). The phone
JID is the stable one an operator knows: a sender (and a direct chat, which is the
sender) is normalised to it when the network gives both, so one person is one chat key.
"""

from __future__ import annotations

from dataclasses import dataclass

USER_SERVER = "s.whatsapp.net"
LID_SERVER = "lid"
GROUP_SERVER = "g.us"


def server(jid: str) -> str:
    """The part after `@` ('' for none)."""
    return jid.rpartition("@")[2] if "@" in jid else ""


def is_group(jid: str) -> bool:
    """A group chat JID (`…@g.us`)."""
    return server(jid) == GROUP_SERVER


def user(jid: str) -> str:
    """The user part, without a device suffix (`15551234567:7@s.whatsapp.net` -> `15551234567`)."""
    return jid.partition("@")[0].partition(":")[0]


def own_jid(phone_or_account: str) -> str:
    """The account's own JID on the user server (the sim uses the account id)."""
    return f"{user(phone_or_account)}@{USER_SERVER}"


def same_user(a: str, b: str) -> bool:
    """True if two JIDs name the same user on the same server (devices ignored)."""
    return bool(a) and user(a) == user(b) and server(a) == server(b)


@dataclass(frozen=True)
class Who:
    """A message's normalised chat and sender, with the sender's other id."""

    chat: str
    sender: str
    sender_alt: str


def normalise(chat: str, sender: str, sender_alt: str = "") -> Who:
    """Prefer the phone JID when the network gave a LID and a phone JID for one sender; a
    direct chat addressed by the sender's LID becomes the phone JID chat as well."""
    if server(sender) == LID_SERVER and server(sender_alt) == USER_SERVER:
        lid, phone = sender, sender_alt
        direct = not is_group(chat) and same_user(chat, lid)
        return Who(chat=phone if direct else chat, sender=phone, sender_alt=lid)
    return Who(chat=chat, sender=sender, sender_alt=sender_alt)


def mentions_account(mentions: list[str] | tuple[str, ...], own: tuple[str, ...]) -> bool:
    """Whether any of `mentions` is one of the account's own JIDs (devices ignored)."""
    return any(same_user(m, o) for m in mentions for o in own)
