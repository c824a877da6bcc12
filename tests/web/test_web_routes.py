"""Every route's minimum role is enforced (issue 18 item 4): the test walks the route table
of services/web/routes.py against a real `svc run web` and proves each refusal -- 401 (a
page: to /login) without credentials, 403 with every role weaker than the route's."""

from __future__ import annotations

import re

import pytest
from litestar import get

from contracts.web import WEB_ROLES, allows
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.nats_server import EmbeddedNats
from services.web.app import _handlers, web_router
from services.web.routes import ROUTE_ROLES
from tests.conftest import Processes
from tests.web.conftest import add_token, bearer, json_of, start_web

pytestmark = pytest.mark.slow


def routes() -> list[tuple[str, str, str]]:
    """(method, concrete path, handler name) of every guarded route."""
    found = []
    for handler in _handlers(web_router()):
        for path in handler.paths:
            concrete = re.sub(r"\{[^}:]+(:[^}]+)?\}", "x", path)
            for method in sorted(handler.http_methods):
                found.append((method, concrete, str(handler.name)))
    return found


def test_the_route_table_and_the_router_name_the_same_routes() -> None:
    assert {name for _, _, name in routes()} == set(ROUTE_ROLES)


def test_a_route_without_a_role_is_refused_when_the_app_is_built() -> None:
    @get("/api/v1/forgotten", name="api.forgotten", sync_to_thread=False)
    def forgotten() -> str:
        return "data"

    with pytest.raises(ConfigError, match=r"api\.forgotten"):
        web_router([forgotten])


async def test_every_route_refuses_no_credentials_and_every_weaker_role(
    bus: Bus, nats_server: EmbeddedNats, processes: Processes
) -> None:
    tokens = {role: await add_token(bus, f"t-{role}", role) for role in WEB_ROLES}
    web = await start_web(processes, nats_server.url)
    checked = 0
    async with web.client() as client:
        for method, path, name in routes():
            needed = ROUTE_ROLES[name]
            if needed is None:
                continue  # public: the login form, the OpenAPI document
            # Without credentials: 401 (a page a browser GETs: sent to the login form)
            anonymous = await client.request(method, path)
            if path.startswith("/api/"):
                assert anonymous.status_code == 401, (method, path, anonymous.text)
                assert json_of(anonymous)["error"] == "unauthorized"
            elif method == "GET":
                assert anonymous.status_code == 303, (method, path)
                assert anonymous.headers["location"] == "/login"
            else:
                assert anonymous.status_code == 401, (method, path, anonymous.text)
            # With each weaker role: 403
            for role, token in tokens.items():
                if allows(role, needed):
                    continue
                weak = await client.request(method, path, headers=bearer(token))
                assert weak.status_code == 403, (method, path, role, weak.text)
                if path.startswith("/api/"):
                    assert json_of(weak)["error"] == "forbidden"
                    assert needed in json_of(weak)["detail"]
                checked += 1
    # operator routes refuse viewers; admin routes refuse viewers and operators
    expected = sum(
        sum(1 for role in WEB_ROLES if not allows(role, needed))
        for _, _, name in routes()
        if (needed := ROUTE_ROLES[name]) is not None
    )
    assert checked == expected > 0
