"""Pairing an account from the browser: a QR shown as it rotates, or a pairing code
(issue 18 item 3).

The web role holds no WhatsApp session: it asks a `whatsapp` worker to pair (services/
ops/pair.py `start_pairing`, core NATS request/reply) and reads the attempt's state back
(`pairing_state`). The page draws the current QR as an SVG here, server-side (segno), and
/static/pair.js polls the attempt's fragment and swaps it when it changed. The console
page and the API call the same two functions (`start`, `state` below).
"""

from __future__ import annotations

from html import escape
from typing import Annotated, Any, Literal
from urllib.parse import quote

import msgspec
import nats.errors
from litestar import MediaType, Request, Response, get, post
from litestar.handlers import HTTPRouteHandler
from litestar.params import Parameter
from litestar.response import Redirect

from contracts.pairing import PairingPhase, PairingState, check_attempt
from services.ops.pair import (
    NoPairingWorkerError,
    PairingAttemptGoneError,
    PairingRefusedError,
    pairing_state,
    start_pairing,
)
from services.web import console
from services.web.api import bus_of
from services.web.auth import client_of
from services.web.errors import ApiError
from services.web.identity import Principal
from services.web.pages import back as back_to
from services.web.pages import console_page, flash, post_form, script

Via = Literal["web", "api"]
Phone = Annotated[str, msgspec.Meta(max_length=32)]
AttemptQuery = Annotated[str | None, Parameter(max_length=64)]
_NO_STORE = {
    "Cache-Control": "no-store",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": "default-src 'self'; style-src 'unsafe-inline'",
}


# --- the one implementation (pages and API) ----------------------------------------------


async def start(
    request: Request[Any, Any, Any],
    account: str,
    principal: Principal,
    *,
    phone: str,
    force: bool,
    via: Via,
) -> str:
    """Have a worker pair `account`; the attempt id. Refusals are one line (ApiError)."""
    account = console.check_account(account)
    try:
        return await start_pairing(
            bus_of(request),
            account,
            phone=phone.strip(),
            force=force,
            actor=principal.name,
            via=via,
            client=client_of(request),
        )
    except PairingRefusedError as exc:
        raise ApiError(exc.status, str(exc), "refused" if exc.status == 409 else "") from None
    except NoPairingWorkerError as exc:
        raise ApiError(409, str(exc), "no_pairing_worker") from None
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid") from None
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise ApiError(503, f"the pairing worker did not answer ({type(exc).__name__})") from None


async def state(request: Request[Any, Any, Any], account: str, attempt: str) -> PairingState:
    """The attempt's state now, from the worker running it (404 when none knows it)."""
    account = console.check_account(account)
    try:
        check_attempt(attempt)
        return await pairing_state(bus_of(request), account, attempt)
    except ValueError as exc:
        raise ApiError(422, str(exc), "invalid") from None
    except PairingAttemptGoneError as exc:
        raise ApiError(404, str(exc)) from None
    except nats.errors.TimeoutError:
        raise ApiError(503, "the pairing worker did not answer (TimeoutError); retry") from None


# --- API ---------------------------------------------------------------------------------


class PairBody(msgspec.Struct, frozen=True, kw_only=True):
    """`phone` (E.164) for a pairing code instead of QR codes; `force` re-pairs a paired
    account (removes its device)."""

    phone: Phone = ""
    force: bool = False


class PairStarted(msgspec.Struct, frozen=True, kw_only=True):
    """The attempt a worker runs: read it at `state`."""

    account: str
    attempt: str
    state: str


class PairView(msgspec.Struct, frozen=True, kw_only=True):
    """An attempt's state: `seq` grows with each change; `qr` is the current QR code's
    text (phase qr), `code` the pairing code (phase code), `line` the outcome."""

    account: str
    attempt: str
    phase: PairingPhase
    seq: int
    done: bool
    qr: str = ""
    qr_number: int = 0
    code: str = ""
    line: str = ""


@post("/api/v1/accounts/{account:str}/pair", name="api.pair.start", status_code=202)
async def api_start(
    request: Request[Any, Any, Any],
    account: str,
    principal: Principal,
    data: PairBody | None = None,
) -> PairStarted:
    """Start pairing `account` on a `whatsapp` worker (neonize): 202 with the attempt id;
    409 with one line if another holder owns the account or it is already paired."""
    body = data or PairBody()
    attempt = await start(
        request, account, principal, phone=body.phone, force=body.force, via="api"
    )
    return PairStarted(
        account=account, attempt=attempt, state=f"/api/v1/accounts/{account}/pair/{attempt}"
    )


@get("/api/v1/accounts/{account:str}/pair/{attempt:str}", name="api.pair.state")
async def api_state(request: Request[Any, Any, Any], account: str, attempt: str) -> PairView:
    """A pairing attempt's current QR code or pairing code, then its outcome (poll it)."""
    found = await state(request, account, attempt)
    return PairView(
        account=found.account,
        attempt=found.attempt,
        phase=found.phase,
        seq=found.seq,
        done=found.done,
        qr=found.qr,
        qr_number=found.qr_number,
        code=found.code,
        line=found.line,
    )


