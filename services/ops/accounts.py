"""`svc accounts`: hand an account over to another worker, resume a parked account."""

from __future__ import annotations

import msgspec
import nats.errors
import nats.js.errors

from contracts import subjects
from contracts.events import CHANNEL_WHATSAPP, AccountResumed
from contracts.streams import LEASES
from services.channel.owner import HandoverReply, ResumeReply, ResumeRequest
from services.runtime.bus import Bus
from services.runtime.errors import ServiceError
from services.runtime.lease import read_lease


async def handover(bus: Bus, account: str, *, timeout: float) -> HandoverReply:
    """Ask the account's owner to release its lease gracefully (a standby takes over)."""
    subject = subjects.lease_handover(CHANNEL_WHATSAPP, account)
    try:
        msg = await bus.nc.request(subject, b"", timeout=timeout)
    except nats.errors.NoRespondersError:
        raise ServiceError(f"nobody holds account {account!r}: nothing to hand over") from None
    except nats.errors.TimeoutError:
        raise ServiceError(
            f"the owner of {account!r} did not confirm within {timeout:g}s; check 'svc status'"
        ) from None
    return msgspec.json.decode(msg.data, type=HandoverReply)


async def resume(
    bus: Bus,
    account: str,
    *,
    actor: str,
    reason: str,
    client: str = "",
    via: str = "cli",
    timeout: float = 5.0,
) -> str:
    """Clear a parked account so a worker takes it over again (recorded with who and from
    where); return what was parked.

    A running worker of the account does it on request (`svc.lease.resume.*`), so a client
    that may not write the lease bucket (the web role's NATS user) resumes too; with no
    worker running, the lease is cleared here (the operator's credentials)."""
    request = ResumeRequest(actor=actor, reason=reason, client=client, via=via)
    subject = subjects.lease_resume(CHANNEL_WHATSAPP, account)
    try:
        msg = await bus.nc.request(subject, msgspec.json.encode(request), timeout=timeout)
    except nats.errors.NoRespondersError:
        return await _resume_here(bus, account, request)
    except nats.errors.TimeoutError:
        raise ServiceError(
            f"no worker of {account!r} confirmed the resume within {timeout:g}s;"
            " check 'svc status' and retry"
        ) from None
    reply = msgspec.json.decode(msg.data, type=ResumeReply)
    if reply.error:
        raise ServiceError(f"account {account!r} {reply.error}")
    return reply.parked


async def _resume_here(bus: Bus, account: str, request: ResumeRequest) -> str:
    key = subjects.lease_key(CHANNEL_WHATSAPP, account)
    kv = await bus.js.key_value(LEASES.name)
    found = await read_lease(kv, key)
    if found is None:
        raise ServiceError(f"account {account!r} is not parked (nobody holds it)")
    value, revision = found
    if not value.parked:
        raise ServiceError(f"account {account!r} is not parked: {value.holder} holds it")
    try:
        await kv.delete(key, last=revision)
    except nats.js.errors.Error as exc:
        raise ServiceError(f"account {account!r} changed while resuming ({exc}); retry") from None
    await bus.publish(
        subjects.accounts(CHANNEL_WHATSAPP, account),
        AccountResumed(
            account=account,
            actor=request.actor,
            reason=request.reason,
            client=request.client,
            via=request.via,
        ),
    )
    return value.parked
