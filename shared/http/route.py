"""A route's authentication, rate limit and error mapping, declared once on its handler.

`@route(auth=..., limit=...)` turns a handler into what function_app.py calls, `async (req) ->
HttpResponse`; whatever the handler or the declared checks raise is answered by shared/http/problems.py,
so no handler builds an error response. Function-key routes (the webhook) are the host's to check:
here they are anonymous.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import Enum
from functools import wraps
from typing import TYPE_CHECKING, Literal, overload

import azure.functions as func

from ..compose import Services, services
from ..errors import Forbidden
from .problems import response_for

if TYPE_CHECKING:  # auth loads jwt and aiohttp with the clients, not when the host indexes function_app
    from ..auth import Caller
    from ..ratelimit import RateLimiter

from ..issuers import ADMIN_ROLE


class Auth(Enum):
    USER = "a bearer token from the app's issuer"
    ADMIN = f"a bearer token with the app role {ADMIN_ROLE} (or its issuer's adminRole)"
    ANONYMOUS = "none here (a function-key route's key is checked by the host)"


class Limit(Enum):
    """Whose bucket a call takes from (shared/ratelimit.py says why each exists)."""

    TOKENS = "RATE_LIMIT_PER_MINUTE a user, when set"
    OWN = "a user's own revocations and deletions"
    MANAGE = "an admin's calls"


@dataclass(frozen=True)
class Call:
    """What an authenticated handler is given: the request, who makes it, the worker's services."""

    req: func.HttpRequest
    caller: Caller
    clients: Services


Endpoint = Callable[[func.HttpRequest], Awaitable[func.HttpResponse]]
Handler = Callable[[Call], Awaitable[func.HttpResponse]]


@overload
def route(*, auth: Literal[Auth.ANONYMOUS]) -> Callable[[Endpoint], Endpoint]: ...
@overload
def route(
    *, auth: Literal[Auth.USER, Auth.ADMIN], limit: Limit | None = None
) -> Callable[[Handler], Endpoint]: ...
def route(*, auth: Auth, limit: Limit | None = None) -> Callable[[Callable], Endpoint]:
    """An anonymous handler takes the request; an authenticated one a `Call`, admitted first."""

    def decorate(handler: Callable) -> Endpoint:
        @wraps(handler)
        async def endpoint(req: func.HttpRequest) -> func.HttpResponse:
            try:
                if auth is Auth.ANONYMOUS:
                    return await handler(req)
                return await handler(await _admit(req, auth, limit))
            except Exception as err:  # noqa: BLE001 - problems.py decides what every error looks like
                return response_for(err)

        return endpoint

    return decorate


async def _admit(req: func.HttpRequest, auth: Auth, limit: Limit | None) -> Call:
    """Authenticate, take from the caller's bucket, then check the role: a caller without it still
    spends their limit, so probing an admin route costs what calling it does."""
    clients = services()
    caller = await clients.authenticator.authenticate(req.headers)
    limiter = _limiter(clients, limit)
    if limiter is not None:
        limiter.check(f"{caller.issuer}\n{caller.subject}")
    if auth is Auth.ADMIN:
        role = caller.admin_role
        if role is None:
            raise Forbidden("This route needs an admin role, and your issuer grants none here.")
        if not caller.has_role(role):
            raise Forbidden(f"This route needs the app role {role}.")
    return Call(req, caller, clients)


def _limiter(clients: Services, limit: Limit | None) -> RateLimiter | None:
    match limit:
        case Limit.TOKENS:
            return clients.limiter  # None when RATE_LIMIT_PER_MINUTE is off
        case Limit.OWN:
            return clients.revocation_limiter
        case Limit.MANAGE:
            return clients.manage_limiter
    return None