# --- the page ----------------------------------------------------------------------------


def qr_svg(text: str) -> str:
    """The QR code `text` as inline SVG (segno; dark on white, with its quiet zone)."""
    import segno

    svg: str = segno.make_qr(text.encode()).svg_inline(scale=5, dark="#000", light="#fff")
    return svg


def fragment(found: PairingState) -> str:
    """What the page shows of an attempt (escaped)."""
    if found.phase == "qr":
        return (
            f'<div class="qr" data-qr="{found.qr_number}">{qr_svg(found.qr)}</div>'
            f"<p>Scan this QR code ({found.qr_number}; it rotates) in WhatsApp on the phone:"
            " Settings &gt; Linked devices &gt; Link a device.</p>"
        )
    if found.phase == "code":
        return (
            f'<p>Pairing code <strong class="code">{escape(found.code)}</strong>: enter it in'
            " WhatsApp on the phone: Settings &gt; Linked devices &gt; Link a device &gt;"
            " Link with phone number.</p>"
        )
    if found.phase == "paired":
        return f'<p class="result" role="status">{escape(found.line)}</p>'
    if found.phase == "failed":
        return f'<p class="error" role="alert">{escape(found.line)}</p>'
    return "<p>Starting: waiting for WhatsApp's first code…</p>"


def _form(principal: Principal, account: str) -> str:
    inputs = (
        "<label>Phone number (optional: a pairing code instead of a QR), e.g. +15550000001"
        ' <input name="phone" inputmode="tel" autocomplete="off" maxlength="32"></label>'
        '<label><input type="checkbox" name="force" value="1" style="width:auto">'
        " Re-pair (removes the account's current device)</label>"
    )
    return post_form(principal, f"/accounts/{quote(account)}/pair", "Start pairing", inputs=inputs)


@get("/accounts/{account:str}/pair", name="page.pair", include_in_schema=False)
async def pair_page(
    request: Request[Any, Any, Any],
    account: str,
    principal: Principal,
    attempt: AttemptQuery = None,
) -> Response[str]:
    """The pairing form; with `attempt`, that attempt's codes (kept current by pair.js)."""
    account = console.check_account(account)
    title = f"Pair {account}"
    if said := flash(request, principal):
        return console_page(title, principal, said + _form(principal, account))
    if not attempt:
        return console_page(title, principal, _form(principal, account))
    found = await state(request, account, attempt)
    src = f"/accounts/{quote(account)}/pair/{quote(found.attempt)}/view"
    body = (
        '<p role="status">Pairing started.</p>'
        f'<div id="pairing" data-src="{escape(src)}" data-seq="{found.seq}"'
        f' data-done="{int(found.done)}">{fragment(found)}</div>'
        '<script src="/static/pair.js" defer></script>'
    )
    if found.done:
        body += _form(principal, account)
    return console_page(title, principal, body)


@post("/accounts/{account:str}/pair", name="pair.start", include_in_schema=False, status_code=303)
async def pair_submit(
    request: Request[Any, Any, Any], account: str, principal: Principal
) -> Response[Any]:
    """Start pairing from the form; back to the page with the attempt, or the refusal."""
    account = console.check_account(account)
    form = await request.form()
    phone = form.get("phone")
    force = form.get("force") == "1"
    back = f"/accounts/{quote(account)}/pair"
    try:
        attempt = await start(
            request,
            account,
            principal,
            phone=phone if isinstance(phone, str) else "",
            force=force,
            via="web",
        )
    except ApiError as exc:
        return back_to(principal, back, str(exc.detail), error=True)
    return Redirect(f"{back}?attempt={quote(attempt)}", status_code=303)


@get("/accounts/{account:str}/pair/{attempt:str}/view", name="pair.view", include_in_schema=False)
async def pair_view(request: Request[Any, Any, Any], account: str, attempt: str) -> Response[str]:
    """The attempt's fragment (pair.js swaps it in when `X-Pairing-Seq` changed)."""
    found = await state(request, account, attempt)
    return Response(
        fragment(found),
        media_type=MediaType.HTML,
        headers={
            **_NO_STORE,
            "X-Pairing-Seq": str(found.seq),
            "X-Pairing-Done": str(int(found.done)),
        },
    )


@get("/static/pair.js", name="static.pair", include_in_schema=False)
async def pair_script() -> Response[bytes]:
    """The page's poller (same origin: the CSP allows no inline script)."""
    return script("pair.js")


PAIR_HANDLERS: list[HTTPRouteHandler] = [
    api_start,
    api_state,
    pair_page,
    pair_submit,
    pair_view,
    pair_script,
]
