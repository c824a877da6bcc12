"""The Cloud API test helpers themselves: the fake Graph API records and answers as scripted,
checks the bearer token; the webhook client signs the exact raw bytes; the body builders
produce the JSON Meta sends."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from tests.whatsapp.fake_graph import (
    DEFAULT_PHONE_NUMBER_ID,
    DEFAULT_TOKEN,
    FakeGraph,
    Response,
    WebhookClient,
    error,
    http_request,
    message_body,
    ok,
    rate_limited,
    server_error,
    slow,
    status_body,
    status_error,
)

SECRET = "app-secret-not-a-secret"


def send(
    graph: FakeGraph,
    to: str,
    text: str = "hi",
    *,
    token: str = DEFAULT_TOKEN,
    phone_number_id: str = DEFAULT_PHONE_NUMBER_ID,
    timeout: float = 30.0,
    **extra: Any,
) -> Response:
    body = {
        "messaging_product": "whatsapp",
        "to": to,
        "type": "text",
        "text": {"body": text},
        **extra,
    }
    return http_request(
        f"{graph.url}/v21.0/{phone_number_id}/messages",
        "POST",
        json.dumps(body).encode(),
        {"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
        timeout,
    )


def test_a_send_is_recorded_and_answered_with_a_fresh_wamid() -> None:
    with FakeGraph() as graph:
        first = send(graph, "15550002222", "hello", context={"message_id": "wamid.in1"})
        second = send(graph, "15550002222", "again", biz_opaque_callback_data="job-7")
    assert (first.status, second.status) == (200, 200)
    answer = first.json()
    assert answer["messaging_product"] == "whatsapp"
    assert answer["contacts"] == [{"input": "15550002222", "wa_id": "15550002222"}]
    ids = [r.json()["messages"][0]["id"] for r in (first, second)]
    assert all(i.startswith("wamid.") for i in ids)
    assert len(set(ids)) == 2
    one, two = graph.requests
    assert one.path == f"/v21.0/{DEFAULT_PHONE_NUMBER_ID}/messages"
    assert one.headers["authorization"] == f"Bearer {DEFAULT_TOKEN}"
    assert one.body["text"] == {"body": "hello"}
    assert one.body["context"] == {"message_id": "wamid.in1"}
    assert two.body["biz_opaque_callback_data"] == "job-7"
    assert one.time <= two.time
    assert (one.answer, two.status) == (answer, 200)
    assert [r.body["text"]["body"] for r in graph.sends()] == ["hello", "again"]


@pytest.mark.parametrize(
    ("code", "status"),
    [(131047, 400), (130429, 429), (131056, 400), (131026, 400), (368, 403), (80007, 400)],
)
def test_a_scripted_error_has_metas_shape_and_status(code: int, status: int) -> None:
    with FakeGraph() as graph:
        graph.script(error(code))
        failed = send(graph, "15550002222")
        after = send(graph, "15550002222")
    assert failed.status == status
    err = failed.json()["error"]
    assert err["code"] == code
    assert err["type"] == "OAuthException"
    assert err["message"].startswith(f"(#{code}) ")
    assert err["error_data"]["details"]
    assert err["fbtrace_id"]
    # the script is used up: the next send succeeds
    assert after.status == 200
    assert [r.status for r in graph.requests] == [status, 200]
    assert len(graph.sends()) == 1


def test_429_then_success_and_5xx_in_order() -> None:
    with FakeGraph() as graph:
        graph.script(rate_limited(), server_error(503), ok())
        statuses = [send(graph, "15550002222").status for _ in range(4)]
    assert statuses == [429, 503, 200, 200]
    assert graph.requests[1].answer["error"]["code"] == 1


def test_a_per_recipient_script_applies_to_that_recipient_only() -> None:
    with FakeGraph() as graph:
        graph.script_for("15550003333", error(131047), error(131026))
        graph.script(server_error(502))
        a = send(graph, "15550003333")
        b = send(graph, "15550002222")
        c = send(graph, "15550003333")
        d = send(graph, "15550003333")
    assert [a.json()["error"]["code"], b.status, c.json()["error"]["code"], d.status] == [
        131047,
        502,
        131026,
        200,
    ]


@pytest.mark.parametrize("token", ["wrong-token", ""])
def test_a_wrong_token_is_401_code_190_and_uses_no_script(token: str) -> None:
    with FakeGraph() as graph:
        graph.script(error(131047))
        refused = send(graph, "15550002222", token=token)
        scripted = send(graph, "15550002222")
    assert refused.status == 401
    assert refused.json()["error"]["code"] == 190
    assert "www-authenticate" in refused.headers
    assert scripted.json()["error"]["code"] == 131047
    assert graph.sends() == []


def test_an_unknown_phone_number_id_or_path_is_refused() -> None:
    with FakeGraph() as graph:
        other = send(graph, "15550002222", phone_number_id="999")
        path = http_request(f"{graph.url}/v21.0/{DEFAULT_PHONE_NUMBER_ID}/media", "POST", b"{}")
    assert (other.status, other.json()["error"]["code"]) == (400, 100)
    assert (path.status, path.json()["error"]["code"]) == (400, 100)


def test_a_slow_answer_times_the_client_out_and_the_fake_keeps_serving() -> None:
    with FakeGraph() as graph:
        graph.script(slow(3.0))
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            send(graph, "15550002222", timeout=0.5)
        waited = time.monotonic() - started
        # the slow request was recorded (the message "went out": an uncertain send)
        assert len(graph.requests) == 1
        assert send(graph, "15550002222").status == 200
    # generous bound: the client gave up at its timeout, not at the fake's 3 s
    assert waited < 2.5


def test_the_fake_shuts_down_on_exit_even_after_an_exception() -> None:
    graph = FakeGraph()
    with pytest.raises(RuntimeError), graph:
        raise RuntimeError("boom")
    assert not graph.thread.is_alive()
    with pytest.raises(ConnectionRefusedError):
        send(graph, "15550002222", timeout=2)


class Receiver:
    """A stand-in webhook endpoint: records each request's raw bytes and headers."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, bytes, dict[str, str]]] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def _record(self, method: str) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                receiver.seen.append(
                    (method, self.path, raw, {k.lower(): v for k, v in self.headers.items()})
                )
                query = urllib.parse.parse_qs(urllib.parse.urlsplit(self.path).query)
                data = query.get("hub.challenge", ["ok"])[0].encode()
                self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                self._record("POST")

            def do_GET(self) -> None:
                self._record("GET")

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def verifies(raw: bytes, header: str | None) -> bool:
    expected = "sha256=" + hmac.new(SECRET.encode(), raw, hashlib.sha256).hexdigest()
    return header is not None and hmac.compare_digest(expected, header)


