"""The WhatsApp Cloud API transport's sending side (ADR 0028): plain httpx to the Graph API.

A `CloudSession` is stateless on the network's side: nothing to dial, nothing to pair.
Each send is one `POST {api_url}/{api_version}/{phone_number_id}/messages` with the
account's bearer token, on one `httpx.AsyncClient` shared by the transport's sessions
(opened with the first session, closed with the last). The body comes from
`cloud_map.send_body` / `template_body`; `biz_opaque_callback_data` is the job id, which
status webhooks echo back (that is what resolves an uncertain send: `confirmed`).

What a send's outcome means for the egress (`cloud_map.classify_cloud_error`):
- 200 with a message id: sent, the wamid is the transport id;
- transient (130429, 131056, 80007, 429, 5xx): TransportError, retried in place;
- window (131047, outside the 24-hour window): the account's template, sent for the same
  job (its wamid returned), else a permanent TransportError saying to configure one;
- account (190 / 401 token, 368 / 131031 restricted, missing permissions): the session
  ends (the owner parks the account with the reason) and the send raises
  NotConnectedError: nothing was sent, the job waits in place for the resumed account;
- permanent (131026, other recipient errors): TransportError(permanent=True);
- unknown, or a failure after the request was written (timeout, dropped connection):
  UncertainSendError; a failure before anything was written (connect, DNS, pool):
  NotConnectedError.
A fence past its deadline is refused before any I/O (StaleFenceError), and no request's
timeout outlives the fence's deadline. The token is only ever in the Authorization header:
never in a log line, an error or an event.

Inbound: webhooks arrive over HTTP (the ingress's `/webhooks/whatsapp/<account>`), not on
a session. `inbound` is a source whose receiver does nothing, so no role waits on it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any

import httpx

from contracts.events import CHANNEL_WHATSAPP
from services.channel.ledger import SendLedger
from services.channel.port import (
    Connected,
    Events,
    NotConnectedError,
    Outgoing,
    SessionEnd,
    SessionEnding,
    StaleFenceError,
    TemporaryBan,
    TransportError,
    UncertainSendError,
)
from services.runtime.bus import Bus
from services.runtime.settings import CloudAccount, CloudSettings
from services.whatsapp.cloud_map import classify_cloud_error, send_body, template_body

log = logging.getLogger(__name__)

CONFIRM_POLL = 0.1  # seconds between looks at the sends bucket while waiting for a confirm
_TEXT_SHOWN = 200  # characters of a Graph error message kept in an error
TOKEN_CODES = frozenset({190})  # the access token expired or was revoked
RESTRICTED_CODES = frozenset({368, 131031})  # the account is restricted / locked


class NoWebhookReceiver:
    """The Cloud API's inbound path is HTTP (the ingress's webhook handler): a receiver
    here has nothing to pull, so it only marks the place a role would wait on one."""

    @asynccontextmanager
    async def _nothing(self) -> AsyncIterator[None]:
        yield

    def receiver(self, account: str, events: Events) -> AbstractAsyncContextManager[None]:
        """Nothing to receive on a session: webhooks are posted to the HTTP server."""
        return self._nothing()


class CloudTransport:
    """Opens Cloud API sessions: one shared HTTP client, the accounts' numbers and tokens."""

    name = "cloud"
    channel = CHANNEL_WHATSAPP

    def __init__(self, bus: Bus, settings: CloudSettings) -> None:
        self.bus = bus
        self.settings = settings
        self.send_timeout = settings.send_timeout
        self.inbound = NoWebhookReceiver()
        self._client: httpx.AsyncClient | None = None
        self._sessions = 0

    def client(self) -> httpx.AsyncClient:
        """The shared HTTP client (made on first use; closed with the last session)."""
        if self._client is None:
            self._client = httpx.AsyncClient(
                base_url=self.settings.api_url,
                timeout=self.send_timeout,
                # One number sends at most ~80 msg/s: a few kept-alive connections suffice.
                limits=httpx.Limits(max_connections=32, max_keepalive_connections=8),
                follow_redirects=False,
            )
        return self._client

    async def aclose(self) -> None:
        """Close the shared client (idempotent); a later session opens a new one."""
        client, self._client = self._client, None
        if client is not None:
            await client.aclose()

    def url(self, number: CloudAccount) -> str:
        """The send endpoint of `number`, relative to the API base."""
        return f"/{self.settings.api_version}/{number.phone_number_id}/messages"

    @asynccontextmanager
    async def session(
        self, account: str, events: Events, *, receive: bool
    ) -> AsyncIterator[CloudSession]:
        """Attach to `account` (nothing to dial: attached is connected). `receive` changes
        nothing: what users send arrives as webhooks over HTTP."""
        session = CloudSession(self, account, events)
        self._sessions += 1
        try:
            if session.number is not None:
                events.post(Connected())
            yield session
        finally:
            self._sessions -= 1
            if self._sessions == 0:
                await self.aclose()


