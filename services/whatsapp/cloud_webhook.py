"""The Cloud API webhook receiver (ADR 0027): `GET|POST /webhooks/whatsapp/<account>`.

`CloudWebhooks` is the logic, testable without HTTP; `webhook_routes` puts it behind
Litestar (served by `services.runtime.http`). A POST is answered only after everything in
it is stored: size cap (413), signature over the raw bytes (missing 401, bad 403), the
Graph shape (400; each item is routed by its phone number id to the account with that
number among those sharing the signing app's secret -- one Meta app, one callback URL),
then per item a dedupe check in the KV bucket `webhooks` (Meta retries
for up to 7 days; the streams' duplicate window is 2 minutes), the publish (its
`Nats-Msg-Id` is the event's derived id, so two replicas racing store it once), and the
mark. NATS down or slow past `deadline`: 503 and nothing marked, so Meta's retry stores
it. A refusal stores nothing. Secrets (app secret, verify token) never reach a log or an
answer.

Messages become `MessageReceived` on INBOUND (`inbound_event`, the id every transport
derives); statuses `sent|delivered|read` a `DeliveryReceipt` linked to the job plus the
job's confirm mark in `sends` (what resolves an uncertain send); `failed` a
`DeliveryFailed` with `attempt=0`, permanent, and the Graph error code. The receiver
never publishes jobs.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
from dataclasses import dataclass
from typing import Any, assert_never

import nats.errors
import nats.js.errors
from litestar import MediaType, Request, Response, Router, get, post
from litestar.exceptions.http_exceptions import RequestEntityTooLarge
from litestar.params import FromPath
from nats.js.kv import KeyValue

from contracts import subjects
from contracts.errors import ContractError
from contracts.events import (
    CHANNEL_WHATSAPP,
    DeliveryFailed,
    DeliveryReceipt,
    Event,
    MessageReceived,
    derived_id,
)
from contracts.streams import WEBHOOKS
from services.channel.ingress import inbound_event
from services.channel.ledger import SendLedger
from services.channel.port import Incoming
from services.runtime.bus import Bus
from services.runtime.http import text
from services.runtime.metrics import instruments, labels
from services.runtime.settings import CloudAccount, CloudSettings
from services.whatsapp.cloud_map import (
    Dropped,
    StatusReport,
    WebhookError,
    WebhookEvent,
    route_webhook,
    signature_ok,
    verify_handshake,
)

log = logging.getLogger(__name__)

SIGNATURE_HEADER = "X-Hub-Signature-256"
# Meta waits ~10 s for an answer; everything a POST stores must be acked well before.
DEFAULT_DEADLINE = 5.0
_UNAVAILABLE = (nats.errors.Error, TimeoutError, OSError)


@dataclass(frozen=True)
class Answer:
    """What to answer: an HTTP status and one line of text (the raw challenge for a
    handshake)."""

    status: int
    body: str
    raw: bool = False  # sent as is (the handshake's challenge), not as a line


@dataclass(frozen=True)
class _Item:
    """One webhook item ready to store: its dedupe key, the event and where it goes."""

    key: str
    subject: str
    event: Event
    confirm: tuple[str, str] | None = None  # (job id, wamid) for the sends ledger


def dedupe_key(account: str, kind: str, item_id: str, status: str = "") -> str:
    """The `webhooks` bucket key of one webhook item: the same message (or the same status
    of a message) in any body, any retry, on any replica has the same key."""
    digest = hashlib.blake2b(f"{kind}|{item_id}|{status}".encode(), digest_size=16).hexdigest()
    return f"{subjects.check_account(account)}.{digest}"


class CloudWebhooks:
    """Receives the Cloud API webhooks of the configured accounts and stores what they
    carry before answering (see the module doc)."""

    def __init__(
        self,
        bus: Bus,
        cloud: CloudSettings,
        *,
        max_bytes: int,
        deadline: float = DEFAULT_DEADLINE,
        channel: str = CHANNEL_WHATSAPP,
    ) -> None:
        self.bus = bus
        self.accounts: dict[str, CloudAccount] = dict(cloud.accounts)
        # Per account: phone number id -> account for every account a body signed with its
        # app secret may carry (one Meta app, one callback URL for all its numbers; the
        # signature proves only that app). Computed once: the accounts are fixed at start.
        self._numbers: dict[str, dict[str, str]] = {
            name: {
                other.phone_number_id: other_name
                for other_name, other in cloud.accounts
                if hmac.compare_digest(
                    other.app_secret.value.encode(), config.app_secret.value.encode()
                )
            }
            for name, config in cloud.accounts
        }
        self.max_bytes = max_bytes
        self.deadline = deadline
        self.channel = channel
        self._ledgers: dict[str, SendLedger] = {}
        self._kv: KeyValue | None = None

    # -- GET: the subscription handshake --------------------------------------------------
    def verify(
        self, account: str, mode: str | None, token: str | None, challenge: str | None
    ) -> Answer:
        """Answer Meta's `hub.challenge` handshake for `account`."""
        config = self.accounts.get(account)
        if config is None:
            return self._unknown(account)
        answer = verify_handshake(mode, token, challenge, config.verify_token.value)
        if answer is None:
            log.warning(
                "webhook handshake refused",
                extra={
                    "account": account,
                    "mode": subjects.shown(mode or ""),
                    "has_challenge": challenge is not None,
                },
            )
            return Answer(
                403,
                "verification refused: hub.mode must be subscribe and hub.verify_token the"
                " account's WHATSAPP_CLOUD_VERIFY_TOKEN",
            )
        log.info("webhook handshake answered", extra={"account": account})
        return Answer(200, answer, raw=True)

    # -- POST: deliveries -----------------------------------------------------------------
    def known(self, account: str) -> Answer | None:
        """None when `account` has Cloud API settings here, else the 404 to answer."""
        return None if account in self.accounts else self._unknown(account)

    def too_large(self, account: str, size: int | None = None) -> Answer:
        """The 413 for a body over the cap (nothing was stored)."""
        got = f" of {size} bytes" if size is not None else ""
        log.warning(
            "webhook refused: body too large",
            extra={"account": account, "size": size, "max_bytes": self.max_bytes},
        )
        return Answer(
            413,
            f"webhook body{got} is over {self.max_bytes} bytes (SVC_WEBHOOK_MAX_BYTES):"
            " nothing was stored",
        )

    async def receive(self, account: str, raw: bytes, signature: str | None) -> Answer:
        """Check, map and store one POSTed body; 200 only once all of it is stored."""
        config = self.accounts.get(account)
        if config is None:
            return self._unknown(account)
        if len(raw) > self.max_bytes:
            return self.too_large(account, len(raw))
        if not signature:
            log.warning("webhook refused: no signature", extra={"account": account})
            return Answer(
                401, f"{SIGNATURE_HEADER} is missing: webhooks must be signed with the app secret"
            )
        if not signature_ok(config.app_secret.value.encode(), raw, signature):
            log.warning("webhook refused: bad signature", extra={"account": account})
            return Answer(
                403,
                f"{SIGNATURE_HEADER} does not match the body: check the account's"
                " WHATSAPP_CLOUD_APP_SECRET (the Meta app's secret)",
            )
        try:
            events = route_webhook(raw, self._numbers[account])
        except WebhookError as exc:
            line = str(exc).splitlines()[0]
            log.warning("webhook refused: bad body", extra={"account": account, "error": line})
            return Answer(400, line)
        if self.bus.lost.is_set() or not self.bus.nc.is_connected:
            return self._unavailable(account, "not connected to NATS")
        try:
            async with asyncio.timeout(self.deadline):
                stored = await self._store(events)
        except _UNAVAILABLE as exc:
            return self._unavailable(account, f"{type(exc).__name__}: {exc}".strip(" :"))
        log.info(
            "webhook stored",
            extra={"account": account, "items": len(events), "stored": stored},
        )
        return Answer(200, "ok")

    async def _store(self, events: list[tuple[str, WebhookEvent]]) -> int:
        stored = 0
        for account, event in events:
            item = await self._item(account, event)
            if item is None:
                continue
            kv = await self._bucket()
            try:
                await kv.get(item.key)
                continue  # stored before (an earlier delivery, or another replica)
            except nats.js.errors.KeyNotFoundError:
                pass
            ack = await self.bus.publish(item.subject, item.event, timeout=self.deadline)
            if not ack.duplicate:
                self._count(account, item.event)
            if item.confirm is not None:
                await self._ledger(account).confirm(*item.confirm)
            await kv.put(item.key, item.event.id.encode())
            stored += 0 if ack.duplicate else 1  # a replica racing us may have stored it
        return stored

    def _count(self, account: str, event: Event) -> None:
        """Metrics of what was just stored: a message received, or a job the network
        refused after accepting it (a failed job, as egress counts its own failures)."""
        if isinstance(event, MessageReceived):
            where = labels(("channel", self.channel), ("account", account))
            instruments().messages_received.add(1, where)
        elif isinstance(event, DeliveryFailed):
            where = labels(("channel", self.channel), ("account", account), ("outcome", "failed"))
            instruments().jobs.add(1, where)

    async def _item(self, account: str, event: WebhookEvent) -> _Item | None:
        """The event to store for one webhook item, or None (logged) when there is none."""
        where = {"account": account}
        match event:
            case Dropped(reason=reason):
                log.info("webhook item dropped", extra={**where, "reason": reason})
                return None
            case Incoming():
                try:
                    msg = inbound_event(self.channel, account, event)
                except ContractError as exc:
                    # Signed by Meta yet unusable: a retry cannot fix it, so no 4xx.
                    log.warning(
                        "webhook message dropped: invalid",
                        extra={**where, "error": str(exc).splitlines()[0]},
                    )
                    return None
                return _Item(
                    dedupe_key(account, "message", event.message_id),
                    subjects.inbound(self.channel, account, msg.chat),
                    msg,
                )
            case StatusReport():
                return await self._status(account, event)
            case _:
                assert_never(event)

    async def _status(self, account: str, report: StatusReport) -> _Item | None:
        where = {"account": account, "wamid": report.message_id, "status": report.status}
        job_id, chat = report.job_id, report.chat
        if not job_id or not chat:
            sent = await self._ledger(account).job_of(report.message_id)
            if sent is not None:
                job_id, chat = job_id or sent.job_id, sent.chat
        if not job_id or not chat:
            log.info("status for a message we did not send; dropped", extra=where)
            return None
        try:
            subjects.check_job_id(job_id)
            subjects.check_message_id(report.message_id)
            subject = subjects.delivery(self.channel, account, chat)
        except ContractError as exc:
            log.warning(
                "webhook status dropped: invalid",
                extra={**where, "error": str(exc).splitlines()[0]},
            )
            return None
        event_id = derived_id("receipt", account, report.message_id, report.status)
        key = dedupe_key(account, "status", report.message_id, report.status)
        if report.status == "failed":
            code = report.error_code
            parts = (str(code) if code is not None else "", report.error_title)
            error = " ".join(p for p in parts if p)
            failed = DeliveryFailed(
                id=event_id,
                channel=self.channel,
                job_id=job_id,
                account=account,
                chat=chat,
                attempt=0,
                error=error or "failed (no error given)",
                permanent=True,
                code=code,
            )
            return _Item(key, subject, failed)
        receipt = DeliveryReceipt(
            id=event_id,
            channel=self.channel,
            job_id=job_id,
            account=account,
            chat=chat,
            transport_message_id=report.message_id,
            status=report.status,
        )
        return _Item(key, subject, receipt, confirm=(job_id, report.message_id))

    # -- helpers ----------------------------------------------------------------------------
    async def _bucket(self) -> KeyValue:
        if self._kv is None:
            self._kv = await self.bus.js.key_value(WEBHOOKS.name)
        return self._kv

    def _ledger(self, account: str) -> SendLedger:
        ledger = self._ledgers.get(account)
        if ledger is None:
            ledger = self._ledgers[account] = SendLedger(self.bus, account)
        return ledger

    def _unknown(self, account: str) -> Answer:
        shown = subjects.shown(account)
        log.warning("webhook for an unknown account", extra={"account": shown})
        return Answer(
            404,
            f"no Cloud API account {shown} here: the webhook URL ends with an account of"
            " WHATSAPP_ACCOUNTS",
        )

    def _unavailable(self, account: str, why: str) -> Answer:
        log.warning(
            "webhook not stored: NATS unavailable; answered 503 so Meta retries",
            extra={"account": account, "error": why},
        )
        return Answer(503, "not stored (NATS unavailable): retry later")


