"""Pairing from the console (issue 18 item 3), through real processes: `svc run web` asks a
real `svc run whatsapp` (neonize transport, its Go bridge swapped for the fake pairing
source tests/web/fake_pairing.py) to pair; the codes come back in order over core NATS,
the outcome is recorded with who asked, and no QR code reaches a log or a stream."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from contracts.events import PairingFinished, PairingStarted
from services.channel.devices import DeviceRegistry
from services.runtime.bus import Bus
from services.runtime.lease import Lease
from services.runtime.nats_server import EmbeddedNats
from services.runtime.settings import SessionStore
from services.whatsapp.neonize_store import devices_in_store
from tests.conftest import Processes, read_stream, run_svc, stream_raw, wait_until
from tests.e2e.test_least_privilege import (  # the shipped config's fixtures
    SecuredServer,
    operator,  # noqa: F401
    secured,  # noqa: F401
)
from tests.web.conftest import (
    Web,
    add_token,
    add_user,
    bearer,
    json_of,
    login,
    start_web,
)
from tests.web.fake_pairing import CODE, DEVICE, scan_subject

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ACCOUNT = "sales"
START = f"/api/v1/accounts/{ACCOUNT}/pair"
MASKED = "1555…01:7@s.whatsapp.net"


async def start_worker(processes: Processes, nats_url: str, tmp_path: Path, **env: str) -> Any:
    """A real `svc run whatsapp` on the neonize transport with the fake pairing source. It
    owns another account (`spare`, unpaired: parked), so the pairing is all it does."""
    store = SessionStore(path=tmp_path / "whatsapp.sqlite")
    await devices_in_store(store)  # the tables exist, as after any open
    proc = processes.start(
        "run",
        "whatsapp",
        NATS_URL=nats_url,
        WHATSAPP_TRANSPORT="neonize",
        WHATSAPP_ACCOUNT_ID="spare",
        WHATSAPP_STORE=str(store.path),
        SVC_TEST_NEONIZE_BRIDGE="tests.web.fake_pairing:install",
        PYTHONPATH=str(REPO),  # `tests.` is this checkout's, never an installed package
        SVC_LOG_FORMAT="json",
        **env,
    )

    def running() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"svc run whatsapp exited {proc.returncode}: {processes.log(proc)}")
        return '"running"' in processes.log(proc)

    await wait_until(running, 60, "svc run whatsapp running")
    return proc


async def state_of(client: httpx.AsyncClient, url: str, headers: dict[str, str]) -> Any:
    answer = await client.get(url, headers=headers)
    assert answer.status_code == 200, answer.text
    return json_of(answer)


async def wait_state(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], what: str, **expected: Any
) -> Any:
    """Poll the attempt's state until it has the `expected` values; that state."""
    seen: list[Any] = []

    async def reached() -> bool:
        seen.append(await state_of(client, url, headers))
        return all(seen[-1][k] == v for k, v in expected.items())

    await wait_until(reached, 60, what)
    return seen[-1]


def every_log(processes: Processes) -> str:
    return "".join(processes.log(proc) for proc in processes.procs)


async def every_stream(bus: Bus) -> bytes:
    """Every stored message of every stream (subjects, headers, data), as one blob."""
    blob = b""
    async for info in _streams(bus):
        for subject, data, headers in await stream_raw(bus, info):
            blob += subject.encode() + json.dumps(headers).encode() + data
    return blob


async def _streams(bus: Bus) -> Any:
    for info in await bus.js.streams_info():
        yield info.config.name


async def test_pairing_through_the_api_shows_each_code_in_order_and_records_who_paired(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, tmp_path: Path
) -> None:
    # Given an operator, the web role and a whatsapp worker with the fake pairing source
    await add_user(bus, "olivia", "operator")
    await start_worker(processes, nats_server.url, tmp_path)
    web = await start_web(processes, nats_server.url)
    session = await login(web, "olivia")
    async with web.client() as client:
        # When she starts pairing through the API
        started = await client.post(START, json={}, headers=session.headers())
        assert started.status_code == 202, started.text
        attempt = json_of(started)["attempt"]
        url = json_of(started)["state"]
        assert url == f"{START}/{attempt}"
        # Then the first QR code arrives, then the second (the rotation), in order
        first = await wait_state(client, url, session.headers(), "QR 1", phase="qr", qr_number=1)
        assert first["qr"].startswith("2@fake-pairing-qr-1-")
        assert not first["done"]
        await bus.nc.publish(scan_subject(ACCOUNT), b"")
        second = await wait_state(client, url, session.headers(), "QR 2", phase="qr", qr_number=2)
        assert second["qr"].startswith("2@fake-pairing-qr-2-")
        assert second["seq"] > first["seq"]
        # And when the phone confirms, the outcome is one masked line
        await bus.nc.publish(scan_subject(ACCOUNT), b"")
        done = await wait_state(client, url, session.headers(), "paired", phase="paired")
        assert done["done"]
        assert done["line"] == f"{ACCOUNT}: paired as {MASKED}"
        assert done["qr"] == ""
    # And the device is recorded for every host, by her
    record = await DeviceRegistry(bus, "whatsapp").get(ACCOUNT)
    assert record is not None
    assert (record.device_id, record.paired_by) == (DEVICE, "olivia")
    # And the start and the outcome are events naming who, through what, from where
    events = [e for _, e in await read_stream(bus, "ACCOUNTS", f"accounts.whatsapp.{ACCOUNT}")]
    (start,) = [e for e in events if isinstance(e, PairingStarted)]
    (end,) = [e for e in events if isinstance(e, PairingFinished)]
    assert (start.attempt, start.actor, start.via, start.client) == (
        attempt,
        "olivia",
        "api",
        "127.0.0.1",
    )
    assert not start.by_code
    assert (end.attempt, end.outcome, end.device) == (attempt, "paired", MASKED)
    assert end.actor == "olivia"
    # And no QR code reached a log line or a stream
    codes = [first["qr"], second["qr"]]
    logs = every_log(processes)
    stored = await every_stream(bus)
    for code in codes:
        assert code not in logs
        assert code.encode() not in stored
    assert "fake-pairing-qr" not in logs
    assert b"fake-pairing-qr" not in stored


