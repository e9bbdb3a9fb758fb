"""The ACS Identity emulator's HTTP face: REST api-version 2023-10-01 plus `/_emulator/` hooks.

Order of work for every API request: count it, apply faults (down, latency, limits, throttling,
errors: all before any state changes; the limits count create-and-issue apart from plain creates,
as ACS does, so the body is read first), authenticate (HMAC or a managed-identity bearer token),
validate, then act on the `AcsResource`.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import random
import re
from collections.abc import Awaitable, Callable

import jwt
from aiohttp import web

from . import hmac_auth
from .acs_state import (
    CREATE_AND_ISSUE,
    AcsError,
    AcsResource,
    check_expires_in,
    check_scopes,
    validation_error,
)
from .hooks import hook_body, require_loopback
from .signing import SigningKey

HOOKS = "emulator hooks"  # as their 403 names them (devstack/hooks.py)
log = logging.getLogger("devstack.acs")

API_VERSIONS = frozenset(
    {"2021-03-07", "2021-10-31-preview", "2021-11-01", "2022-06-01", "2022-10-01", "2023-08-01", "2023-10-01"}
)
ACS_AUDIENCES = ("https://communication.azure.com", "https://communication.azure.com/")

Route = tuple[str, re.Pattern[str], str]
ROUTES: list[Route] = [
    ("POST", re.compile(r"/identities"), "createIdentity"),
    ("POST", re.compile(r"/identities/(?P<id>[^/]+)/:issueAccessToken"), "issueAccessToken"),
    ("POST", re.compile(r"/identities/(?P<id>[^/]+)/:revokeAccessTokens"), "revokeAccessTokens"),
    ("DELETE", re.compile(r"/identities/(?P<id>[^/]+)"), "deleteIdentity"),
    ("POST", re.compile(r"/teamsUser/:exchangeAccessToken"), "exchangeTeamsToken"),
]


def _json(status: int, body: object | None = None, headers: dict[str, str] | None = None) -> web.Response:
    if body is None:
        return web.Response(status=status, headers=headers)
    return web.json_response(body, status=status, headers=headers)


def _error(err: AcsError) -> web.Response:
    headers = {"Retry-After": str(err.retry_after)} if err.retry_after is not None else None
    return _json(err.status, err.body(), headers)


def _match(method: str, path: str) -> tuple[str, dict[str, str]] | None:
    for route_method, pattern, operation in ROUTES:
        found = pattern.fullmatch(path)
        if found and route_method == method:
            return operation, found.groupdict()
    return None


def _limited_operation(operation: str, raw: bytes) -> str:
    """The operation as ACS's service limits count it: a create that asks for a token
    (`createTokenWithScopes` other than null or []) is create-and-issue, limited on its own."""
    if operation != "createIdentity" or not raw:
        return operation
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):  # a bad body is answered later, as a plain create
        return operation
    if isinstance(body, dict) and body.get("createTokenWithScopes") not in (None, []):
        return CREATE_AND_ISSUE
    return operation


async def _json_body(raw: bytes) -> dict:
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise AcsError(400, "InvalidRequestBody", "The request body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise AcsError(400, "InvalidRequestBody", "The request body must be a JSON object.")
    return body


class AcsEmulator:
    """Binds an `AcsResource` to HTTP, with the resource's key and the trusted token issuer."""

    def __init__(
        self,
        resource: AcsResource,
        *,
        access_key: bytes,
        managed_identity_key: SigningKey,
        managed_identity_issuer_prefix: str = "https://sts.windows.net/",
    ) -> None:
        self.resource = resource
        self.access_key = access_key
        self.managed_identity_key = managed_identity_key
        self.managed_identity_issuer_prefix = managed_identity_issuer_prefix

    def app(self) -> web.Application:
        app = web.Application(client_max_size=1024 * 1024)
        app.router.add_get("/_emulator/stats", self.hook_stats)
        app.router.add_post("/_emulator/tokens:verify", self.hook_verify)
        app.router.add_post("/_emulator/faults", self.hook_faults)
        app.router.add_get("/_emulator/faults", self.hook_get_faults)
        app.router.add_post("/_emulator/reset", self.hook_reset)
        app.router.add_route("*", "/{tail:.*}", self.api)
        return app

    # ---- the ACS API -------------------------------------------------------------------------

    async def api(self, request: web.Request) -> web.StreamResponse:
        matched = _match(request.method, request.path)
        if matched is None:
            return _json(404, {"error": {"code": "NotFound", "message": "Resource not found."}})
        operation, params = matched
        self.resource.count(operation)
        faults = self.resource.faults

        if faults.down:
            return await self._hang_up(request)
        if faults.latencyMs:
            await asyncio.sleep(faults.latencyMs / 1000)
        try:
            raw = await request.read()
            self.resource.check_limit(_limited_operation(operation, raw))
            if faults.throttleRate and random.random() < faults.throttleRate:
                raise AcsError(
                    429, "TooManyRequests", "Too many requests.", retry_after=faults.retryAfterSeconds
                )
            if faults.errorRate and random.random() < faults.errorRate:
                raise AcsError(500, "InternalError", "An internal error occurred (injected fault).")
            self._authenticate(request, raw)
            self._check_api_version(request)
            handler = self.OPERATIONS[operation]
            return await handler(self, params.get("id"), await _json_body(raw))
        except AcsError as err:
            return _error(err)

    async def _hang_up(self, request: web.Request) -> web.StreamResponse:
        """Close the connection without a status line, as a dead backend would."""
        transport = request.transport
        if transport is not None:
            transport.abort()
        raise asyncio.CancelledError()

    def _check_api_version(self, request: web.Request) -> None:
        version = request.query.get("api-version")
        if version not in API_VERSIONS:
            raise AcsError(
                400, "UnsupportedApiVersion", f"The api-version '{version}' is not supported; use 2023-10-01."
            )

    def _authenticate(self, request: web.Request, body: bytes) -> None:
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            self._check_bearer(authorization.removeprefix("Bearer ").strip())
            return
        try:
            hmac_auth.verify(
                method=request.method,
                target=request.raw_path,
                headers=request.headers,
                body=body,
                secret=self.access_key,
                now=dt.datetime.now(dt.UTC),
            )
        except hmac_auth.SignatureError as err:
            log.info("denied %s %s: %s", request.method, request.path, err)
            raise AcsError(401, "Denied", "Denied by the resource provider.") from None

    def _check_bearer(self, token: str) -> None:
        try:
            claims = jwt.decode(
                token,
                self.managed_identity_key.public_key,
                algorithms=["RS256"],
                audience=list(ACS_AUDIENCES),
                options={"require": ["exp", "nbf", "iat", "iss"]},
            )
        except jwt.PyJWTError as err:
            log.info("denied bearer token: %s", err)
            raise AcsError(401, "InvalidAuthenticationToken", "The access token is invalid.") from None
        if not str(claims["iss"]).startswith(self.managed_identity_issuer_prefix):
            raise AcsError(401, "InvalidAuthenticationToken", "The access token issuer is not trusted.")

    async def create_identity(self, _id: None, body: dict) -> web.Response:
        scopes = body.get("createTokenWithScopes")
        minutes = check_expires_in(body.get("expiresInMinutes"))
        if scopes is not None:
            scopes = check_scopes(scopes, field_name="CreateTokenWithScopes") if scopes != [] else []
        identity_id = self.resource.create_identity()
        answer: dict = {"identity": {"id": identity_id}}
        if scopes:
            issued = self.resource.issue(identity_id, scopes, minutes)
            answer["accessToken"] = {"token": issued.token, "expiresOn": issued.expires_on_text}
        return _json(201, answer)

    async def issue_token(self, identity_id: str, body: dict) -> web.Response:
        scopes = check_scopes(body.get("scopes"))
        minutes = check_expires_in(body.get("expiresInMinutes"))
        issued = self.resource.issue(identity_id, scopes, minutes)
        return _json(200, {"token": issued.token, "expiresOn": issued.expires_on_text})

    async def revoke_tokens(self, identity_id: str, _body: dict) -> web.Response:
        self.resource.revoke(identity_id)
        return _json(204)

    async def delete_identity(self, identity_id: str, _body: dict) -> web.Response:
        self.resource.delete(identity_id)
        return _json(204)

    async def exchange_teams_token(self, _id: None, body: dict) -> web.Response:
        issued = self.resource.exchange_teams_token(body.get("token"), body.get("appId"), body.get("userId"))
        return _json(200, {"token": issued.token, "expiresOn": issued.expires_on_text})

    OPERATIONS: dict[str, Callable[..., Awaitable[web.Response]]] = {
        "createIdentity": create_identity,
        "issueAccessToken": issue_token,
        "revokeAccessTokens": revoke_tokens,
        "deleteIdentity": delete_identity,
        "exchangeTeamsToken": exchange_teams_token,
    }

    # ---- test hooks: no auth, loopback only, never faulted ---------------------------------------

    async def hook_stats(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        return _json(200, self.resource.stats())

    async def hook_verify(self, request: web.Request) -> web.Response:
        body = await hook_body(request, HOOKS)
        valid, reason = self.resource.verify(body.get("token"))
        return _json(200, {"valid": valid, "reason": reason})

    async def hook_faults(self, request: web.Request) -> web.Response:
        body = await hook_body(request, HOOKS)
        try:
            self.resource.faults.update(body)
        except ValueError as err:
            return _json(400, {"error": {"code": "ValidationError", "message": str(err)}})
        return _json(200, vars(self.resource.faults))

    async def hook_get_faults(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        return _json(200, vars(self.resource.faults))

    async def hook_reset(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        self.resource.reset()
        return _json(200, self.resource.stats())


__all__ = ["AcsEmulator", "validation_error"]
