"""A dev OpenID Connect issuer: discovery document, JWKS, and signed user tokens.

It stands in for the app's own identity provider (Entra ID, B2C, ...). Tokens are minted from the
stack's state folder by `python -m devstack token`, so the private key never crosses HTTP.

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

from .hooks import require_loopback
from .signing import SigningKey

HOOKS = "issuer hooks"  # as their 403 names them (devstack/hooks.py)
# Stable, obviously fake namespace: the same USER always gets the same oid on every stack.
_OBJECT_ID_NAMESPACE = uuid.UUID("5d1a4c8e-0b7e-4d8e-9a51-3f0c2c1d7e00")
DEV_TENANT_ID = "72f988bf-0000-4000-8000-0000000de7e1"


def object_id_for(user: str) -> str:
    return str(uuid.uuid5(_OBJECT_ID_NAMESPACE, user))


def discovery_document(issuer: str) -> dict:
    return {
        "issuer": issuer,
        "jwks_uri": f"{issuer}/discovery/keys",
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
    def __init__(self, *, issuer: str, key: SigningKey) -> None:
        self.issuer = issuer
        self.key = key
        self.faults = IssuerFaults()
        self.calls: Counter[str] = Counter()

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/discovery/keys", self.jwks)
        app.router.add_get("/_issuer/stats", self.hook_stats)
        app.router.add_post("/_issuer/faults", self.hook_faults)
        app.router.add_post("/_issuer/reset", self.hook_reset)
        return app

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

    # ---- test hooks (loopback only, never faulted) ------------------------------------------------

    async def hook_stats(self, request: web.Request) -> web.Response:
        require_loopback(request, HOOKS)
        calls = {"discovery": self.calls["discovery"], "jwks": self.calls["jwks"]}
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
