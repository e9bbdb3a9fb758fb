"""A managed-identity endpoint speaking App Service's protocol (IDENTITY_ENDPOINT/IDENTITY_HEADER).

With IDENTITY_ENDPOINT and IDENTITY_HEADER set, `azure.identity.ManagedIdentityCredential` (sync,
through MSAL, and aio) asks this endpoint for tokens exactly as it would on a Function App, so the
keyless path runs locally. Tokens carry what the consumers check: the ACS emulator verifies
the signature, audience and issuer; Azurite's `--oauth basic` checks issuer prefix, audience and
lifetime; the Microsoft Graph stand-in (devstack/graph.py) verifies like the emulator and wants the
app role an administrator grants the Function App's identity for Graph subscriptions on users,
which Entra puts in the token's `roles` claim.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

import jwt
from aiohttp import web

from .signing import SigningKey

API_VERSION = "2019-08-01"
TOKEN_LIFETIME_SECONDS = 24 * 3600
GRAPH = "https://graph.microsoft.com"
RESOURCES = ("https://communication.azure.com", "https://storage.azure.com", GRAPH)
# The Graph application permissions the dev identity holds, as if granted (README, Deploy to Azure).
GRAPH_ROLES = ("User.Read.All",)


@dataclass(frozen=True)
class ManagedIdentity:
    client_id: str
    principal_id: str

    @classmethod
    def new(cls) -> ManagedIdentity:
        return cls(str(uuid.uuid4()), str(uuid.uuid4()))


def _error(status: int, message: str) -> web.Response:
    # App Service answers errors in this shape; MSAL reads statusCode and message.
    return web.json_response({"statusCode": status, "message": message}, status=status)


class ManagedIdentityEndpoint:
    def __init__(
        self,
        *,
        key: SigningKey,
        secret: str,
        tenant_id: str,
        system_assigned: ManagedIdentity,
        user_assigned: tuple[ManagedIdentity, ...] = (),
    ) -> None:
        self.key = key
        self.secret = secret
        self.tenant_id = tenant_id
        self.system_assigned = system_assigned
        self.by_client_id = {mi.client_id: mi for mi in (system_assigned, *user_assigned)}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/msi/token", self.token)
        return app

    def _identity(self, query) -> ManagedIdentity | None:
        client_id = query.get("client_id")
        if client_id:
            return self.by_client_id.get(client_id)
        if query.get("mi_res_id") or query.get("object_id"):
            return None
        return self.system_assigned

    async def token(self, request: web.Request) -> web.Response:
        if request.headers.get("X-IDENTITY-HEADER") != self.secret:
            return _error(401, "X-IDENTITY-HEADER is missing or wrong.")
        if request.query.get("api-version") != API_VERSION:
            return _error(400, f"api-version must be {API_VERSION}.")
        resource = request.query.get("resource", "")
        if resource.rstrip("/") not in RESOURCES:
            return _error(400, f"This dev endpoint issues tokens only for {', '.join(RESOURCES)}.")
        identity = self._identity(request.query)
        if identity is None:
            return _error(400, "No managed identity with that id is assigned to this app.")
        now = int(time.time())
        expires_on = now + TOKEN_LIFETIME_SECONDS
        claims = {
            "aud": resource,
            "iss": f"https://sts.windows.net/{self.tenant_id}/",
            "iat": now,
            "nbf": now,
            "exp": expires_on,
            "appid": identity.client_id,
            "oid": identity.principal_id,
            "sub": identity.principal_id,
            "tid": self.tenant_id,
            "idtyp": "app",
            "ver": "1.0",
        }
        if resource.rstrip("/") == GRAPH:
            claims["roles"] = list(GRAPH_ROLES)
        token = jwt.encode(claims, self.key.private_key, algorithm="RS256", headers={"kid": self.key.kid})
        return web.json_response(
            {
                "access_token": token,
                "expires_on": str(expires_on),
                "resource": resource,
                "token_type": "Bearer",
                "client_id": identity.client_id,
            }
        )