async def test_pairing_by_phone_number_shows_the_pairing_code_instead_of_a_qr(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, tmp_path: Path
) -> None:
    await add_user(bus, "olivia", "operator")
    await start_worker(processes, nats_server.url, tmp_path)
    web = await start_web(processes, nats_server.url)
    session = await login(web, "olivia")
    async with web.client() as client:
        # When she pairs by phone number through the form
        form = await client.post(
            f"/accounts/{ACCOUNT}/pair",
            data={"csrf": session.csrf, "phone": "+1 555 000 0001"},
            headers={"Cookie": session.headers()["Cookie"]},
        )
        assert form.status_code == 303, form.text
        attempt = form.headers["location"].rpartition("attempt=")[2]
        url = f"{START}/{attempt}"
        # Then the pairing code is shown (never a QR), on the API and on the page
        shown = await wait_state(client, url, session.headers(), "the code", phase="code")
        assert (shown["code"], shown["qr"]) == (CODE, "")
        view = await client.get(
            f"/accounts/{ACCOUNT}/pair/{attempt}/view", headers=session.headers()
        )
        assert view.status_code == 200, view.text
        assert CODE in view.text
        assert "<svg" not in view.text
        assert view.headers["x-pairing-done"] == "0"
        # And once the phone confirms (whatsmeow rotates a QR meanwhile), paired
        await bus.nc.publish(scan_subject(ACCOUNT), b"")
        await bus.nc.publish(scan_subject(ACCOUNT), b"")
        done = await wait_state(client, url, session.headers(), "paired", phase="paired")
        assert done["line"] == f"{ACCOUNT}: paired as {MASKED}"
    (start,) = [e for _, e in await read_stream(bus, "ACCOUNTS") if isinstance(e, PairingStarted)]
    assert (start.by_code, start.via) == (True, "web")
    assert CODE not in every_log(processes)


async def test_a_viewer_can_neither_see_nor_start_a_pairing(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, tmp_path: Path
) -> None:
    await add_user(bus, "victor", "viewer")
    await add_user(bus, "olivia", "operator")
    token = await add_token(bus, "dash", "viewer")
    await start_worker(processes, nats_server.url, tmp_path)
    web = await start_web(processes, nats_server.url)
    viewer = await login(web, "victor")
    olivia = await login(web, "olivia")
    async with web.client() as client:
        # The operator sees the form and its button
        page = await client.get(f"/accounts/{ACCOUNT}/pair", headers=olivia.headers())
        assert page.status_code == 200, page.text
        assert "Start pairing" in page.text
        assert 'name="csrf"' in page.text
        # A viewer is refused the page, the form, the API and a state (no button to see)
        for method, path, kw in (
            ("GET", f"/accounts/{ACCOUNT}/pair", {}),
            ("POST", f"/accounts/{ACCOUNT}/pair", {"data": {"csrf": viewer.csrf}}),
            ("POST", START, {"json": {}}),
            ("GET", f"{START}/0123456789abcdef", {}),
            ("GET", f"/accounts/{ACCOUNT}/pair/0123456789abcdef/view", {}),
        ):
            answer = await client.request(method, path, headers=viewer.headers(), **kw)
            assert answer.status_code == 403, (method, path, answer.text)
            assert "Start pairing" not in answer.text
        by_token = await client.post(START, json={}, headers=bearer(token))
        assert by_token.status_code == 403, by_token.text
        assert json_of(by_token)["error"] == "forbidden"
    # Nothing was started
    events = [e for _, e in await read_stream(bus, "ACCOUNTS")]
    assert not [e for e in events if isinstance(e, PairingStarted)]


