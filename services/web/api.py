"""The JSON API under /api/v1/ (ADR 0041): thin handlers over services/ops/ and
services/web/console.py. Each handler's `name` is its key in services/web/routes.py."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Annotated, Any, Literal

import msgspec
import nats.errors
from litestar import Request, delete, get, post, put
from litestar.params import Parameter

from contracts.errors import ContractError
from contracts.events import CHANNEL_WHATSAPP
from contracts.web import NAME_PATTERN
from services.runtime.bus import Bus
from services.runtime.errors import ConfigError, ServiceError, StreamsMissingError
from services.web import console
from services.web.auth import client_of
from services.web.console import Page, page
from services.web.errors import ApiError
from services.web.identity import IdentityError, Principal

Text = Annotated[str, msgspec.Meta(max_length=65_536)]
Short = Annotated[str, msgspec.Meta(max_length=1024)]
Patterns = Annotated[list[Short], msgspec.Meta(max_length=100)]
Limit = Annotated[
    int | None, Parameter(ge=1, le=console.MAX_LIMIT, description="Items per page (default 50).")
]
Cursor = Annotated[
    str | None, Parameter(max_length=200, description="`next_cursor` of the previous page.")
]


def bus_of(request: Request[Any, Any, Any]) -> Bus:
    """The app's NATS connection."""
    found: Bus = request.app.state["bus"]
    return found


@contextlib.contextmanager
def ops_errors(not_found: bool = False) -> Iterator[None]:
    """Map the errors of services/ops/ to API errors (one line each). `not_found`: a
    ServiceError means the thing named does not exist (404), else it is a conflict (409)."""
    try:
        yield
    except ApiError:
        raise
    except IdentityError as exc:
        raise ApiError(exc.status, str(exc), exc.code) from None
    except StreamsMissingError as exc:
        raise ApiError(503, str(exc), "streams_missing") from None
    except (ConfigError, ContractError, ValueError) as exc:
        raise ApiError(422, str(exc), "invalid") from None
    except ServiceError as exc:
        raise ApiError(404 if not_found else 409, str(exc)) from None
    except (nats.errors.TimeoutError, nats.errors.NoRespondersError) as exc:
        raise ApiError(503, f"NATS did not answer ({type(exc).__name__}); retry") from None


# --- who am I, overview ----------------------------------------------------------------


