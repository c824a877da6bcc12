"""Every stream, bucket and durable consumer name, as data in one place."""

from __future__ import annotations

from enum import StrEnum

import msgspec

from contracts.subjects import check_account, check_channel, subject_matches

MiB = 1024 * 1024
GiB = 1024 * MiB
DAY = 86_400.0


class Retention(StrEnum):
    """Stream retention policy."""

    LIMITS = "limits"
    WORKQUEUE = "workqueue"


class StreamSpec(msgspec.Struct, frozen=True, kw_only=True):
    """What a stream must look like. `subjects` and `retention` are semantic: a live
    stream that differs there is a conflict; the rest are defaults operators may tune."""

    name: str
    subjects: tuple[str, ...]
    retention: Retention = Retention.LIMITS
    description: str = ""
    max_age_s: float = 0.0
    # 512 KiB: a dead letter (payload base64-encoded, +1/3) must still fit the server's
    # default 1 MiB max_payload. WhatsApp text tops out at 65,536 characters.
    max_msg_size: int = 512 * 1024
    duplicate_window_s: float = 120.0
    # Storage bounds (0: unlimited). Over them the server discards the oldest messages.
    max_bytes: int = 0
    max_msgs_per_subject: int = 0


class BucketSpec(msgspec.Struct, frozen=True, kw_only=True):
    """A KV bucket with per-key TTL (allow_msg_ttl) and no limit markers."""

    name: str
    history: int = 1
    description: str = ""
    max_value_size: int = 4096
    max_age_s: float = 0.0


INBOUND = StreamSpec(
    name="INBOUND",
    subjects=("inbound.*.*.*",),
    description="MessageReceived: what users sent to our accounts",
)
AGENT = StreamSpec(
    name="AGENT",
    subjects=("agent.*.*.*",),
    description="TurnCompleted / TurnFailed: one per inbound message",
)
OUTBOUND = StreamSpec(
    name="OUTBOUND",
    subjects=("outbound.*.*.*",),
    retention=Retention.WORKQUEUE,
    description="SendMessage jobs, consumed by each account's lease holder",
)
DELIVERY = StreamSpec(
    name="DELIVERY",
    subjects=("delivery.*.*.*",),
    description="MessageSent, DeliveryFailed, DeliveryDeadLettered, DeliveryUncertain, receipts",
)
DEADLETTER = StreamSpec(
    name="DEADLETTER",
    subjects=("deadletter.>",),
    description="Messages that could not be processed, with every attempt's error",
    max_msg_size=1 * MiB,
    # Bounded (ADR 0013): a letter keeps at most 64 KiB of its payload, and the stream
    # keeps 30 days / 1 GiB of letters, dropping the oldest beyond that. `svc dlq ls` and
    # `svc status` say when letters were dropped (the first sequence is then above 1).
    max_age_s=30 * DAY,
    max_bytes=1 * GiB,
)
PLUGINS = StreamSpec(
    name="PLUGINS",
    subjects=("plugins.>",),
    description="PluginInstalled, PluginConfigured, PluginUninstalled, ToolPolicySet",
)
ACCOUNTS = StreamSpec(
    name="ACCOUNTS",
    subjects=("accounts.*.*",),
    description="AccountRegistered, lease and session events",
)
# Who may talk to the agent (ADR 0023): `access.<channel>.<account>` (`_`: channel-wide).
ACCESS = StreamSpec(
    name="ACCESS",
    subjects=("access.*.*",),
    description="AccessModeSet, AccessRuleAdded/Removed, AccessApproved, AccessRequested",
)
# The simulated WhatsApp network: like WhatsApp's servers it keeps what users send while
# no owner is attached (a work queue per account) and records every send it accepted.
SIM = StreamSpec(
    name="SIM",
    subjects=("sim.whatsapp.*.in",),
    retention=Retention.WORKQUEUE,
    description="sim transport: user messages waiting for the account's owner",
    # Bounded (ADR 0013): what waits for an account no worker owns (or whose token no
    # worker can ever own) is kept 7 days and at most 10,000 messages per account, the
    # oldest dropped first -- like WhatsApp's own offline queue, which also expires.
    max_age_s=7 * DAY,
    max_msgs_per_subject=10_000,
    max_bytes=1 * GiB,
)
SIM_OUT = StreamSpec(
    name="SIM_OUT",
    subjects=("sim.whatsapp.*.out",),
    description="sim transport: every message the network accepted from an owner",
    max_age_s=7 * DAY,
)

# Outgoing webhooks (h-hooks, ADR 0042): subscriptions (kept forever, they are the list),
# delivery jobs (a work queue) and what became of each delivery (kept 30 days).
HOOKS = StreamSpec(
    name="HOOKS",
    subjects=("hooks.subscriptions.*", "hooks.tests.*"),
    description="WebhookSubscribed, WebhookUnsubscribed, WebhookTestRequested",
)
HOOK_JOBS = StreamSpec(
    name="HOOK_JOBS",
    subjects=("hooks.jobs.*.*",),
    retention=Retention.WORKQUEUE,
    description="DeliverWebhook jobs: one per event x matching subscription",
    max_msg_size=1 * MiB,
    # A job's id derives from (event, subscription): a source event read again within
    # this window makes no second job (beyond it, the delivery record says "delivered").
    duplicate_window_s=600.0,
    max_age_s=7 * DAY,
    max_bytes=1 * GiB,
)
HOOK_DELIVERIES = StreamSpec(
    name="HOOK_DELIVERIES",
    subjects=("hooks.deliveries.*.*",),
    description="WebhookDelivered, WebhookDeliveryFailed, WebhookDeadLettered",
    max_msg_size=1 * MiB,
    max_age_s=30 * DAY,
    max_bytes=1 * GiB,
)

