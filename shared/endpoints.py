"""HTTP handlers: authenticate, parse, call the token service, answer. function_app.py routes here.

Each handler is one straight path; every failure is an exception that `_respond` turns into a
problem+json answer, so a handler never builds an error response itself.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Awaitable, Callable

import azure.functions as func

from . import policy
from .auth import Caller
from .clients import Clients, get_clients
from .errors import ServiceError, SettingError
from .problems import from_error, from_unexpected, json_response
from .settings import get_settings

log = logging.getLogger("acs_token_service.endpoints")

Handler = Callable[[Clients, Caller, func.HttpRequest], Awaitable[func.HttpResponse]]


async def _respond(req: func.HttpRequest, handler: Handler) -> func.HttpResponse:
    try:
        clients = get_clients()
        caller = await clients.authenticator.authenticate(req.headers)
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
    return await _respond(req, _issue)


async def refresh_token(req: func.HttpRequest) -> func.HttpResponse:
    return await _respond(req, _refresh)


async def get_identity(req: func.HttpRequest) -> func.HttpResponse:
    return await _respond(req, _identity)


async def health(_req: func.HttpRequest) -> func.HttpResponse:
    """Settings, Table Storage and the issuer's keys; names problems, never values."""
    checks: dict[str, str] = {}
    try:
        settings = get_settings()
        checks["settings"] = "ok"
    except SettingError as err:
        checks["settings"] = f"missing or invalid: {err.setting}"
        return json_response({"status": "degraded", "checks": checks}, status=503)
    clients = get_clients()
    try:
        await clients.store.ping()
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
    ok = all(v == "ok" or v.startswith("easyauth") for v in checks.values())
    return json_response({"status": "ok" if ok else "degraded", "checks": checks}, status=200 if ok else 503)
