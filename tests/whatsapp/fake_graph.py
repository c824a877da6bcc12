"""Test helpers for the WhatsApp Cloud API transport: a fake Graph API and a signed-webhook
client, both on 127.0.0.1 (no network).

- `FakeGraph`: a real HTTP server (stdlib `ThreadingHTTPServer`, port 0, in a thread; the
  shape of `tests/core/test_openai.py`'s `FakeOpenAI`) answering
  `POST /v{ver}/{PHONE_NUMBER_ID}/messages` with a bearer token as Meta does. Every request
  is recorded (`GraphRequest`); answers are scripted per call (`script`) or per recipient
  (`script_for`), else a success with a fresh `wamid.`. A wrong or missing token answers
  401 code 190 (and consumes no script); an unknown phone number id answers 400 code 100.
- `WebhookClient`: what Meta's webhook delivery does: signed `POST`s
  (`X-Hub-Signature-256: sha256=<hex HMAC-SHA256(app_secret, raw body)>`) and the `GET`
  verify handshake, against `<base_url>/webhooks/whatsapp/<account>` (DESIGN.md, HTTP).
  Its calls are async (the blocking stdlib call runs in a thread), so the server under test
  may run on the test's own loop or in a `svc` process.
- `message_body` / `status_body`: webhook bodies in Meta's JSON shape.

Shapes, from public references (checked 2026-11-30 with the `search` tool):
- webhook bodies: pywa's fixtures `tests/data/updates/message.json` (text, `context` of a
  reply as `{"from", "id"}`, `contacts[].profile.name`) and `message_status.json`
  (`statuses[]` with `recipient_id`, string `timestamp`, `conversation`, `pricing`,
  `biz_opaque_callback_data`, and `errors[]` of `{code, title, message, error_data.details,
  href}` on `failed`) in github.com/david-lev/pywa;
- send answer `{"messaging_product", "contacts":[{"input","wa_id"}], "messages":[{"id"}]}`:
  williamneves/nextjs-whatsapp-cloud-api `src/whatsapp/types.d.ts` (`PayloadResponse`);
- error answer `{"error": {"message", "type", "code", "error_data": {"details"},
  "fbtrace_id"}}`: Meta's "WhatsApp error codes" page (developers.facebook.com, Cloud API
  support/error-codes), which also gives the codes' meaning. HTTP statuses per code are in
  `ERRORS`; Meta answers most Graph errors with 400, 401 for token errors (190); the 429
  for 130429 follows the issue's brief. `error(..., status=)` overrides any of them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import http.client
import itertools
import json
import re
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DEFAULT_PHONE_NUMBER_ID = "1122334455667"
DEFAULT_TOKEN = "EAAG-test-token-not-a-secret"
DEFAULT_WABA_ID = "1234567890987654321"
DEFAULT_DISPLAY_NUMBER = "15550001111"

# code -> (HTTP status, message (title), details). Meanings from Meta's error-code page.
ERRORS: dict[int, tuple[int, str, str]] = {
    100: (400, "Invalid parameter", "Unsupported post request or invalid parameter."),
    190: (401, "Access token has expired", "Error validating access token."),
    368: (403, "Temporarily blocked for policies violations", "Account restricted."),
    80007: (400, "Rate limit issues", "The WhatsApp Business Account reached its rate limit."),
    130429: (429, "Rate limit hit", "Cloud API message throughput has been reached."),
    131026: (400, "Message Undeliverable", "Unable to deliver message."),
    131031: (403, "Account has been locked", "The business account is restricted."),
    131047: (
        400,
        "Re-engagement message",
        "Message failed to send because more than 24 hours have passed since the customer "
        "last replied to this number.",
    ),
    131056: (
        400,
        "(Business Account, Consumer Account) pair rate limit hit",
        "Too many messages sent from this phone number to the same phone number in a short "
        "period of time.",
    ),
}

_SEND_PATH = re.compile(r"^/(v\d+\.\d+)/([^/]+)/messages$")
_ids = itertools.count(1)


def new_wamid() -> str:
    """A unique message id in Meta's `wamid.` form."""
    return f"wamid.HBgL{next(_ids):012d}{time.monotonic_ns() % 10**9:09d}FQIAERgS"


def graph_error(
    code: int, *, message: str | None = None, details: str | None = None
) -> dict[str, Any]:
    """The Graph API's error JSON for `code` (message and details from `ERRORS` unless given)."""
    _, title, default_details = ERRORS.get(code, (400, "Unknown error", "Unknown error."))
    return {
        "error": {
            "message": f"(#{code}) {message or title}",
            "type": "OAuthException",
            "code": code,
            "error_data": {"messaging_product": "whatsapp", "details": details or default_details},
            "fbtrace_id": f"A{next(_ids):010d}trace",
        }
    }


@dataclass(frozen=True)
class Reply:
    """One scripted answer: `status` and `body` (None = the default success), after `delay` s."""

    status: int = 200
    body: dict[str, Any] | bytes | None = None
    delay: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)


def ok() -> Reply:
    return Reply()