# h-web (issue 18): the web side's audit trail (ADR 0040): users added/removed, tokens
# created/revoked, logins ok/failed, logouts. Never a secret.
WEB = StreamSpec(
    name="WEB",
    subjects=("web.*.*",),
    description="UserAdded/Removed, TokenCreated/Revoked, LoginSucceeded/Failed, LoggedOut",
)

STREAMS: tuple[StreamSpec, ...] = (
    INBOUND,
    AGENT,
    OUTBOUND,
    DELIVERY,
    DEADLETTER,
    PLUGINS,
    ACCOUNTS,
    ACCESS,
    SIM,
    SIM_OUT,
    # h-hooks (outgoing webhooks)
    HOOKS,
    HOOK_JOBS,
    HOOK_DELIVERIES,
    WEB,  # h-web
)
STREAMS_BY_NAME: dict[str, StreamSpec] = {s.name: s for s in STREAMS}

LEASES = BucketSpec(
    name="leases", description="one sender per account: {holder, token, acquired_at}"
)
# Live whatsapp workers announce themselves here (key `<account-set>.<holder>`, per-key
# TTL) so each can compute its fair share of the accounts.
PRESENCE = BucketSpec(name="presence", description="live whatsapp workers, for fair share")
# Per-job delivery state (SendRecord) and transport-id -> job index, kept a week: what
# makes a redelivered job "already sent" or "uncertain" across owners and restarts.
SENDS = BucketSpec(
    name="sends", description="delivery state per job", max_value_size=65536, max_age_s=7 * DAY
)
# Per-chat core state (ChatState): turn order across core replicas, and history.
CHATS = BucketSpec(
    name="chats", description="per-chat turn position and history", max_value_size=262144
)
# Ordered consumers mark each attempt of a *redelivered* message here before it starts
# and clear the mark when it ends (key `<stream>.<durable>.<seq>`, value: how many such
# attempts never ended). A message whose handling kills its process is thus counted and
# dead-lettered, while messages that only rode along with it (held, handed back) are not.
ATTEMPTS = BucketSpec(
    name="attempts", description="unfinished attempts of redelivered messages", max_age_s=DAY
)
# Per-account session state any host needs to resume a session (key `<channel>.<account>`,
# DeviceRecord): which device of the shared session store is the account's. The device's
# keys stay in the transport's own store (WHATSAPP_STORE); this says which one to resume.
DEVICES = BucketSpec(name="devices", description="account -> paired device, to resume sessions")
# The session status board (key `<channel>.<account>`, SessionStatus): what each
# account's owner last reported about its session (connecting, connected, banned until
# ..., standby), for `svc status`. Written best-effort by the owner; the lease decides.
SESSIONS = BucketSpec(name="sessions", description="account -> session state, for svc status")
# Cloud API webhook items already stored (key `<account>.<hash of kind|id|status>`, value
# the stored event's id), so Meta's retries -- for up to 7 days, far past the streams'
# 2-minute duplicate window -- are stored once (ADR 0027). Kept a day longer than Meta retries.
WEBHOOKS = BucketSpec(
    name="webhooks", description="Cloud API webhook items already stored", max_age_s=8 * DAY
)
# h-web (issue 18, ADR 0040): console users (key `<name>`), API tokens (key `<id>`),
# sessions (key: sha256 of the cookie; per-key TTL = lifetime) and failed-login counters
# (key `user.<name>` / `addr.<address>`; per-key TTL = the throttle window).
WEB_USERS = BucketSpec(name="web_users", description="console users: role, argon2id hash")
WEB_TOKENS = BucketSpec(name="web_tokens", description="API tokens: role, sha256 of the secret")
WEB_SESSIONS = BucketSpec(name="web_sessions", description="console sessions (per-key TTL)")
WEB_THROTTLE = BucketSpec(name="web_throttle", description="failed logins per user and address")
BUCKETS: tuple[BucketSpec, ...] = (
    LEASES,
    PRESENCE,
    SENDS,
    CHATS,
    ATTEMPTS,
    DEVICES,
    SESSIONS,
    WEBHOOKS,
    WEB_USERS,  # h-web
    WEB_TOKENS,  # h-web
    WEB_SESSIONS,  # h-web
    WEB_THROTTLE,  # h-web
)

# Durable consumer names.
CORE_CONSUMER = "core"


def egress_consumer(channel: str, account: str) -> str:
    """Durable consumer of one account's outbound jobs (only the lease holder pulls)."""
    return f"egress-{check_channel(channel)}-{check_account(account)}"


def sim_consumer(account: str) -> str:
    """Durable consumer of what simulated users sent to one account."""
    return f"sim-in-{check_account(account)}"


def stream_for_subject(subject: str) -> StreamSpec | None:
    """The spec whose subjects capture `subject`, or None."""
    for spec in STREAMS:
        if any(subject_matches(pattern, subject) for pattern in spec.subjects):
            return spec
    return None