class CloudSession(SessionEnding):
    """One account's number on the Cloud API, held while the owner holds the lease."""

    reports_receipts = True  # status webhooks name the wamid send() returned

    def __init__(self, transport: CloudTransport, account: str, events: Events) -> None:
        super().__init__()
        self.transport = transport
        self.account = account
        self.events = events
        self.send_timeout = transport.send_timeout
        self.confirm_wait = transport.settings.confirm_wait
        self.ledger = SendLedger(transport.bus, account)
        self._where = {"account": account, "channel": CHANNEL_WHATSAPP}
        self.number: CloudAccount | None
        try:
            self.number = transport.settings.account(account)
        except KeyError:
            self.number = None
            self.end(
                SessionEnd(
                    "connect_failed",
                    f"account {account!r} has no Cloud API number configured: add it to"
                    " WHATSAPP_CLOUD_ACCOUNTS_FILE, then svc accounts resume " + account,
                )
            )

    # -- sending ---------------------------------------------------------------------

    async def send(self, out: Outgoing) -> str:
        """Send `out` (its template when it names one); the wamid the Graph API gave it."""
        number = self.number
        if number is None or self._end is not None:
            raise NotConnectedError("cloud: the account's session has ended")
        if out.template:
            body = template_body(
                out.chat, template=out.template, language=number.language, job_id=out.job_id
            )
        else:
            body = send_body(out, job_id=out.job_id)
        status, answer = await self._post(number, body, out)
        if status == 200:
            return self._message_id(answer)
        code, text = _graph_error(status, answer)
        kind = classify_cloud_error(status, code)
        if kind == "window" and number.template and not out.template:
            # Outside the 24-hour window: the configured template instead, for this job.
            log.warning(
                "outside the 24-hour window: sending the account's template",
                extra={**self._where, "job_id": out.job_id, "template": number.template},
            )
            body = template_body(
                out.chat, template=number.template, language=number.language, job_id=out.job_id
            )
            status, answer = await self._post(number, body, out)
            if status == 200:
                return self._message_id(answer)
            code, text = _graph_error(status, answer)
            kind = classify_cloud_error(status, code)
        if kind == "window" and (out.template or number.template):
            kind = "permanent"  # a template refused for the window: no template can help
        raise self._failed(kind, status, code, text)

    async def _post(
        self, number: CloudAccount, body: dict[str, Any], out: Outgoing
    ) -> tuple[int, Any]:
        """POST `body`; (HTTP status, decoded JSON or None). Raises what the egress needs
        for a request that got no answer (see the module doc)."""
        remaining = out.fence.deadline - time.monotonic()
        if remaining <= 0:
            raise StaleFenceError(
                f"cloud: send refused, past its lease deadline (token {out.fence.token})"
            )
        limit = min(self.send_timeout, remaining) if math.isfinite(remaining) else self.send_timeout
        written = False

        async def trace(name: str, info: dict[str, Any]) -> None:
            nonlocal written
            if name.endswith("send_request_headers.started"):
                written = True  # from here on, the server may act on the request

        headers = {"Authorization": f"Bearer {number.token.value}"}
        try:
            async with asyncio.timeout(limit):
                response = await self.transport.client().post(
                    self.transport.url(number),
                    json=body,
                    headers=headers,
                    timeout=limit,
                    extensions={"trace": trace},
                )
        except (TimeoutError, httpx.TransportError) as exc:
            what = "no answer" if isinstance(exc, TimeoutError | httpx.TimeoutException) else ""
            why = f"{what or type(exc).__name__} within {limit:.3g} s"
            if not written or isinstance(exc, httpx.ConnectError | httpx.PoolTimeout):
                raise NotConnectedError(
                    f"cloud: Graph API not reached ({why}): nothing sent"
                ) from None
            raise UncertainSendError(
                f"cloud: {why} from the Graph API: the message may have been sent"
            ) from None
        try:
            answer = response.json()
        except ValueError:
            answer = None
        return response.status_code, answer

    def _message_id(self, answer: Any) -> str:
        try:
            wamid = answer["messages"][0]["id"]
        except (TypeError, KeyError, IndexError):
            wamid = None
        if not isinstance(wamid, str) or not wamid:
            raise UncertainSendError(
                "cloud: 200 without a message id: the message may have been sent"
            )
        return wamid

    def _failed(self, kind: str, status: int, code: int | None, text: str) -> TransportError:
        """The error the egress gets for a refused send; an account error ends the session."""
        error = f"cloud: {status} {code if code is not None else '-'} {text}".rstrip()
        match kind:
            case "transient":
                return TransportError(error)
            case "permanent":
                return TransportError(error, permanent=True)
            case "window":
                return TransportError(
                    f"{error}: the chat is outside the 24-hour window; configure a template"
                    f" for account {self.account} (WHATSAPP_CLOUD_TEMPLATE, or 'template' in"
                    " WHATSAPP_CLOUD_ACCOUNTS_FILE) to reach it",
                    permanent=True,
                )
            case "account":
                self._account_error(status, code, text)
                return NotConnectedError(f"{error}: the account is parked, the job waits")
            case _:
                return UncertainSendError(f"{error}: the message may have been sent")

    def _account_error(self, status: int, code: int | None, text: str) -> None:
        """End the session with what an operator must do (the owner parks the account)."""
        shown = f"{code if code is not None else status} {text}".strip()
        if code in RESTRICTED_CODES:
            reason = f"account restricted by WhatsApp ({shown})"
            log.error("account restricted", extra={**self._where, "reason": reason})
            self.events.post(TemporaryBan(reason=reason))
            self.end(SessionEnd("banned", f"banned: {reason}"))
            return
        if code in TOKEN_CODES or status == 401:
            reason = (
                f"Cloud API token rejected ({shown}): renew WHATSAPP_CLOUD_TOKEN then"
                f" svc accounts resume {self.account}"
            )
        else:
            reason = (
                f"Cloud API refused the app's permissions ({shown}): grant the token"
                f" whatsapp_business_messaging then svc accounts resume {self.account}"
            )
        log.error("cloud account refused", extra={**self._where, "reason": reason})
        self.end(SessionEnd("connect_failed", reason))

    # -- optional capability (port.SessionCapabilities) ------------------------------

    async def confirmed(self, job_id: str) -> str | None:
        """The wamid a status webhook confirmed for `job_id` (SendLedger.confirm), waiting
        up to WHATSAPP_CLOUD_CONFIRM_WAIT for one; None if none came."""
        deadline = time.monotonic() + self.confirm_wait
        while True:
            found = await self.ledger.confirmed(job_id)
            if found or time.monotonic() >= deadline:
                return found
            await asyncio.sleep(min(CONFIRM_POLL, max(0.0, deadline - time.monotonic())))


def _graph_error(status: int, answer: Any) -> tuple[int | None, str]:
    """The Graph error's code and message from an error answer (None, reason otherwise)."""
    error = answer.get("error") if isinstance(answer, dict) else None
    if not isinstance(error, dict):
        return None, f"HTTP {status} without a Graph error"
    code = error.get("code")
    message = str(error.get("message") or error.get("error_user_title") or "")
    details = error.get("error_data", {})
    if isinstance(details, dict) and details.get("details"):
        message = f"{message} ({details['details']})" if message else str(details["details"])
    if len(message) > _TEXT_SHOWN:
        message = message[: _TEXT_SHOWN - 3] + "..."
    return (code if isinstance(code, int) and not isinstance(code, bool) else None), message
