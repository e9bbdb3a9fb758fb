"""Dev sign-in for the browser demo: the dev host mints dev-issuer user tokens at POST /.devstack/token.

The dev issuer has no login page, and the service itself never mints user tokens, so the local
stack's dev host offers this one extra, non-Functions route. Only `python -m devstack up` turns it
on, by handing the dev host the *path* of the issuer key (DEVHOST_DEV_SIGNIN); a plain
`python -m devstack host`, `func start` and Azure have no such route, and the demo page then asks
for a pasted bearer token instead.

It is as strong as a local dev tool needs, and no stronger than `make token`:
- loopback peers only, and a loopback Host header, so a DNS-rebinding page cannot reach it;
- same-origin browser requests only: an Origin, when sent, must be the dev host's own, so no
  other site (not even one allowed by Host.CORS) can sign anyone in;
- a JSON body (a cross-site form post cannot send one), no query string;
- plain users only: no app roles, hence no TokenService.Admin tokens; 60-minute tokens;
- by default from the dev issuer; `"issuer": "entra"` (with `"tenant"`, a tenant id) or
  `"second"` signs in with the other dev issuers, whose keys sit beside its (devstack/issuer.py).
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Handler, Middleware

from shared.config import is_guid

from .issuer import TENANT_TEMPLATE, mint_user_token
from .layout import DEV_SIGNIN_ENV, ISSUER_KEY_FILES
from .signing import SigningKey

PATH = "/.devstack/token"
TOKEN_MINUTES = 60
USER_PATTERN = re.compile(r"[A-Za-z0-9._@-]{1,64}")
MAX_BODY_BYTES = 1024


def _is_loopback(host: str | None) -> bool:
    if host == "localhost":
        return True
    try:
        return host is not None and ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _refuse(status: int, detail: str) -> web.Response:
    return web.json_response({"error": detail}, status=status, headers={"Cache-Control": "no-store"})


FIELDS = frozenset({"user", "issuer", "tenant"})


@dataclass(frozen=True)
class DevSignin:
    key: SigningKey
    issuer: str
    audience: str
    tenant_id: str
    # The other dev issuers: name -> (key, `iss`; the Entra-style one's a template).
    others: Mapping[str, tuple[SigningKey, str]] = field(default_factory=dict)

    @staticmethod
    def config(*, key_file: Path, env: Mapping) -> str:
        """The DEVHOST_DEV_SIGNIN value `devstack up` hands the dev host: a path, never the key."""
        others = {
            name: {"keyFile": str(key_file.parent / ISSUER_KEY_FILES[name]), "issuer": issuer}
            for name, issuer in (env.get("issuers") or {}).items()
            if name != "dev" and (key_file.parent / ISSUER_KEY_FILES[name]).exists()
        }
        return json.dumps(
            {
                "keyFile": str(key_file),
                "issuer": env["issuer"],
                "audience": env["audience"],
                "tenantId": env["tenant_id"],
                "others": others,
            }
        )

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> DevSignin | None:
        raw = environ.get(DEV_SIGNIN_ENV)
        if not raw:
            return None
        config = json.loads(raw)
        return cls(
            key=SigningKey.load(Path(config["keyFile"])),
            issuer=config["issuer"],
            audience=config["audience"],
            tenant_id=config["tenantId"],
            others={
                name: (SigningKey.load(Path(other["keyFile"])), other["issuer"])
                for name, other in (config.get("others") or {}).items()
            },
        )

    def middleware(self) -> Middleware:
        @web.middleware
        async def dev_signin(request: web.Request, handler: Handler) -> web.StreamResponse:
            if request.rel_url.raw_path != PATH:
                return await handler(request)
            return await self.handle(request)

        return dev_signin

    async def handle(self, request: web.Request) -> web.Response:
        if request.method != "POST":
            return web.Response(status=405, headers={"Allow": "POST"})
        if not _is_loopback(request.remote) or not _is_loopback(request.url.host):
            return _refuse(403, "dev sign-in answers loopback callers at a loopback address only")
        origin = request.headers.get("Origin")
        own_origin = f"{request.scheme}://{request.host}".lower()
        if origin is not None and origin.rstrip("/").lower() != own_origin:
            return _refuse(403, "dev sign-in answers pages served by this dev host only")
        if request.query_string:
            return _refuse(400, 'no query string: send {"user": "..."} as JSON')
        if request.content_type != "application/json":
            return _refuse(415, 'send {"user": "..."} as application/json')
        raw = await request.content.read(MAX_BODY_BYTES + 1)
        try:
            body = json.loads(raw) if len(raw) <= MAX_BODY_BYTES else None
        except (UnicodeDecodeError, json.JSONDecodeError):
            body = None
        if not isinstance(body, dict) or not set(body) <= FIELDS:
            body = {}
        user = body.get("user")
        if not isinstance(user, str) or not USER_PATTERN.fullmatch(user):
            return _refuse(400, 'body must be {"user": "<1-64 of A-Z a-z 0-9 . _ @ ->"}')
        signer = self._signer(body.get("issuer", "dev"), body.get("tenant"))
        if signer is None:
            names = ", ".join(["dev", *self.others])
            return _refuse(400, f"issuer must be one of {names}; entra needs a tenant id (a GUID)")
        key, issuer, tenant = signer
        token = mint_user_token(
            key=key,
            issuer=issuer,
            audience=self.audience,
            user=user,
            roles=(),
            minutes=TOKEN_MINUTES,
            tenant_id=tenant,
        )
        return web.json_response(
            {"token": token, "expiresInMinutes": TOKEN_MINUTES}, headers={"Cache-Control": "no-store"}
        )

    def _signer(self, name: object, tenant: object) -> tuple[SigningKey, str, str] | None:
        """(key, iss, tid) for the dev issuer named; None for an unknown one or a bad tenant."""
        if name == "dev" and tenant is None:
            return self.key, self.issuer, self.tenant_id
        if not isinstance(name, str) or name not in self.others:
            return None
        key, issuer = self.others[name]
        if TENANT_TEMPLATE not in issuer:
            return (key, issuer, self.tenant_id) if tenant is None else None
        if not isinstance(tenant, str) or not is_guid(tenant, canonical=True):
            return None
        return key, issuer.replace(TENANT_TEMPLATE, tenant), tenant
