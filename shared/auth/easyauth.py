"""App Service Authentication ("Easy Auth"): the principal the platform's front end validated.

Easy Auth validates the token at the front end and passes the principal on in a header; the
platform strips any client-supplied copy. Only use this mode with Easy Auth switched on and set to
reject unauthenticated requests.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping

from .. import jsonlimits
from ..errors import Unauthenticated
from ..settings import Settings
from .caller import Caller, caller_from_claims

PRINCIPAL_HEADER = "x-ms-client-principal"
PRINCIPAL_IDP_HEADER = "x-ms-client-principal-idp"
_CLAIM_ALIASES = {
    "oid": ("oid", "http://schemas.microsoft.com/identity/claims/objectidentifier"),
    "tid": ("tid", "http://schemas.microsoft.com/identity/claims/tenantid"),
    "sub": ("sub", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier"),
    "iss": ("iss",),
}


class EasyAuthAuthenticator:
    """The caller from the x-ms-client-principal header, its claims read as a JWT's would be."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        encoded = headers.get(PRINCIPAL_HEADER)
        if not encoded:
            raise Unauthenticated("No authenticated principal: is App Service Authentication on?", error=None)
        try:
            principal = jsonlimits.loads(base64.b64decode(encoded, validate=True))
            raw_claims = principal["claims"]
            role_type = principal.get("role_typ") or "roles"
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise Unauthenticated("The client principal header is malformed.") from None
        claims: dict[object, object] = {}  # as the platform sent them; caller_from_claims checks types
        roles: list[object] = []
        for claim in raw_claims if isinstance(raw_claims, list) else []:
            if not isinstance(claim, dict):
                continue
            typ, val = claim.get("typ"), claim.get("val")
            if typ in (role_type, "roles"):
                roles.append(val)
            else:
                claims.setdefault(typ, val)
        for short, aliases in _CLAIM_ALIASES.items():
            for alias in aliases:
                if alias in claims:
                    claims.setdefault(short, claims[alias])
        claims["roles"] = roles
        issuer = claims.get("iss") or headers.get(PRINCIPAL_IDP_HEADER) or "easyauth"
        return caller_from_claims(claims, issuer=str(issuer), user_claim=self.settings.user_claim)
