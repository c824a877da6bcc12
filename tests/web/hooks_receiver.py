"""A real HTTP receiver for webhook tests: plain asyncio on 127.0.0.1, keep-alive, records
every request and answers as scripted (a status per request, or a pause first)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Request:
    """One request as received: method, path, headers (lower-case names), raw body."""

    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def signed_with(self, secret: str) -> bool:
        """What a receiver does: HMAC-SHA256 of the raw body, compared in constant time."""
        expected = "sha256=" + hmac.new(secret.encode(), self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(expected, self.headers.get("x-switchboard-signature-256", ""))


@dataclass
class Receiver:
    """`answer(n)` is the status of the n-th request (0-based); `pause` s before answering."""

    answer: Callable[[int], int] = lambda _n: 200
    pause: float = 0.0
    requests: list[Request] = field(default_factory=list)
    url: str = ""
    writers: set[asyncio.StreamWriter] = field(default_factory=set)

    @property
    def deliveries(self) -> set[str]:
        return {r.headers.get("x-switchboard-delivery", "") for r in self.requests}

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        try:
            while True:
                line = await reader.readline()
                if not line:
                    return
                method, path, _ = line.decode().split(" ", 2)
                headers: dict[str, str] = {}
                while (raw := await reader.readline()) not in (b"\r\n", b"\n", b""):
                    name, _, value = raw.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                n = len(self.requests)
                self.requests.append(Request(method, path, headers, body))
                if self.pause:
                    await asyncio.sleep(self.pause)  # the scripted slow receiver
                status = self.answer(n)
                writer.write(f"HTTP/1.1 {status} Scripted\r\nContent-Length: 0\r\n\r\n".encode())
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            return
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@asynccontextmanager
async def receiving(
    answer: Callable[[int], int] = lambda _n: 200,
    *,
    pause: float = 0.0,
    tls: ssl.SSLContext | None = None,
) -> AsyncIterator[Receiver]:
    """A receiver on a free port of 127.0.0.1 for the block (HTTPS with `tls`)."""
    receiver = Receiver(answer=answer, pause=pause)
    server = await asyncio.start_server(receiver._serve, "127.0.0.1", 0, ssl=tls)
    port = server.sockets[0].getsockname()[1]
    receiver.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}/hook"
    try:
        yield receiver
    finally:
        server.close()
        for writer in list(receiver.writers):  # keep-alive connections of the client
            writer.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(server.wait_closed(), 2)