def error(code: int, *, status: int | None = None, details: str | None = None) -> Reply:
    """Meta's error answer for `code`, with the HTTP status Meta uses unless `status` is given."""
    http_status = status if status is not None else ERRORS.get(code, (400, "", ""))[0]
    headers = (
        {"WWW-Authenticate": 'OAuth "Facebook Platform" "invalid_token"'} if code == 190 else {}
    )
    return Reply(http_status, graph_error(code, details=details), headers=headers)


def rate_limited() -> Reply:
    return error(130429)


def server_error(status: int = 500) -> Reply:
    return Reply(
        status,
        {
            "error": {
                "message": "An unknown error has occurred.",
                "type": "OAuthException",
                "code": 1,
                "error_subcode": 99,
                "fbtrace_id": f"A{next(_ids):010d}trace",
            }
        },
    )


def slow(seconds: float, then: Reply | None = None) -> Reply:
    """`then` (default: success), answered after `seconds`: for client timeouts."""
    base = then or ok()
    return Reply(base.status, base.body, seconds, base.headers)


@dataclass(frozen=True)
class GraphRequest:
    method: str
    path: str
    headers: dict[str, str]  # names lower-cased
    raw: bytes
    body: Any  # the decoded JSON, or None if the body was not JSON
    time: float  # time.monotonic() on arrival
    status: int = 0  # what the fake answered
    answer: Any = None

    @property
    def to(self) -> str | None:
        return self.body.get("to") if isinstance(self.body, dict) else None


class FakeGraph:
    """The Graph API's send endpoint, scripted; a context manager that always shuts down."""

    def __init__(
        self,
        *,
        phone_number_id: str = DEFAULT_PHONE_NUMBER_ID,
        token: str = DEFAULT_TOKEN,
    ) -> None:
        self.phone_number_id = phone_number_id
        self.token = token
        self.requests: list[GraphRequest] = []
        self._script: list[Reply] = []
        self._by_recipient: dict[str, list[Reply]] = {}
        self._lock = threading.Lock()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:
                fake._handle(self, "POST")

            def do_GET(self) -> None:
                fake._handle(self, "GET")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"  # WHATSAPP_CLOUD_API_URL
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    # -- scripting ------------------------------------------------------------------------
    def script(self, *replies: Reply) -> None:
        """Answer the next sends with `replies`, in order (after per-recipient scripts)."""
        with self._lock:
            self._script.extend(replies)

    def script_for(self, recipient: str, *replies: Reply) -> None:
        """Answer the next sends to `recipient` with `replies`, in order."""
        with self._lock:
            self._by_recipient.setdefault(recipient, []).extend(replies)

    def sends(self) -> list[GraphRequest]:
        """The accepted (200) send requests, in arrival order."""
        with self._lock:
            return [r for r in self.requests if r.status == 200]

    # -- serving --------------------------------------------------------------------------
    def _next_reply(self, recipient: str | None) -> Reply:
        with self._lock:
            queue = self._by_recipient.get(recipient or "")
            if queue:
                return queue.pop(0)
            return self._script.pop(0) if self._script else ok()

    def _answer(self, method: str, path: str, headers: dict[str, str], body: Any) -> Reply:
        match = _SEND_PATH.match(urllib.parse.urlsplit(path).path)
        if method != "POST" or match is None:
            return Reply(400, graph_error(100, message="Unknown path components"))
        if headers.get("authorization") != f"Bearer {self.token}":
            return error(190)
        if match.group(2) != self.phone_number_id:
            return Reply(400, graph_error(100, details=f"Unknown phone number id {match.group(2)}"))
        if not isinstance(body, dict) or body.get("messaging_product") != "whatsapp":
            return Reply(400, graph_error(100, details="messaging_product must be whatsapp"))
        return self._next_reply(body.get("to"))

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        arrived = time.monotonic()
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        try:
            body: Any = json.loads(raw) if raw else None
        except ValueError:
            body = None
        reply = self._answer(method, handler.path, headers, body)
        answer: Any = reply.body
        if reply.status == 200 and answer is None:
            to = body.get("to", "") if isinstance(body, dict) else ""
            answer = {
                "messaging_product": "whatsapp",
                "contacts": [{"input": to, "wa_id": to.lstrip("+")}],
                "messages": [{"id": new_wamid()}],
            }
        with self._lock:
            self.requests.append(
                GraphRequest(
                    method, handler.path, headers, raw, body, arrived, reply.status, answer
                )
            )
        if reply.delay:
            time.sleep(reply.delay)  # a slow Graph API: the client's timeout is under test
        data = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
        try:
            handler.send_response(reply.status)
            handler.send_header("Content-Type", "application/json; charset=UTF-8")
            handler.send_header("Content-Length", str(len(data)))
            for name, value in reply.headers.items():
                handler.send_header(name, value)
            handler.end_headers()
            handler.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client gave up (timed out): what a slow reply is for

    def __enter__(self) -> FakeGraph:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


