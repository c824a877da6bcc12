"""The `cloud-window` follow-up (ADR 0028): a reply the network refused after accepting
it, for being outside the 24-hour window, is followed by the account's template.

The Graph API may accept a send (200, a wamid) and report later, in a `failed` status
webhook, that it was outside the window (131047). The ingress records that as
`DeliveryFailed{attempt=0, code=131047, permanent}` on DELIVERY; it never publishes jobs
(least privilege). This consumer -- one shared durable consumer, run by the roles that
send with cloud (whatsapp, whatsapp-egress, all) -- turns each such failure, for an
account with a template, into one follow-up job: `SendMessage(template=<name>)` whose id
derives from the failed job (`derived_id("template", job_id)`, also its Nats-Msg-Id), and
once published it is marked in the `sends` bucket (`SendLedger.followed_up`), so a failure
read again -- redelivered, re-recorded, or re-read days later by a recreated consumer, long
past OUTBOUND's duplicate window -- publishes it once; its `cause_id` is the failed job.
Without a template nothing more happens: the permanent failure is already on record.
"""

from __future__ import annotations

import asyncio
import logging

import msgspec

from contracts import subjects
from contracts.errors import ContractError
from contracts.events import SendMessage, derived_id
from contracts.streams import DELIVERY
from services.channel.ledger import SendLedger
from services.runtime.bus import Bus
from services.runtime.consumer import ConsumerLoop, ConsumerSpec, Delivery
from services.runtime.settings import CloudSettings

log = logging.getLogger(__name__)

DURABLE = "cloud-window"
WINDOW_CODE = 131047  # outside the 24-hour customer service window


class DeliveryFact(msgspec.Struct, frozen=True, kw_only=True):
    """What this consumer reads of any DELIVERY event: its kind and, for a failure, the
    job and the network's code. Every other field (and kind) is ignored, so a kind added
    later is acked and skipped, never dead-lettered."""

    type: str
    job_id: str = ""
    channel: str = ""
    account: str = ""
    chat: str = ""
    attempt: int = -1
    code: int | None = None


def window_spec(channel: str = "whatsapp") -> ConsumerSpec:
    """The shared durable consumer on DELIVERY (any number of replicas take turns)."""
    return ConsumerSpec(
        stream=DELIVERY.name,
        durable=DURABLE,
        filter_subject=f"delivery.{channel}.>",
        ack_wait=30.0,
        batch=64,
        fetch_timeout=0.5,
    )


def template_job(failed_job: str, where: subjects.ChatSubject, template: str) -> SendMessage:
    """The follow-up job for a window failure of `failed_job`: the template, same chat."""
    job_id = derived_id("template", failed_job)
    return SendMessage(
        id=job_id,
        job_id=job_id,
        channel=where.channel,
        account=where.account,
        chat=where.chat,
        text=f"(template {template})",
        template=template,
        cause_id=failed_job,
    )


class CloudWindow:
    """Follows window failures with the account's template (see the module doc)."""

    def __init__(self, bus: Bus, settings: CloudSettings, channel: str = "whatsapp") -> None:
        self.bus = bus
        self.templates = {name: number.template for name, number in settings.accounts}
        self.ledgers = {name: SendLedger(bus, name) for name, _ in settings.accounts}
        self.loop = ConsumerLoop(bus, window_spec(channel), DeliveryFact, self.handle)
        self.published = 0

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop`."""
        await self.loop.run(stop)

    async def handle(self, fact: DeliveryFact, d: Delivery) -> None:
        """One DELIVERY event: a window failure of a templated account gets its job."""
        if fact.type != "DeliveryFailed" or fact.attempt != 0 or fact.code != WINDOW_CODE:
            return
        where = {"account": fact.account, "job_id": fact.job_id}
        template = self.templates.get(fact.account, "")
        if not template:
            log.info("window failure, no template configured: nothing to follow up", extra=where)
            return
        try:
            # Addressed by the subject it was recorded on (what the stream's permissions
            # guard), never by what its payload claims.
            chat = subjects.parse_chat_subject(d.subject)
            subjects.check_job_id(fact.job_id)
            if chat.account != fact.account:
                raise ContractError(f"recorded for account {chat.account}, names {fact.account}")
        except ContractError as exc:
            log.warning("window failure not followed up", extra={**where, "error": str(exc)})
            return
        ledger = self.ledgers[fact.account]
        if await ledger.follow_up_of(fact.job_id) is not None:
            return  # followed up before (this failure read again)
        job = template_job(fact.job_id, chat, template)
        target = subjects.outbound(chat.channel, chat.account, chat.chat)
        # Nats-Msg-Id = the job id: a crash before the mark below is deduped on redelivery.
        ack = await self.bus.publish(target, job)
        await ledger.followed_up(fact.job_id, job.job_id)
        if not ack.duplicate:
            self.published += 1
            log.info(
                "window failure followed by the template",
                extra={**where, "template": template, "template_job": job.job_id},
            )
