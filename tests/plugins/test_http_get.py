"""http_get cannot be steered to internal addresses (issue 11, item 4): redirects are
re-checked, the connection goes to the address that was checked (no DNS rebinding), and
every non-public range is refused. No internet: local HTTP servers on loopback play the
allowlisted host, and a stand-in resolver answers for the names."""

from __future__ import annotations

import ipaddress
import re
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from services.plugins.base import ToolContext, ToolError
from services.plugins.builtin import HttpConfig, check_url, fetch_url, http_get

CTX = ToolContext("whatsapp", "acct", "c@s.whatsapp.net")


class Site:
    """A local HTTP server: `answer(path) -> (status, headers, body)`; counts hits."""

    def __init__(self, answer: Callable[[str], tuple[int, dict[str, str], bytes]]) -> None:
        self.hits: list[str] = []
        site = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                site.hits.append(self.path)
                status, headers, body = answer(self.path)
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.handler = Handler

    @contextmanager
    def serve(self, host: str = "127.0.0.1", port: int = 0) -> Iterator[int]:
        server = ThreadingHTTPServer((host, port), self.handler)
        thread = threading.Thread(target=server.serve_forever, daemon=True)
        thread.start()
        try:
            yield server.server_address[1]
        finally:
            server.shutdown()
            server.server_close()
            thread.join(5)


def secret() -> Site:
    return Site(lambda path: (200, {}, b"INTERNAL SECRET"))


@pytest.fixture
def names(monkeypatch: pytest.MonkeyPatch) -> dict[str, list[str]]:
    """Stand-in DNS for the whole process (the tool's resolver and urllib's alike): a
    name maps to the answers given in turn (the last one repeats); IP literals resolve as
    usual. Lookups are recorded under `_asked`."""
    answers: dict[str, list[str]] = {"_asked": []}
    real = socket.getaddrinfo

    def getaddrinfo(host: Any, port: Any, *args: Any, **kwargs: Any) -> Any:
        name = host.decode() if isinstance(host, bytes) else str(host)
        if name in answers:
            answers["_asked"].append(name)
            queue = answers[name]
            address = queue.pop(0) if len(queue) > 1 else queue[0]
            return real(address, port, *args, **kwargs)
        return real(host, port, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)
    for name in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.delenv(name, raising=False)
    return answers


async def test_a_redirect_to_an_internal_address_is_refused_and_never_reached(
    names: dict[str, list[str]],
) -> None:
    internal = secret()
    with internal.serve() as internal_port:
        # Given an allowlisted host (played on loopback: allow_private is the test's way
        # in for the first hop) that redirects to an internal address
        target = f"http://127.0.0.1:{internal_port}/admin"
        public = Site(lambda path: (302, {"Location": target}, b""))
        with public.serve() as port:
            names["allowed.test"] = ["127.0.0.1"]
            config = {"allowlist": ["allowed.test"], "allow_private": True, "timeout_s": 2}
            # When the model fetches it
            with pytest.raises(ToolError, match=r"refused: 127\.0\.0\.1 is not in the"):
                await http_get.call("fetch", {"url": f"http://allowed.test:{port}/"}, config, CTX)
    # Then the redirect was refused and the internal server never saw a request
    assert public.hits == ["/"]
    assert internal.hits == []


async def test_a_redirect_to_a_metadata_address_is_refused_even_with_allow_private(
    names: dict[str, list[str]],
) -> None:
    public = Site(lambda path: (307, {"Location": "http://meta.test/latest/"}, b""))
    with public.serve() as port:
        names["allowed.test"] = ["127.0.0.1"]
        names["meta.test"] = ["169.254.169.254"]
        config = HttpConfig(allowlist=["*.test"], allow_private=True, timeout_s=1)
        with pytest.raises(ToolError, match=r"169\.254\.169\.254, a cloud metadata address"):
            fetch_url(f"http://allowed.test:{port}/", config)
    assert public.hits == ["/"]


