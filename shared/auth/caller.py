"""The authenticated caller, read from verified claims the same way whichever way it authenticated."""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from dataclasses import dataclass

from ..errors import Unauthenticated
from ..issuers import ADMIN_ROLE, TrustedIssuer

OID_CLAIM = "oid"
TID_CLAIM = "tid"


@dataclass(frozen=True)
class Caller:
    """An authenticated app user. (issuer, subject) is the identity key; oid/tid serve Graph events."""

    issuer: str
    subject: str
    roles: frozenset[str] = frozenset()
    object_id: str | None = None
    tenant_id: str | None = None
    # When the issuer says it issued the bearer (`iat`), for refusing bearers from before an event
    # ended the user's sessions; None when the token (or an Easy Auth principal) carries none.
    issued_at: dt.datetime | None = None
    # The trusted issuer that vouched for it, whose policy applies (None: Easy Auth's principal).
    trusted: TrustedIssuer | None = None

    @property
    def admin_role(self) -> str | None:
        """The app role that makes this caller an admin; None: its issuer has none."""
        return self.trusted.admin_role if self.trusted is not None else ADMIN_ROLE

    def has_role(self, role: str) -> bool:
        return role in self.roles


def caller_from_claims(
    claims: Mapping, *, issuer: str, user_claim: str, trusted: TrustedIssuer | None = None
) -> Caller:
    """The Caller that verified claims name; refused when they name no user."""
    subject = claims.get(user_claim)
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated(f"The token has no '{user_claim}' claim to identify the user.")
    roles = claims.get("roles", [])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list):
        roles = []
    oid, tid = claims.get(OID_CLAIM), claims.get(TID_CLAIM)
    iat = claims.get("iat")
    if isinstance(iat, str) and iat.isdigit() and len(iat) <= 11:  # Easy Auth claims are strings
        iat = int(iat)
    issued_at = None
    if isinstance(iat, int | float) and not isinstance(iat, bool) and 0 < iat < 2**33:
        issued_at = dt.datetime.fromtimestamp(iat, dt.UTC)
    return Caller(
        issuer=issuer,
        subject=subject,
        roles=frozenset(r for r in roles if isinstance(r, str)),
        object_id=oid if isinstance(oid, str) and oid else None,
        tenant_id=tid if isinstance(tid, str) and tid else None,
        issued_at=issued_at,
        trusted=trusted,
    )