def _answer(answer: Answer) -> Response[str]:
    if answer.raw:
        return Response(answer.body, status_code=answer.status, media_type=MediaType.TEXT)
    return text(answer.status, answer.body)


def webhook_routes(hooks: CloudWebhooks) -> Router:
    """`GET|POST /webhooks/whatsapp/{account}` for `hooks`' accounts."""

    @get("/{account:str}", sync_to_thread=False)
    def verify(account: FromPath[str], request: Request[Any, Any, Any]) -> Response[str]:
        query = request.query_params
        mode, token = query.get("hub.mode"), query.get("hub.verify_token")
        return _answer(hooks.verify(account, mode, token, query.get("hub.challenge")))

    @post("/{account:str}", status_code=200, request_max_body_size=hooks.max_bytes)
    async def receive(account: FromPath[str], request: Request[Any, Any, Any]) -> Response[str]:
        refused = hooks.known(account)
        if refused is not None:
            return _answer(refused)
        chunks: list[bytes] = []
        try:
            # Read as a stream: a Content-Length over the cap is refused before reading,
            # a chunked body is cut at the cap.
            async for chunk in request.stream():
                chunks.append(chunk)
        except RequestEntityTooLarge:
            return _answer(hooks.too_large(account, request.content_length))
        raw = b"".join(chunks)
        return _answer(await hooks.receive(account, raw, request.headers.get(SIGNATURE_HEADER)))

    return Router(path="/webhooks/whatsapp", route_handlers=[verify, receive])
