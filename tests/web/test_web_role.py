"""The `web` role (issue 18 item 1, ADR 0040): `svc run web` serves on SVC_HTTP_PORT
(8080 by default), answers /healthz /readyz /metrics like every role, registers with NATS
micro so `svc status` lists it; role `all` serves the console only when SVC_HTTP_PORT is
set, the worker roles never."""

from __future__ import annotations

import json

import pytest

from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.nats_server import EmbeddedNats
from services.runtime.settings import WEB_DEFAULT_PORT, load_settings
from tests.conftest import Processes, arun_svc, wait_until
from tests.web.conftest import json_of, post_login, start_web


def test_web_listens_on_8080_unless_svc_http_port_says_otherwise() -> None:
    assert load_settings({"SVC_ROLE": "web"}).http.port == WEB_DEFAULT_PORT == 8080
    assert load_settings({}, role="web").http.port == 8080
    assert load_settings({"SVC_HTTP_PORT": "0"}, role="web").http.port == 0
    assert load_settings({}, role="all").http.port is None
    assert load_settings({}, role="core").http.port is None


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("SVC_WEB_INSECURE_COOKIES", "maybe", "SVC_WEB_INSECURE_COOKIES='maybe' is invalid"),
        ("SVC_WEB_SESSION_TTL", "5", "SVC_WEB_SESSION_TTL"),
        ("SVC_WEB_LOGIN_FAILURES", "0", "SVC_WEB_LOGIN_FAILURES"),
        ("SVC_WEB_LOGIN_WINDOW", "soon", "SVC_WEB_LOGIN_WINDOW"),
    ],
)
def test_bad_web_settings_are_refused_in_one_line(name: str, value: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings({name: value}, role="web")
    assert says in str(refused.value)
    assert "\n" not in str(refused.value)


@pytest.mark.slow
async def test_svc_run_web_is_a_role_with_health_metrics_and_a_micro_service(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    web = await start_web(processes, nats_server.url)
    async with web.client() as client:
        assert (await client.get("/healthz")).text.strip() == "ok"
        assert (await client.get("/readyz")).text.strip() == "ready"
        assert (await post_login(client, "nobody", "x")).status_code == 401
        metrics = (await client.get("/metrics")).text
    assert 'switchboard_web_logins_total{outcome="failed"} 1' in metrics
    env = processes.env(NATS_URL=nats_server.url)

    async def listed() -> bool:
        status = await arun_svc("status", "--json", env=env)
        return any(w["role"] == "web" for w in json.loads(status.stdout)["workers"])

    await wait_until(listed, 30, "svc status listing the web role")
    assert f'"port": {web.url.rsplit(":", 1)[1]}' in processes.log(web.proc)


@pytest.mark.slow
async def test_role_all_serves_the_console_with_svc_http_port_and_a_worker_role_never(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    everything = await start_web(processes, nats_server.url, "all")
    core = await start_web(processes, nats_server.url, "core")
    async with everything.client() as client:
        assert (await client.get("/login")).status_code == 200
        anonymous = await client.get("/api/v1/accounts")
        assert anonymous.status_code == 401
        assert json_of(anonymous)["error"] == "unauthorized"
    async with core.client() as client:
        assert (await client.get("/login")).status_code == 404
        assert (await client.get("/api/v1/accounts")).status_code == 404
        assert (await client.get("/healthz")).status_code == 200