async def test_the_webhook_client_signs_the_exact_raw_bytes() -> None:
    odd = b'{"object":  "whatsapp_business_account", "entry": [] }'  # not re-serialized
    with Receiver() as receiver:
        client = WebhookClient(receiver.url, SECRET)
        body = message_body(DEFAULT_PHONE_NUMBER_ID, "wamid.in1", "15550002222", "héllo")
        answers = await asyncio.gather(
            client.post("acct one", body),
            client.post("acct", odd),
        )
    assert [a.status for a in answers] == [200, 200]
    by_raw = {raw: (path, headers) for _, path, raw, headers in receiver.seen}
    assert set(by_raw) == {json.dumps(body).encode(), odd}
    for raw, (_, headers) in by_raw.items():
        assert verifies(raw, headers["x-hub-signature-256"])
        assert headers["content-type"] == "application/json"
    assert by_raw[odd][0] == "/webhooks/whatsapp/acct"
    assert by_raw[json.dumps(body).encode()][0] == "/webhooks/whatsapp/acct%20one"
    # one changed byte no longer verifies
    assert not verifies(odd.replace(b"[]", b"[ ]"), by_raw[odd][1]["x-hub-signature-256"])


async def test_the_webhook_client_can_send_unsigned_or_badly_signed() -> None:
    with Receiver() as receiver:
        client = WebhookClient(receiver.url, SECRET)
        await client.post("acct", b"{}", sign=False)
        await client.post("acct", b"{}", signature="sha256=" + "0" * 64)
        await WebhookClient(receiver.url, "another-secret").post("acct", b"{}")
    unsigned, forged, wrong_secret = (headers for *_, headers in receiver.seen)
    assert "x-hub-signature-256" not in unsigned
    assert forged["x-hub-signature-256"] == "sha256=" + "0" * 64
    assert not verifies(b"{}", forged["x-hub-signature-256"])
    assert not verifies(b"{}", wrong_secret["x-hub-signature-256"])


async def test_the_verify_handshake_sends_metas_query() -> None:
    with Receiver() as receiver:
        answer = await WebhookClient(receiver.url, SECRET).verify(
            "acct", "subscribe", "verify me&=", "1158201444"
        )
    assert (answer.status, answer.body) == (200, b"1158201444")
    ((method, path, raw, _),) = receiver.seen
    assert (method, raw) == ("GET", b"")
    split = urllib.parse.urlsplit(path)
    assert split.path == "/webhooks/whatsapp/acct"
    assert urllib.parse.parse_qs(split.query) == {
        "hub.mode": ["subscribe"],
        "hub.verify_token": ["verify me&="],
        "hub.challenge": ["1158201444"],
    }


def test_a_message_body_has_metas_shape_and_round_trips() -> None:
    body = message_body(
        "123", "wamid.in2", "15550002222", "a reply", context_id="wamid.out1", name="Ann"
    )
    assert json.loads(json.dumps(body)) == body
    assert body["object"] == "whatsapp_business_account"
    (entry,) = body["entry"]
    (change,) = entry["changes"]
    assert change["field"] == "messages"
    value = change["value"]
    assert value["messaging_product"] == "whatsapp"
    assert value["metadata"]["phone_number_id"] == "123"
    assert value["contacts"] == [{"profile": {"name": "Ann"}, "wa_id": "15550002222"}]
    (message,) = value["messages"]
    assert message["from"] == "15550002222"
    assert message["id"] == "wamid.in2"
    assert (message["type"], message["text"]) == ("text", {"body": "a reply"})
    assert message["context"]["id"] == "wamid.out1"
    assert isinstance(message["timestamp"], str)
    plain = message_body("123", "w", "1", "t")["entry"][0]["changes"][0]["value"]["messages"][0]
    assert "context" not in plain


def test_a_status_body_has_metas_shape_and_round_trips() -> None:
    delivered = status_body("123", "wamid.out1", "delivered", job_id="job-1", timestamp=5)
    failed = status_body("123", "wamid.out2", "failed", errors=[status_error(131047)])
    for body in (delivered, failed):
        assert json.loads(json.dumps(body)) == body
        assert body["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"] == "123"
    (ok_status,) = delivered["entry"][0]["changes"][0]["value"]["statuses"]
    assert ok_status["id"] == "wamid.out1"
    assert ok_status["status"] == "delivered"
    assert ok_status["timestamp"] == "5"
    assert ok_status["biz_opaque_callback_data"] == "job-1"
    assert ok_status["recipient_id"]
    assert "errors" not in ok_status
    (bad,) = failed["entry"][0]["changes"][0]["value"]["statuses"]
    assert "biz_opaque_callback_data" not in bad
    (err,) = bad["errors"]
    assert err["code"] == 131047
    assert err["title"]
    assert err["error_data"]["details"]