# -- HTTP from tests ----------------------------------------------------------------------
@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def http_request(
    url: str,
    method: str = "GET",
    body: bytes | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30.0,
) -> Response:
    """One blocking HTTP/1.1 request over loopback (stdlib only)."""
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=timeout)
    try:
        target = parts.path + (f"?{parts.query}" if parts.query else "")
        conn.request(method, target or "/", body=body, headers=headers or {})
        resp = conn.getresponse()
        return Response(resp.status, resp.read(), {k.lower(): v for k, v in resp.getheaders()})
    finally:
        conn.close()


def sign(app_secret: str, raw: bytes) -> str:
    """The `X-Hub-Signature-256` value Meta sends for `raw`."""
    return "sha256=" + hmac.new(app_secret.encode(), raw, hashlib.sha256).hexdigest()


class WebhookClient:
    """Meta's webhook delivery against `<base_url>/webhooks/whatsapp/<account>`."""

    def __init__(self, base_url: str, app_secret: str, *, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.app_secret = app_secret
        self.timeout = timeout

    def url(self, account: str) -> str:
        return f"{self.base_url}/webhooks/whatsapp/{urllib.parse.quote(account, safe='')}"

    async def post(
        self,
        account: str,
        body: dict[str, Any] | bytes,
        *,
        sign: bool = True,
        signature: str | None = None,
    ) -> Response:
        """POST `body` (a dict is JSON-encoded once; bytes go as is), signed over those exact
        bytes unless `sign=False`; `signature` sends that header value instead."""
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if signature is not None:
            headers["X-Hub-Signature-256"] = signature
        elif sign:
            headers["X-Hub-Signature-256"] = _sign(self.app_secret, raw)
        return await asyncio.to_thread(
            http_request, self.url(account), "POST", raw, headers, self.timeout
        )

    async def verify(self, account: str, mode: str, token: str, challenge: str) -> Response:
        """The subscription handshake: GET `?hub.mode=&hub.verify_token=&hub.challenge=`."""
        query = urllib.parse.urlencode(
            {"hub.mode": mode, "hub.verify_token": token, "hub.challenge": challenge}
        )
        return await asyncio.to_thread(
            http_request, f"{self.url(account)}?{query}", "GET", None, None, self.timeout
        )


_sign = sign  # `post`'s keyword `sign` shadows the function inside it


# -- webhook bodies -----------------------------------------------------------------------
def _envelope(phone_number_id: str, value: dict[str, Any]) -> dict[str, Any]:
    return {
        "object": "whatsapp_business_account",
        "entry": [
            {
                "id": DEFAULT_WABA_ID,
                "changes": [
                    {
                        "value": {
                            "messaging_product": "whatsapp",
                            "metadata": {
                                "display_phone_number": DEFAULT_DISPLAY_NUMBER,
                                "phone_number_id": phone_number_id,
                            },
                            **value,
                        },
                        "field": "messages",
                    }
                ],
            }
        ],
    }


def message_body(
    phone_number_id: str,
    wamid: str,
    from_: str,
    text: str,
    *,
    context_id: str | None = None,
    name: str = "Test User",
    timestamp: int = 1_700_000_000,
) -> dict[str, Any]:
    """A user's text message (a reply to `context_id` if given), as Meta delivers it."""
    message: dict[str, Any] = {
        "from": from_,
        "id": wamid,
        "timestamp": str(timestamp),
        "type": "text",
        "text": {"body": text},
    }
    if context_id is not None:
        message["context"] = {"from": DEFAULT_DISPLAY_NUMBER, "id": context_id}
    return _envelope(
        phone_number_id,
        {"contacts": [{"profile": {"name": name}, "wa_id": from_}], "messages": [message]},
    )


def status_error(code: int, *, details: str | None = None) -> dict[str, Any]:
    """One `errors[]` entry of a `failed` status."""
    _, title, default_details = ERRORS.get(code, (400, "Unknown error", "Unknown error."))
    return {
        "code": code,
        "title": title,
        "message": title,
        "error_data": {"details": details or default_details},
        "href": "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/",
    }


def status_body(
    phone_number_id: str,
    wamid: str,
    status: str,
    *,
    job_id: str | None = None,
    errors: list[dict[str, Any]] | None = None,
    timestamp: int = 1_700_000_100,
    recipient_id: str = "15550002222",
) -> dict[str, Any]:
    """A status (`sent|delivered|read|failed`) of our message `wamid`; `job_id` is echoed as
    `biz_opaque_callback_data`, `errors` (see `status_error`) go with `failed`."""
    entry: dict[str, Any] = {
        "id": wamid,
        "status": status,
        "timestamp": str(timestamp),
        "recipient_id": recipient_id,
    }
    if job_id is not None:
        entry["biz_opaque_callback_data"] = job_id
    if status != "failed":
        entry["conversation"] = {
            "id": "7270432eae37498234f4444b35ffc5",
            "origin": {"type": "service"},
        }
        entry["pricing"] = {"billable": True, "pricing_model": "CBP", "category": "service"}
    if errors is not None:
        entry["errors"] = errors
    return _envelope(phone_number_id, {"statuses": [entry]})
