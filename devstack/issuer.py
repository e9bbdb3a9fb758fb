"""Dev OpenID Connect issuers: discovery documents, JWKS, and signed user tokens.

They stand in for the app's own identity providers (Entra ID, B2C, ...), on one server:
- the dev issuer at its root (the one AUTH_ISSUER names by default);
- an Entra-style multi-tenant issuer under `/entra`: each tenant's `iss` is
  `{root}/entra/{tenant id}/v2.0`, all signed with one key set, and the `common` discovery
  document names the template `{root}/entra/{tenantid}/v2.0`, as login.microsoftonline.com does;
- a second plain OpenID Connect issuer at `/second`, with a key of its own.
Tokens are minted from the stack's state folder by `python -m devstack token [--issuer ...]`, so
private keys never cross HTTP.

Test hooks under `/_issuer/` (no auth, loopback only, never faulted), so that tests can show what
the service does while its IdP is down or hanging: `GET stats` (requests received per endpoint,
faulted or not), `POST faults {"down", "latencyMs", "maxAgeSeconds"}` (omitted fields unchanged),
`POST reset` (faults off, counts zero).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, fields

import jwt
from aiohttp import web

from shared.issuers import TENANT

from .hooks import require_loopback
from .signing import SigningKey

HOOKS = "issuer hooks"  # as their 403 names them (devstack/hooks.py)
# Stable, obviously fake namespace: the same USER always gets the same oid on every stack.
_OBJECT_ID_NAMESPACE = uuid.UUID("5d1a4c8e-0b7e-4d8e-9a51-3f0c2c1d7e00")
DEV_TENANT_ID = "72f988bf-0000-4000-8000-0000000de7e1"
# The Entra-style issuer's tenants: any GUID is a tenant to it; these are the ones the docs and
# tests use (a customer A, a customer B, and one no allow-list names).
ENTRA_TENANTS = (
    "aaaaaaaa-0000-4000-8000-00000000000a",
    "bbbbbbbb-0000-4000-8000-00000000000b",
    "cccccccc-0000-4000-8000-00000000000c",
)
ENTRA_PATH, SECOND_PATH = "/entra", "/second"
TENANT_TEMPLATE = TENANT  # as shared/issuers.py names the placeholder


def issuers_of(root: str) -> dict[str, str]:
    """The `iss` of each dev issuer on the server at `root` (the Entra one as its template)."""
    return {
        "dev": root,
        "entra": f"{root}{ENTRA_PATH}/{TENANT_TEMPLATE}/v2.0",
        "second": f"{root}{SECOND_PATH}",
    }


def object_id_for(user: str) -> str:
    return str(uuid.uuid5(_OBJECT_ID_NAMESPACE, user))


def auth_issuers_example(root: str, audience: str) -> str:
    """AUTH_ISSUERS trusting the dev issuers on the server at `root`: the dev one (its admins hold
    TokenService.Admin), the Entra-style one for tenants A and B, the second one for chat only."""
    issuers = issuers_of(root)
    return json.dumps(
        [
            {"issuer": issuers["dev"], "audiences": audience, "adminRole": "TokenService.Admin"},
            {
                "issuer": issuers["entra"],
                "audiences": audience,
                "userClaim": "oid",
                "tenants": list(ENTRA_TENANTS[:2]),
            },
            {"issuer": issuers["second"], "audiences": audience, "allowedScopes": ["chat"]},
        ]
    )


def discovery_document(issuer: str, jwks_uri: str | None = None) -> dict:
    return {
        "issuer": issuer,
        "jwks_uri": jwks_uri or f"{issuer}/discovery/keys",
        "authorization_endpoint": f"{issuer}/oauth2/authorize",
        "token_endpoint": f"{issuer}/oauth2/token",
        "response_types_supported": ["id_token", "code"],
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": ["RS256"],
        "claims_supported": ["sub", "oid", "tid", "roles", "aud", "iss", "iat", "nbf", "exp"],
    }


def mint_user_token(
    *,
    key: SigningKey,
    issuer: str,
    audience: str,
    user: str,
    roles: Iterable[str] = (),
    minutes: int = 60,
    tenant_id: str = DEV_TENANT_ID,
    app_id: str | None = None,
    now: float | None = None,
    entra_ids: bool = True,
    token_id: str | None = None,
) -> str:
    """A user JWT as the app's identity provider would sign it.

    `entra_ids=False` leaves out `oid`/`tid`, as a plain OpenID Connect IdP would; `token_id`
    sets `jti`, making two tokens minted in the same second differ, as two sign-ins would.
    """
    issued_at = int(time.time() if now is None else now)
    claims: dict = {
        "iss": issuer,
        "aud": audience,
        "sub": user,
        "oid": object_id_for(user),
        "tid": tenant_id,
        "roles": list(roles),
        "name": user,
        "preferred_username": user,
        "iat": issued_at,
        "nbf": issued_at,
        "exp": issued_at + minutes * 60,
        "ver": "2.0",
    }
    if app_id:
        claims["appid"] = claims["azp"] = app_id
    if not entra_ids:
        del claims["oid"], claims["tid"]
    if token_id:
        claims["jti"] = token_id
    return jwt.encode(claims, key.private_key, algorithm="RS256", headers={"kid": key.kid})


@dataclass
class IssuerFaults:
    """What the dev issuer does wrong on purpose. Field names are the JSON names of POST faults."""

    down: bool = False  # every discovery and JWKS request has its connection closed, no answer
    latencyMs: int = 0  # each discovery and JWKS answer waits this long (a hanging IdP)
    maxAgeSeconds: int | None = None  # the JWKS answer's Cache-Control max-age; None sends none

    def update(self, patch: object) -> None:
        """Apply a partial update; raise ValueError naming the first bad field, changing nothing."""
        if not isinstance(patch, dict):
            raise ValueError("faults must be a JSON object")
        known = {f.name for f in fields(self)}
        for name, value in patch.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}")
            if name == "down":
                if not isinstance(value, bool):
                    raise ValueError("down must be true or false")
            elif value is None and name == "maxAgeSeconds":
                continue
            elif isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 3_600_000:
                raise ValueError(f"{name} must be an integer from 0 to 3600000")
        for name, value in patch.items():
            setattr(self, name, value)


class DevIssuer:
    def __init__(
        self,
        *,
        issuer: str,
        key: SigningKey,
        entra_key: SigningKey | None = None,
        second_key: SigningKey | None = None,
    ) -> None:
        self.issuer = issuer
        self.key = key
        # Keys of the other issuers: each its own, so that one's never validates another's tokens.
        self.entra_key = entra_key or SigningKey.generate()
        self.second_key = second_key or SigningKey.generate()
        self.faults = IssuerFaults()
        self.calls: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count_every_request])
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/discovery/keys", self.jwks)
        app.router.add_get(
            ENTRA_PATH + "/{tenant}/v2.0/.well-known/openid-configuration", self.entra_discovery
        )
        app.router.add_get(ENTRA_PATH + "/common/discovery/v2.0/keys", self.entra_jwks)
        app.router.add_get(SECOND_PATH + "/.well-known/openid-configuration", self.second_discovery)
        app.router.add_get(SECOND_PATH + "/discovery/keys", self.second_jwks)
        app.router.add_get("/_issuer/stats", self.hook_stats)
        app.router.add_post("/_issuer/faults", self.hook_faults)
        app.router.add_post("/_issuer/reset", self.hook_reset)
        return app

    @web.middleware
    async def _count_every_request(self, request: web.Request, handler) -> web.StreamResponse:
        """Every request but the hooks', whatever its path: a test can show none was made."""
        if not request.path.startswith("/_issuer/"):
            self.calls["any"] += 1
        return await handler(request)

    async def _fault(self, request: web.Request, endpoint: str) -> None:
        """Count the request, then hang up or wait as the faults say."""
        self.calls[endpoint] += 1
        if self.faults.down:
            if request.transport is not None:
                request.transport.abort()  # no status line: as a dead IdP would
            raise asyncio.CancelledError()
        if self.faults.latencyMs:
            await asyncio.sleep(self.faults.latencyMs / 1000)

    async def discovery(self, request: web.Request) -> web.Response:
        await self._fault(request, "discovery")
        return web.json_response(discovery_document(self.issuer))

    async def jwks(self, request: web.Request) -> web.Response:
        await self._fault(request, "jwks")
        max_age = self.faults.maxAgeSeconds
        headers = {"Cache-Control": f"max-age={max_age}"} if max_age is not None else None
        return web.json_response({"keys": [self.key.jwk()]}, headers=headers)

    async def entra_discovery(self, request: web.Request) -> web.Response:
        """A tenant's document names its own issuer; `common`'s names the template (Entra's way)."""
        await self._fault(request, "discovery")
        tenant = request.match_info["tenant"]
        issuer = issuers_of(self.issuer)["entra"]
        issuer = issuer if tenant == "common" else issuer.replace(TENANT_TEMPLATE, tenant)
        return web.json_response(
            discovery_document(issuer, f"{self.issuer}{ENTRA_PATH}/common/discovery/v2.0/keys")
        )

    async def entra_jwks(self, request: web.Request) -> web.Response:
        await self._fault(request, "jwks")
        return web.json_response({"keys": [self.entra_key.jwk()]})

    async def second_discovery(self, request: web.Request) -> web.Response:
        await self._fault(request, "discovery")
        return web.json_response(discovery_document(issuers_of(self.issuer)["second"]))

    async def second_jwks(self, request: web.Request) -> web.Response:
        await self._fault(request, "jwks")
        return web.json_response({"keys": [self.second_key.jwk()]})

    # ---- test hooks (loopback only, never faulted) ------------------------------------------------

    async def hook_stats(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        calls = {"discovery": self.calls["discovery"], "jwks": self.calls["jwks"], "any": self.calls["any"]}
        return web.json_response({"calls": calls})

    async def hook_faults(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        try:
            self.faults.update(await request.json() if request.can_read_body else {})
        except ValueError as err:  # also not JSON at all (JSONDecodeError, UnicodeDecodeError)
            not_json = isinstance(err, json.JSONDecodeError | UnicodeDecodeError)
            message = "body must be JSON" if not_json else str(err)
            return web.json_response({"error": {"code": "ValidationError", "message": message}}, status=400)
        return web.json_response(vars(self.faults))

    async def hook_reset(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        self.faults, self.calls = IssuerFaults(), Counter()
        return web.json_response(vars(self.faults))