async def test_pairing_an_account_another_holder_owns_is_refused_in_one_line(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes, tmp_path: Path
) -> None:
    await add_user(bus, "olivia", "operator")
    await start_worker(processes, nats_server.url, tmp_path)
    web = await start_web(processes, nats_server.url)
    session = await login(web, "olivia")
    # Given an account a running owner holds
    owner = Lease(bus, "whatsapp", ACCOUNT, "host-b-42-whatsapp-abc", ttl=60)
    assert await owner.try_acquire()
    token = owner.token
    line = (
        f"{ACCOUNT} is owned by host-b-42-whatsapp-abc (token {token}): pairing would disturb"
        f" it; run 'svc accounts handover {ACCOUNT}' and stop its workers first"
    )
    async with web.client() as client:
        # When an operator pairs it through the API: 409, the one line naming the owner
        refused = await client.post(START, json={}, headers=session.headers())
        assert refused.status_code == 409, refused.text
        assert json_of(refused) == {"error": "refused", "detail": line}
        # And through the form: back to the page, which shows that line
        form = await client.post(
            f"/accounts/{ACCOUNT}/pair",
            data={"csrf": session.csrf, "phone": ""},
            headers={"Cookie": session.headers()["Cookie"]},
        )
        assert form.status_code == 303, form.text
        back = await client.get(form.headers["location"], headers=session.headers())
        assert back.status_code == 200
        assert "is owned by host-b-42-whatsapp-abc" in back.text
        assert "svc accounts handover" in back.text
        # And a bad phone number is one line too, before any worker is asked
        bad = await client.post(START, json={"phone": "12"}, headers=session.headers())
        assert bad.status_code == 422, bad.text
        assert "is not an E.164 number" in json_of(bad)["detail"]
    # And the owner was not disturbed; the refusals are recorded with who tried
    assert await owner.renew()
    assert owner.token == token
    await owner.release()
    ends = [e for _, e in await read_stream(bus, "ACCOUNTS") if isinstance(e, PairingFinished)]
    assert [(e.outcome, e.reason, e.actor) for e in ends] == [("failed", line, "olivia")] * 2


async def test_without_a_pairing_worker_the_start_is_refused_in_one_line(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    await add_user(bus, "olivia", "operator")
    web: Web = await start_web(processes, nats_server.url)
    session = await login(web, "olivia")
    async with web.client() as client:
        answer = await client.post(START, json={}, headers=session.headers())
        assert answer.status_code == 409, answer.text
        body = json_of(answer)
        assert body["error"] == "no_pairing_worker"
        assert "WHATSAPP_TRANSPORT=neonize" in body["detail"]
        gone = await client.get(f"{START}/0123456789abcdef", headers=session.headers())
        assert gone.status_code == 404, gone.text


async def test_pairing_stays_inside_the_shipped_per_role_nats_users(
    secured: SecuredServer,  # noqa: F811
    operator: Bus,  # noqa: F811
    processes: Processes,
    tmp_path: Path,
) -> None:
    # Given the web and whatsapp roles as their own NATS users (deploy/nats/auth.conf)
    added = run_svc(
        "users", "add", "olivia", "--role", "operator", "--password-stdin",
        env=secured.env(processes, "operator"), input_=b"a long enough password",
    )  # fmt: skip
    assert added.returncode == 0, added.stderr.decode()
    worker_env = secured.env(processes, "whatsapp")
    phone_url = secured.url.replace("://", f"://operator:{secured.passwords['operator']}@")
    await start_worker(
        processes,
        secured.url,
        tmp_path,
        NATS_USER=worker_env["NATS_USER"],
        NATS_PASSWORD=worker_env["NATS_PASSWORD"],
        FAKE_PAIRING_NATS_URL=phone_url,
    )
    web_env = secured.env(processes, "web")
    web = await start_web(
        processes,
        secured.url,
        NATS_USER=web_env["NATS_USER"],
        NATS_PASSWORD=web_env["NATS_PASSWORD"],
    )
    session = await login(web, "olivia", "a long enough password")
    # When olivia pairs an account from the console
    async with web.client() as client:
        started = await client.post(START, json={}, headers=session.headers())
        assert started.status_code == 202, started.text
        url = json_of(started)["state"]
        await wait_state(client, url, session.headers(), "QR 1", phase="qr", qr_number=1)
        await operator.nc.publish(scan_subject(ACCOUNT), b"")
        await wait_state(client, url, session.headers(), "QR 2", phase="qr", qr_number=2)
        await operator.nc.publish(scan_subject(ACCOUNT), b"")
        await wait_state(client, url, session.headers(), "paired", phase="paired")
    # Then the pairing went through and nobody stepped outside their permissions
    record = await DeviceRegistry(operator, "whatsapp").get(ACCOUNT)
    assert record is not None
    assert record.device_id == DEVICE
    assert secured.violations() == []
