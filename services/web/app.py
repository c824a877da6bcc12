"""The web app factory (ADR 0040, 0041): the one place the console and API are put
together. `web_app` takes extra route handlers (the console's pages, SSE) and public
ones (the Cloud API webhooks of role all); every handler of the guarded router must have
a role in services/web/routes.py, or the app refuses to build."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from litestar import Litestar, Router
from litestar.di import Provide
from litestar.handlers import HTTPRouteHandler
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.types import ControllerRouterHandler

from services.runtime.bus import Bus
from services.runtime.errors import ConfigError
from services.runtime.http import healthz, metrics, readyz
from services.runtime.micro import package_version
from services.runtime.settings import WebSettings
from services.web.api import API_HANDLERS
from services.web.auth import CookiePolicy, guard, principal_of
from services.web.console_admin import ADMIN_HANDLERS
from services.web.console_live import LIVE_HANDLERS
from services.web.console_ops import OPS_HANDLERS
from services.web.console_pair import PAIR_HANDLERS
from services.web.errors import on_error
from services.web.identity import Identity, Throttle
from services.web.pages import PAGE_HANDLERS
from services.web.routes import MISSING, min_role

API_TITLE = "Switchboard API"
MAX_BODY_BYTES = 1 << 20  # a JSON body over 1 MiB is refused (413) before it is read whole


def _handlers(router: Router) -> list[HTTPRouteHandler]:
    found = []
    for route in router.routes:
        for handler in getattr(route, "route_handlers", ()):
            # Litestar adds an OPTIONS handler per path (it answers Allow, no data).
            if isinstance(handler, HTTPRouteHandler) and handler.http_methods != {"OPTIONS"}:
                found.append(handler)
    return found


def check_routes(router: Router) -> None:
    """Refuse a guarded handler without a role in the route table (fail closed)."""
    missing = sorted(
        str(h.name or h.handler_name) for h in _handlers(router) if min_role(h.name) is MISSING
    )
    if missing:
        raise ConfigError(
            f"web routes without a role in services/web/routes.py: {', '.join(missing)}"
        )


def web_router(extra: Sequence[ControllerRouterHandler] = ()) -> Router:
    """The console and API routes (plus `extra`), all behind the role guard."""
    router = Router(
        path="/",
        route_handlers=[
            *PAGE_HANDLERS,
            *LIVE_HANDLERS,
            *OPS_HANDLERS,
            *ADMIN_HANDLERS,
            *PAIR_HANDLERS,
            *API_HANDLERS,
            *extra,
        ],
        guards=[guard],
        dependencies={"principal": Provide(principal_of, sync_to_thread=False)},
    )
    check_routes(router)
    return router


def web_app(
    bus: Bus,
    settings: WebSettings,
    *,
    extra: Sequence[ControllerRouterHandler] = (),
    public: Sequence[ControllerRouterHandler] = (),
    identity: Identity | None = None,
) -> Litestar:
    """The web role's Litestar app: /healthz, /readyz, /metrics, `public` handlers, and
    the guarded console + API (with `extra`); OpenAPI at /api/v1/openapi.json."""
    store = identity or Identity(
        bus,
        throttle=Throttle(failures=settings.login_failures, window=settings.login_window),
        session_ttl=settings.session_ttl,
    )
    cookies = CookiePolicy(secure=not settings.insecure_cookies, ttl=settings.session_ttl)
    return Litestar(
        route_handlers=[healthz, readyz, metrics, *public, web_router(extra)],
        state=_state(bus=bus, identity=store, cookies=cookies),
        openapi_config=OpenAPIConfig(
            title=API_TITLE,
            version=package_version(),
            description="The operator API of Switchboard (ADR 0041). Errors are"
            ' {"error": code, "detail": one line}; lists are {items, next_cursor}.',
            # Served by `api.openapi` at /api/v1/openapi.json (Litestar's own router would
            # answer unknown paths under its prefix with an HTML 404).
            path="/_openapi",
            render_plugins=[],
            enabled_endpoints=set(),
            components=Components(
                security_schemes={
                    "bearer": SecurityScheme(
                        type="http",
                        scheme="bearer",
                        description="An API token from `svc tokens create NAME --role R`",
                    )
                }
            ),
            security=[{"bearer": []}],
            use_handler_docstrings=True,
        ),
        logging_config=None,
        exception_handlers={Exception: on_error},
        request_max_body_size=MAX_BODY_BYTES,
        debug=False,
    )


def _state(**values: Any) -> Any:
    from litestar.datastructures import State

    return State(values)
