"""A dev OpenID Connect issuer: discovery document, JWKS, and signed user tokens.

It stands in for the app's own identity provider (Entra ID, B2C, ...). Tokens are minted from the
stack's state folder by `python -m devstack token`, so the private key never crosses HTTP.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable

import jwt
from aiohttp import web

from .keys import SigningKey

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


class DevIssuer:
    def __init__(self, *, issuer: str, key: SigningKey) -> None:
        self.issuer = issuer
        self.key = key

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/.well-known/openid-configuration", self.discovery)
        app.router.add_get("/discovery/keys", self.jwks)
        return app

    async def discovery(self, _request: web.Request) -> web.Response:
        return web.json_response(discovery_document(self.issuer))

    async def jwks(self, _request: web.Request) -> web.Response:
        return web.json_response({"keys": [self.key.jwk()]})
