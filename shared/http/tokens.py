"""A user's own routes: tokens, their identity, its revocation and deletion, Teams tokens."""

from __future__ import annotations

import azure.functions as func

from .. import policy
from . import bodies
from .route import Auth, Call, Limit, route


@route(auth=Auth.USER, limit=Limit.TOKENS)
async def issue(call: Call) -> func.HttpResponse:
    request = policy.token_request(call.req.get_body(), call.clients.settings, call.caller.trusted)
    return bodies.token(await call.clients.tokens.issue(call.caller, request))


@route(auth=Auth.USER, limit=Limit.TOKENS)
async def refresh(call: Call) -> func.HttpResponse:
    request = policy.token_request(call.req.get_body(), call.clients.settings, call.caller.trusted)
    return bodies.token(await call.clients.tokens.refresh(call.caller, request))


@route(auth=Auth.USER)
async def identity(call: Call) -> func.HttpResponse:
    return bodies.identity(await call.clients.tokens.identity(call.caller))


@route(auth=Auth.USER, limit=Limit.OWN)
async def revoke(call: Call) -> func.HttpResponse:
    record = await call.clients.tokens.identity(call.caller)
    return bodies.outcome(await call.clients.revocation.revoke(record, source="user"))


@route(auth=Auth.USER, limit=Limit.OWN)
async def delete(call: Call) -> func.HttpResponse:
    record = await call.clients.tokens.identity(call.caller)
    return bodies.outcome(await call.clients.revocation.delete(record, source="user"))


@route(auth=Auth.USER, limit=Limit.TOKENS)
async def teams(call: Call) -> func.HttpResponse:
    """The body carries the Teams user's Entra token for ACS; the bearer is the caller's, as everywhere."""
    from ..teams import teams_token_request  # loads auth (jwt) with the services, not at indexing

    request = teams_token_request(call.req.get_body())
    return bodies.teams_token(await call.clients.teams.exchange(call.caller, request))