@get("/api/v1/openapi.json", name="api.openapi", include_in_schema=False)
async def openapi(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """This API's OpenAPI 3 document (public: it holds no data)."""
    schema: dict[str, Any] = request.app.openapi_schema.to_schema()
    return schema


@get("/api/v1/me", name="api.me")
async def me(principal: Principal) -> dict[str, Any]:
    """The caller: name, kind (user or token), role; a session also gets its CSRF token."""
    answer: dict[str, Any] = {
        "name": principal.name,
        "kind": principal.kind,
        "role": principal.role,
    }
    if principal.kind == "user":
        answer["csrf"] = principal.csrf
    return answer


@get("/api/v1/status", name="api.status")
async def status(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """What `svc status` shows: streams, consumers, leases, accounts, live workers."""
    from services.ops.status import collect_status

    with ops_errors():
        return await collect_status(bus_of(request), first=0.5, stall=0.2, limit=1.5)


# --- accounts and conversations --------------------------------------------------------


@get("/api/v1/accounts", name="api.accounts")
async def accounts(
    request: Request[Any, Any, Any], limit: Limit = None, cursor: Cursor = None
) -> Page:
    """Every account: state, holder, token, budget, last traffic."""
    from services.ops.status import collect_accounts

    with ops_errors():
        return page(await collect_accounts(bus_of(request)), limit, cursor)


@get("/api/v1/accounts/{account:str}/chats/{chat:str}/messages", name="api.messages")
async def messages(
    request: Request[Any, Any, Any],
    account: str,
    chat: str,
    limit: Limit = None,
    cursor: Cursor = None,
) -> Page:
    """One chat's transcript (messages, turns, sends, receipts, refusals), oldest first."""
    from services.ops.explain import conversation

    account = console.check_account(account)
    jid = console.check_chat(chat)
    with ops_errors():
        entries = await conversation(bus_of(request), CHANNEL_WHATSAPP, account, jid)
    return page([console.builtins(e) for e in entries], limit, cursor)


class SendBody(msgspec.Struct, frozen=True, kw_only=True):
    """A proactive send: `chat` is the chat's JID."""

    chat: Short
    text: Text


@post("/api/v1/accounts/{account:str}/messages", name="api.send", status_code=202)
async def send_message(
    request: Request[Any, Any, Any], account: str, data: SendBody, principal: Principal
) -> dict[str, str]:
    """Queue a message to `chat` from `account` (an operator-originated turn); 202 with
    the job id. An `Idempotency-Key` header makes a retried request one job."""
    job_id = await console.send(
        bus_of(request),
        account,
        data.chat,
        data.text,
        principal=principal,
        client=client_of(request),
        idempotency_key=request.headers.get("idempotency-key"),
    )
    return {"job_id": job_id}


class HandoverBody(msgspec.Struct, frozen=True, kw_only=True):
    """How long to wait for the owner to confirm, in seconds."""

    timeout: Annotated[float, msgspec.Meta(gt=0, le=60)] = 10.0


@post("/api/v1/accounts/{account:str}/handover", name="api.handover", status_code=200)
async def handover(
    request: Request[Any, Any, Any], account: str, data: HandoverBody | None = None
) -> dict[str, Any]:
    """Ask the account's owner to finish its in-flight send and release the lease."""
    from services.ops.accounts import handover as ask

    account = console.check_account(account)
    with ops_errors():
        reply = await ask(bus_of(request), account, timeout=(data or HandoverBody()).timeout)
    return {"account": account, **msgspec.to_builtins(reply)}


class ReasonBody(msgspec.Struct, frozen=True, kw_only=True):
    """Why (recorded with who)."""

    reason: Short = ""


@post("/api/v1/accounts/{account:str}/resume", name="api.resume", status_code=200)
async def resume(
    request: Request[Any, Any, Any],
    account: str,
    principal: Principal,
    data: ReasonBody | None = None,
) -> dict[str, Any]:
    """Clear a parked account so a worker takes it over."""
    from services.ops.accounts import resume as clear

    account = console.check_account(account)
    with ops_errors():
        was = await clear(
            bus_of(request),
            account,
            actor=principal.name,
            reason=(data or ReasonBody()).reason,
            client=client_of(request),
            via="web",
        )
    return {"account": account, "was_parked": was}


# --- dead letters ------------------------------------------------------------------------


@get("/api/v1/deadletters", name="api.deadletters")
async def deadletters(
    request: Request[Any, Any, Any],
    which: Annotated[
        Literal["open", "all"], Parameter(query="state", description="open (default) or all")
    ] = "open",
    limit: Limit = None,
    cursor: Cursor = None,
) -> Page:
    """Dead letters (open ones unless state=all), oldest first."""
    from services.ops.dlq import letters

    with ops_errors():
        found = await letters(bus_of(request))
    rows = [x.summary() for x in found.values() if which == "all" or x.state == "open"]
    return page(rows, limit, cursor)


async def _letter_seq(bus: Bus, ref: str) -> int:
    from services.ops.dlq import letters, resolve

    with ops_errors(not_found=True):
        return resolve(await letters(bus), ref)


@get("/api/v1/deadletters/{ref:str}", name="api.deadletter")
async def deadletter(request: Request[Any, Any, Any], ref: str) -> dict[str, Any]:
    """One dead letter (by sequence or job id prefix): payload, errors, actions."""
    from services.ops.dlq import details, one

    seq = await _letter_seq(bus_of(request), ref)
    with ops_errors(not_found=True):
        return details(await one(bus_of(request), seq))


class RequeueBody(msgspec.Struct, frozen=True, kw_only=True):
    """Why, and whether to requeue a letter already handled."""

    reason: Short = ""
    force: bool = False


@post("/api/v1/deadletters/{ref:str}/requeue", name="api.deadletter.requeue", status_code=200)
async def requeue(
    request: Request[Any, Any, Any],
    ref: str,
    principal: Principal,
    data: RequeueBody | None = None,
) -> dict[str, Any]:
    """Send a dead letter back; a job gets a new id linked to the original."""
    from services.ops.dlq import requeue as send_back

    body = data or RequeueBody()
    seq = await _letter_seq(bus_of(request), ref)
    with ops_errors():
        target = await send_back(
            bus_of(request),
            seq,
            actor=principal.name,
            reason=body.reason,
            force=body.force,
            client=client_of(request),
            via="web",
        )
    return {"seq": seq, "requeued_as": target}


class DropBody(msgspec.Struct, frozen=True, kw_only=True):
    """Why (required, recorded with who)."""

    reason: Annotated[str, msgspec.Meta(min_length=1, max_length=1024)]


@post("/api/v1/deadletters/{ref:str}/drop", name="api.deadletter.drop", status_code=200)
async def drop(
    request: Request[Any, Any, Any], ref: str, data: DropBody, principal: Principal
) -> dict[str, Any]:
    """Discard a dead letter, recording who and why."""
    from services.ops.dlq import drop as discard

    seq = await _letter_seq(bus_of(request), ref)
    with ops_errors():
        await discard(
            bus_of(request),
            seq,
            actor=principal.name,
            reason=data.reason,
            client=client_of(request),
            via="web",
        )
    return {"seq": seq, "dropped": True}


# --- plugins and policy --------------------------------------------------------------------


@get("/api/v1/plugins", name="api.plugins")
async def plugins(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Available plugins, what is installed where, and the tool policies."""
    from services.ops.plugins import listing

    with ops_errors():
        return await listing(bus_of(request))


@get("/api/v1/plugins/resolve", name="api.plugins.resolve")
async def plugins_resolve(
    request: Request[Any, Any, Any],
    account: Annotated[str, Parameter(max_length=64)] = "default",
    channel: Annotated[str, Parameter(max_length=32)] = CHANNEL_WHATSAPP,
) -> list[dict[str, Any]]:
    """The tools a turn for (channel, account) gets, and which rule decided each."""
    from services.ops.plugins import resolution

    with ops_errors():
        return await resolution(bus_of(request), channel, account)


class PolicyBody(msgspec.Struct, frozen=True, kw_only=True):
    """A scope's allow/deny `plugin.tool` globs (no channel: global); replaces its rules."""

    channel: Short | None = None
    account: Short | None = None
    allow: Patterns = msgspec.field(default_factory=list)
    deny: Patterns = msgspec.field(default_factory=list)


@put("/api/v1/plugins/policy", name="api.plugins.policy", status_code=200)
async def plugins_policy(
    request: Request[Any, Any, Any], data: PolicyBody, principal: Principal
) -> dict[str, Any]:
    """Set a scope's tool policy (recorded as ToolPolicySet, the next turn sees it)."""
    from services.ops.plugins import policy, scope_of

    with ops_errors():
        scope = scope_of(data.channel, data.account)
        event, seq = await policy(
            bus_of(request), scope, list(data.allow), list(data.deny), actor=principal.name
        )
    return {"seq": seq, "event": msgspec.to_builtins(event)}


# --- access policy -------------------------------------------------------------------------


@get("/api/v1/access", name="api.access")
async def access(request: Request[Any, Any, Any]) -> dict[str, Any]:
    """Modes, allow/block patterns, approved senders and who is pending."""
    from services.ops.access import listing

    with ops_errors():
        return await listing(bus_of(request))


@get("/api/v1/access/pending", name="api.access.pending")
async def access_pending(
    request: Request[Any, Any, Any],
    account: Annotated[str | None, Parameter(max_length=64)] = None,
    limit: Limit = None,
    cursor: Cursor = None,
) -> Page:
    """Senders waiting for approval (under `approval`)."""
    from services.ops.access import pending

    with ops_errors():
        return page(await pending(bus_of(request), account), limit, cursor)


class ApproveBody(msgspec.Struct, frozen=True, kw_only=True):
    """The sender (or group) JID to approve on an account."""

    jid: Short
    account: Short
    channel: Short | None = None


@post("/api/v1/access/approve", name="api.access.approve", status_code=200)
async def access_approve(
    request: Request[Any, Any, Any], data: ApproveBody, principal: Principal
) -> dict[str, Any]:
    """Approve a sender; its waiting messages are then answered, in order."""
    from services.ops.access import approve, check_approvable, scope

    with ops_errors():
        channel, account = scope(data.channel, data.account)
        check_approvable(data.jid)
        event, seq, released = await approve(
            bus_of(request), data.jid, channel, account, actor=principal.name
        )
    return {"seq": seq, "released": released, "event": msgspec.to_builtins(event)}


class ModeBody(msgspec.Struct, frozen=True, kw_only=True):
    """A scope's access mode."""

    mode: Literal["open", "allowlist", "approval"]
    channel: Short | None = None
    account: Short | None = None


@put("/api/v1/access/mode", name="api.access.mode", status_code=200)
async def access_mode(
    request: Request[Any, Any, Any], data: ModeBody, principal: Principal
) -> dict[str, Any]:
    """Set the access mode of a channel or of one account."""
    from services.ops.access import scope, set_mode

    with ops_errors():
        channel, account = scope(data.channel, data.account)
        event, seq = await set_mode(
            bus_of(request), data.mode, channel, account, actor=principal.name
        )
    return {"seq": seq, "event": msgspec.to_builtins(event)}


class RuleBody(msgspec.Struct, frozen=True, kw_only=True):
    """An allow or block pattern (a JID or a glob) for a scope."""

    kind: Literal["allow", "block"]
    pattern: Short
    channel: Short | None = None
    account: Short | None = None


@post("/api/v1/access/rules", name="api.access.rule", status_code=201)
async def access_rule(
    request: Request[Any, Any, Any], data: RuleBody, principal: Principal
) -> dict[str, Any]:
    """Add an allow or block pattern (a block always wins)."""
    from services.ops.access import add_rule, scope

    with ops_errors():
        channel, account = scope(data.channel, data.account)
        event, seq = await add_rule(
            bus_of(request), data.kind, data.pattern, channel, account, actor=principal.name
        )
    return {"seq": seq, "event": msgspec.to_builtins(event)}


# --- audit ---------------------------------------------------------------------------------


@get("/api/v1/audit", name="api.audit")
async def audit(
    request: Request[Any, Any, Any],
    account: Annotated[str | None, Parameter(max_length=64)] = None,
    grace: Annotated[float, Parameter(ge=0, le=86_400)] = 60.0,
) -> dict[str, Any]:
    """Run every invariant check over the log (as `svc audit --no-replay`)."""
    from services.ops.audit import Scope, to_builtins
    from services.ops.audit import audit as run

    if account is not None:
        console.check_account(account)
    scope = Scope(account=account, grace=grace, replay=False)
    with ops_errors():
        report, elapsed = await run(bus_of(request), scope)
    return to_builtins(report, elapsed, scope)


@get("/api/v1/audit/jobs/{job_id:str}", name="api.audit.explain")
async def audit_explain(request: Request[Any, Any, Any], job_id: str) -> dict[str, Any]:
    """Why a job was sent: inbound or operator, turn, attempts, send, receipts."""
    from contracts.subjects import check_job_id
    from services.ops.explain import explain

    with ops_errors():
        check_job_id(job_id)
    with ops_errors(not_found=True):
        chain = await explain(bus_of(request), job_id)
    found: dict[str, Any] = msgspec.to_builtins(chain)
    return found


# --- users and tokens (admin) ------------------------------------------------------------


@get("/api/v1/users", name="api.users")
async def users(
    request: Request[Any, Any, Any], limit: Limit = None, cursor: Cursor = None
) -> Page:
    """Console users (never a password hash)."""
    from services.ops.users import list_users

    with ops_errors():
        return page(await list_users(bus_of(request)), limit, cursor)


WebName = Annotated[str, msgspec.Meta(pattern=f"^{NAME_PATTERN}$")]


class UserBody(msgspec.Struct, frozen=True, kw_only=True):
    """A new console user."""

    name: WebName
    role: Literal["viewer", "operator", "admin"]
    password: Annotated[str, msgspec.Meta(max_length=1024)]


@post("/api/v1/users", name="api.users.add", status_code=201)
async def users_add(
    request: Request[Any, Any, Any], data: UserBody, principal: Principal
) -> dict[str, Any]:
    """Add a console user (the password is stored as an argon2id hash)."""
    from services.ops.users import user_row
    from services.web.identity import Identity

    identity: Identity = request.app.state["identity"]
    with ops_errors():
        record = await identity.add_user(
            data.name, data.role, data.password, actor=principal.name, via="web"
        )
    return user_row(record)


@delete("/api/v1/users/{name:str}", name="api.users.remove", status_code=200)
async def users_remove(
    request: Request[Any, Any, Any], name: str, principal: Principal
) -> dict[str, Any]:
    """Remove a console user and end their sessions everywhere."""
    from services.web.identity import Identity

    identity: Identity = request.app.state["identity"]
    with ops_errors():
        ended = await identity.remove_user(name, actor=principal.name, via="web")
    return {"name": name, "sessions_ended": ended}


@get("/api/v1/tokens", name="api.tokens")
async def tokens(
    request: Request[Any, Any, Any], limit: Limit = None, cursor: Cursor = None
) -> Page:
    """API tokens (never a secret)."""
    from services.ops.users import list_tokens

    with ops_errors():
        return page(await list_tokens(bus_of(request)), limit, cursor)


class TokenBody(msgspec.Struct, frozen=True, kw_only=True):
    """A new API token."""

    name: WebName
    role: Literal["viewer", "operator", "admin"]


@post("/api/v1/tokens", name="api.tokens.create", status_code=201)
async def tokens_create(
    request: Request[Any, Any, Any], data: TokenBody, principal: Principal
) -> dict[str, Any]:
    """Create an API token; `token` is shown in this answer only."""
    from services.ops.users import token_row
    from services.web.identity import Identity

    identity: Identity = request.app.state["identity"]
    with ops_errors():
        record, secret = await identity.create_token(
            data.name, data.role, actor=principal.name, via="web"
        )
    return {**token_row(record), "token": secret}


@delete("/api/v1/tokens/{ref:str}", name="api.tokens.revoke", status_code=200)
async def tokens_revoke(
    request: Request[Any, Any, Any], ref: str, principal: Principal
) -> dict[str, Any]:
    """Revoke a token (by id or name): refused at once everywhere."""
    from services.ops.users import token_row
    from services.web.identity import Identity

    identity: Identity = request.app.state["identity"]
    with ops_errors(not_found=True):
        record = await identity.revoke_token(ref, actor=principal.name, via="web")
    return token_row(record)


API_HANDLERS = [
    openapi,
    me,
    status,
    accounts,
    messages,
    send_message,
    handover,
    resume,
    deadletters,
    deadletter,
    requeue,
    drop,
    plugins,
    plugins_resolve,
    plugins_policy,
    access,
    access_pending,
    access_approve,
    access_mode,
    access_rule,
    audit,
    audit_explain,
    users,
    users_add,
    users_remove,
    tokens,
    tokens_create,
    tokens_revoke,
]