async def test_dns_rebinding_cannot_move_the_connection_to_another_address(
    names: dict[str, list[str]],
) -> None:
    # Given a name that resolves to the "public" server when checked, and to the internal
    # one on any later lookup (both on the same port, on two loopback addresses)
    public = Site(lambda path: (200, {}, b"public page"))
    internal = secret()
    with public.serve("127.0.0.2") as port, internal.serve("127.0.0.1", port):
        names["rebind.test"] = ["127.0.0.2", "127.0.0.1"]
        config = {"allowlist": ["rebind.test"], "allow_private": True, "timeout_s": 2}
        # When it is fetched
        text = await http_get.call("fetch", {"url": f"http://rebind.test:{port}/"}, config, CTX)
    # Then the connection went to the address that was checked, looked up once
    assert text == "public page"
    assert public.hits == ["/"]
    assert internal.hits == []
    assert names["_asked"] == ["rebind.test"]


async def test_redirects_within_the_allowlist_are_followed_up_to_a_limit() -> None:
    def answer(path: str) -> tuple[int, dict[str, str], bytes]:
        if path == "/final":
            return 200, {}, b"arrived"
        if path == "/loop":
            return 302, {"Location": "/loop"}, b""
        return 301, {"Location": "/final"}, b""

    site = Site(answer)
    loopback = lambda host, port: ["127.0.0.1"]  # noqa: E731 - a stand-in resolver
    config = HttpConfig(allowlist=["site.test"], allow_private=True, timeout_s=2)
    with site.serve() as port:
        assert fetch_url(f"http://site.test:{port}/start", config, loopback) == "arrived"
        with pytest.raises(ToolError, match="more than 3 redirects"):
            fetch_url(f"http://site.test:{port}/loop", config, loopback)
    assert site.hits == ["/start", "/final", *["/loop"] * 4]


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",  # carrier-grade NAT
        "100.100.100.200",  # a cloud metadata address inside it
        "192.0.0.1",
        "192.0.0.9",  # global in Python's table, still IETF protocol assignments
        "224.0.0.1",
        "239.255.255.250",
        "0.0.0.0",
        "240.0.0.1",
        "255.255.255.255",
        "198.18.0.1",
        "168.63.129.16",  # Azure's wire server: a public address, refused by name
        "::",
        "::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::ffff:100.64.0.1",
        "64:ff9b::7f00:1",  # NAT64 of 127.0.0.1
        "2002:7f00:1::",  # 6to4 of 127.0.0.1
        "fe80::1",
        "fec0::1",  # site-local
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
    ],
)
def test_every_non_public_address_is_refused(address: str) -> None:
    config = HttpConfig(allowlist=["*"])
    shown = re.escape(f"refused: host.test resolves to {ipaddress.ip_address(address)}, ")
    with pytest.raises(ToolError, match=shown):
        check_url("http://host.test/", config, lambda host, port: [address])


@pytest.mark.parametrize(
    "address",
    [
        "169.254.169.254",
        "::ffff:169.254.169.254",
        "100.100.100.200",
        "fd00:ec2::254",
        "0.0.0.0",
        "::",
        "224.0.0.251",
        "ff02::1",
        "192.0.0.170",
        "fec0::1",
    ],
)
def test_metadata_multicast_and_unspecified_are_refused_even_with_allow_private(
    address: str,
) -> None:
    config = HttpConfig(allowlist=["*"], allow_private=True)
    with pytest.raises(ToolError, match="refused"):
        check_url("http://host.test/", config, lambda host, port: [address])


def test_a_public_address_passes_and_one_bad_address_refuses_the_host() -> None:
    config = HttpConfig(allowlist=["*.test"])
    target = check_url("https://ok.test/a?b=1", config, lambda host, port: ["93.184.216.34"])
    assert (target.host, target.port, target.address, target.path) == (
        "ok.test",
        443,
        "93.184.216.34",
        "/a?b=1",
    )
    both = lambda host, port: ["93.184.216.34", "10.0.0.1"]  # noqa: E731
    with pytest.raises(ToolError, match=r"10\.0\.0\.1, a private or loopback address"):
        check_url("http://mixed.test/", config, both)


def test_a_host_off_the_allowlist_is_refused_without_a_lookup() -> None:
    def no_lookups(host: str, port: int) -> list[str]:
        raise AssertionError(f"looked up {host}")

    with pytest.raises(ToolError, match="not in the http_get allowlist"):
        check_url("http://elsewhere.example/", HttpConfig(allowlist=["*.test"]), no_lookups)
