"""HTTP handlers: authenticate, parse, call the token service, answer. function_app.py routes here.

Each handler is one straight path; every failure is an exception that `_respond` turns into a
problem+json answer, so a handler never builds an error response itself.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import azure.functions as func

from . import policy
from .clients import Clients, get_clients
from .errors import BadRequest, Forbidden, NotFound, ServiceError, SettingError
from .problems import from_error, from_unexpected, json_response
from .settings import get_settings

log = logging.getLogger("acs_token_service.endpoints")
ADMIN_ROLE = "TokenService.Admin"
MAX_ID_LENGTH = 256
RETENTION_PREVIEW_DEFAULT, RETENTION_PREVIEW_MAX = (
    100,
    1000,
)  # the dry run reads a mapping per row it lists or skips

if TYPE_CHECKING:  # auth loads with the clients, on first use: importing function_app stays light
    from .auth import Caller

    Handler = Callable[[Clients, Caller, func.HttpRequest], Awaitable[func.HttpResponse]]


async def _respond(
    req: func.HttpRequest, handler: Handler, *, rate_limited: bool = False, limit: str | None = None
) -> func.HttpResponse:
    """Authenticate, apply the caller's limits (token routes: `rate_limited`; revocations and
    deletions: `limit`, "own" or "manage"), run the handler, map any error."""
    try:
        clients = get_clients()
        caller = await clients.authenticator.authenticate(req.headers)
        who = f"{caller.issuer}\n{caller.subject}"
        if rate_limited and clients.limiter is not None:
            clients.limiter.check(who)
        revocations = {"own": clients.revocation_limiter, "manage": clients.manage_limiter}.get(limit or "")
        if revocations is not None:
            revocations.check(who)
        return await handler(clients, caller, req)
    except ServiceError as err:
        return from_error(err)
    except Exception as err:  # noqa: BLE001 - one place decides what an unexpected error looks like
        return from_unexpected(err)


async def _issue(clients: Clients, caller: Caller, req: func.HttpRequest) -> func.HttpResponse:
    request = policy.token_request(req.get_body(), clients.settings)
    result = await clients.tokens.issue(caller, request)
    return json_response(result.to_json())


async def _refresh(clients: Clients, caller: Caller, req: func.HttpRequest) -> func.HttpResponse:
    request = policy.token_request(req.get_body(), clients.settings)
    result = await clients.tokens.refresh(caller, request)
    return json_response(result.to_json())


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _identity(clients: Clients, caller: Caller, _req: func.HttpRequest) -> func.HttpResponse:
    record = await clients.tokens.identity(caller)
    return json_response(
        {
            "communicationUserId": record.communication_user_id,
            "createdAt": _iso(record.created_at),
            "lastIssuedAt": _iso(record.last_issued_at),
        }
    )


async def issue_token(req: func.HttpRequest) -> func.HttpResponse:
    return await _respond(req, _issue, rate_limited=True)


async def refresh_token(req: func.HttpRequest) -> func.HttpResponse:
    return await _respond(req, _refresh, rate_limited=True)


async def get_identity(req: func.HttpRequest) -> func.HttpResponse:
    return await _respond(req, _identity)


async def health(_req: func.HttpRequest) -> func.HttpResponse:
    """Settings, Table Storage, the issuer's keys and, when Microsoft Graph change notifications are
    in use, their subscription (`graphSubscription`: degraded once a renewal failed or it expires
    within 3 days, since deleted users then stop reaching the webhook silently); names problems,
    never values."""
    checks: dict[str, str] = {}
    try:
        settings = get_settings()
        checks["settings"] = "ok"
    except SettingError as err:
        checks["settings"] = f"missing or invalid: {err.setting}"
        return json_response({"status": "degraded", "checks": checks}, status=503)
    clients = get_clients()
    try:
        await clients.store.table.ping()
        checks["storage"] = "ok"
    except Exception as err:  # noqa: BLE001
        checks["storage"] = f"unavailable ({type(err).__name__})"
    if clients.jwks is not None:
        try:
            await clients.jwks.key("\x00health")  # loads the key set; an unknown kid is expected
        except ServiceError as err:
            checks["issuer"] = "ok" if err.status == 401 else f"unavailable ({err.code})"
    else:
        checks["issuer"] = f"easyauth ({settings.auth_mode})"
    graph_ok = await _graph_health(clients, checks)
    ok = graph_ok and all(
        v == "ok" or v.startswith("easyauth") for k, v in checks.items() if k != "graphSubscription"
    )
    return json_response({"status": "ok" if ok else "degraded", "checks": checks}, status=200 if ok else 503)


async def _graph_health(clients: Clients, checks: dict[str, str]) -> bool:
    """Adds `graphSubscription` when there is one to report on (shared/graph.py); False if degraded."""
    if clients.graph is None or checks.get("storage") != "ok":  # its record is in Table Storage
        return True
    try:
        reported = await clients.graph.health()
    except Exception as err:  # noqa: BLE001
        reported = (f"unknown ({type(err).__name__})", False)
    if reported is None:
        return True
    checks["graphSubscription"], healthy = reported
    return healthy


# ---- revocation and deletion ------------------------------------------------------------------------


def _outcome_response(outcome) -> func.HttpResponse:
    return json_response(outcome.to_json(), status=outcome.http_status)


async def _revoke_own(clients: Clients, caller: Caller, _req: func.HttpRequest) -> func.HttpResponse:
    record = await clients.tokens.identity(caller)
    return _outcome_response(await clients.revocation.revoke(record, source="user"))


async def _delete_own(clients: Clients, caller: Caller, _req: func.HttpRequest) -> func.HttpResponse:
    record = await clients.tokens.identity(caller)
    return _outcome_response(await clients.revocation.delete(record, source="user"))


def _require_admin(caller: Caller) -> None:
    if not caller.has_role(ADMIN_ROLE):
        raise Forbidden(f"This route needs the app role {ADMIN_ROLE}.")


async def _managed_record(clients: Clients, caller: Caller, req: func.HttpRequest):
    """The record of the identity a manage/ route names; the caller needs the admin role."""
    _require_admin(caller)
    communication_user_id = req.route_params.get("communicationUserId", "")
    if not communication_user_id or len(communication_user_id) > MAX_ID_LENGTH:
        raise BadRequest("communicationUserId is missing or too long.", code="invalid_identity_id")
    user_key = await clients.store.lookups.owner_of(communication_user_id)
    record = await clients.store.identities.get(user_key) if user_key else None
    if record is None or record.communication_user_id != communication_user_id:
        raise NotFound("No app user maps to that ACS identity.", code="identity_not_found")
    return record


async def _manage_revoke(clients: Clients, caller: Caller, req: func.HttpRequest) -> func.HttpResponse:
    record = await _managed_record(clients, caller, req)
    return _outcome_response(await clients.revocation.revoke(record, source="admin"))


async def _manage_delete(clients: Clients, caller: Caller, req: func.HttpRequest) -> func.HttpResponse:
    record = await _managed_record(clients, caller, req)
    return _outcome_response(await clients.revocation.delete(record, source="admin"))


async def _manage_retention(clients: Clients, caller: Caller, req: func.HttpRequest) -> func.HttpResponse:
    _require_admin(caller)
    raw = req.params.get("limit", str(RETENTION_PREVIEW_DEFAULT))
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= RETENTION_PREVIEW_MAX:
        raise BadRequest(
            f"limit must be a whole number from 1 to {RETENTION_PREVIEW_MAX}.", code="invalid_limit"
        )
    return json_response(await clients.cleanup.preview(int(raw)))


async def revoke_tokens(req: func.HttpRequest) -> func.HttpResponse:
    return await _respond(req, _revoke_own, limit="own")


async def delete_identity(req: func.HttpRequest) -> func.HttpResponse:
    return await _respond(req, _delete_own, limit="own")


async def manage_revoke(req: func.HttpRequest) -> func.HttpResponse:
    """POST /api/manage/identities/{communicationUserId}/revoke (app role TokenService.Admin)."""
    return await _respond(req, _manage_revoke, limit="manage")


async def manage_delete(req: func.HttpRequest) -> func.HttpResponse:
    """DELETE /api/manage/identities/{communicationUserId} (app role TokenService.Admin)."""
    return await _respond(req, _manage_delete, limit="manage")


async def manage_retention(req: func.HttpRequest) -> func.HttpResponse:
    """GET /api/manage/retention (app role TokenService.Admin): a dry run of retention."""
    return await _respond(req, _manage_retention, limit="manage")


# ---- the cleanup timer --------------------------------------------------------------------------------


async def cleanup_timer(_timer: func.TimerRequest) -> None:
    """A failed run only logs: the next one starts from the same durable state."""
    try:
        await get_clients().cleanup.run()
    except ServiceError as err:
        log.error("cleanup run skipped: %s (%s)", err.code, err.detail)
    except Exception as err:  # noqa: BLE001
        log.error("cleanup run failed: %s", type(err).__name__)


# ---- Teams users --------------------------------------------------------------------------------------


async def _teams_token(clients: Clients, caller: Caller, req: func.HttpRequest) -> func.HttpResponse:
    from .teams import TeamsExchange, teams_token_request

    request = teams_token_request(req.get_body())
    exchange = clients.teams or TeamsExchange(clients.tokens.acs, clients.settings)
    return json_response((await exchange.exchange(caller, request)).to_json())


async def teams_token(req: func.HttpRequest) -> func.HttpResponse:
    """POST /api/teams/token: the caller's Teams token (Entra, for ACS) -> an ACS token."""
    return await _respond(req, _teams_token, rate_limited=True)


# ---- the demo page ------------------------------------------------------------------------------------


async def demo_page(req: func.HttpRequest) -> func.HttpResponse:
    """GET /api/demo, anonymous: the browser demo page, or 404 unless DEMO_PAGE_ENABLED."""
    from . import demo_page as page

    return page.serve(req)
