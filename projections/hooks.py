"""The webhook subscription list (ADR 0042): a pure read model of HOOKS, rebuilt by
replaying WebhookSubscribed / WebhookUnsubscribed in stream order.

A subscription receives the events of its kinds that were stored at or after it was
stored (JetStream's own timestamps, so replicas that lag agree), until it is removed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from contracts.hooks import HOOKABLE, SubscriptionEvent, WebhookSubscribed, WebhookUnsubscribed


@dataclass(frozen=True)
class Subscription:
    """One live subscription, as the projection knows it (the secret included: callers
    that show it must leave it out, see `public`)."""

    id: str
    url: str
    events: tuple[str, ...]
    secret: str = field(repr=False)
    since: datetime  # when HOOKS stored its WebhookSubscribed
    seq: int
    actor: str = ""
    description: str = ""

    def wants(self, event_type: str, stored: datetime) -> bool:
        """Whether an event of `event_type` stored at `stored` is delivered to it."""
        return event_type in self.events and stored >= self.since

    def public(self) -> dict[str, object]:
        """What `svc webhooks ls` and the API show: never the secret."""
        return {
            "id": self.id,
            "url": shown_url(self.url),
            "events": list(self.events),
            "secret": "set" if self.secret else "none",
            "since": self.since.isoformat(timespec="seconds"),
            "actor": self.actor,
            "description": self.description,
        }


def shown_url(url: str) -> str:
    """`url` with any password in it masked (`https://user:***@host/...`)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    if "@" not in authority:
        return url
    userinfo, _, host = authority.rpartition("@")
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}{slash}{tail}"


@dataclass
class Subscriptions:
    """Live subscriptions by id, and the HOOKS position applied."""

    live: dict[str, Subscription] = field(default_factory=dict)
    removed: set[str] = field(default_factory=set)
    position: int = 0

    def apply(self, seq: int, stored: datetime, event: SubscriptionEvent) -> bool:
        """Apply one HOOKS event; True if the list changed. Idempotent per sequence."""
        if seq <= self.position:
            return False
        self.position = seq
        match event:
            case WebhookSubscribed():
                if event.subscription in self.live or event.subscription in self.removed:
                    return False  # an id is used once: a repeat changes nothing
                self.live[event.subscription] = Subscription(
                    id=event.subscription,
                    url=event.url,
                    events=tuple(e for e in event.events if e in HOOKABLE),
                    secret=event.secret,
                    since=stored,
                    seq=seq,
                    actor=event.actor,
                    description=event.description,
                )
                return True
            case WebhookUnsubscribed():
                self.removed.add(event.subscription)
                return self.live.pop(event.subscription, None) is not None
            case _:  # test requests do not change the list
                return False

    def matching(self, event_type: str, stored: datetime) -> list[Subscription]:
        """The subscriptions an event of `event_type` stored at `stored` goes to."""
        return [s for s in self.live.values() if s.wants(event_type, stored)]

    def streams_wanted(self) -> dict[str, datetime]:
        """Source stream -> the earliest time any live subscription wants from it."""
        wanted: dict[str, datetime] = {}
        for sub in self.live.values():
            for event_type in sub.events:
                stream = HOOKABLE[event_type]
                if stream not in wanted or sub.since < wanted[stream]:
                    wanted[stream] = sub.since
        return wanted
