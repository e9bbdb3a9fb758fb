"""The identity providers the service trusts: one (AUTH_ISSUER and its settings) or a list
(AUTH_ISSUERS), and which one a token's `iss` selects.

A token is validated against the one entry its `iss` names, never by trying every key set: an
`iss` no entry names is refused before any network call (no discovery, so no SSRF through `iss`).
An entry is an exact issuer, or an Entra multi-tenant template naming `{tenantid}`, as
Microsoft.Identity.Web validates them: `https://login.microsoftonline.com/{tenantid}/v2.0` matches
the tenants on its allow-list (or any, when `anyTenant` says so), its keys are Entra's common set
(the `common` discovery document, whose `issuer` is the template itself), and the token's `tid`
must be the tenant its `iss` names. In a list, an entry's users are admins only through the
`adminRole` it names, and a template names none: each customer tenant assigns its own app roles.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from . import jsonlimits
from .config import https_url, is_guid

TENANT = "{tenantid}"
ADMIN_ROLE = "TokenService.Admin"
ENTRY_FIELDS = frozenset(
    {
        "issuer",
        "audiences",
        "algorithms",
        "userClaim",
        "tenants",
        "anyTenant",
        "allowedScopes",
        "maxExpiresInMinutes",
        "adminRole",
        "metadata",
    }
)


@dataclass(frozen=True)
class TrustedIssuer:
    """One identity provider, and the policy for its users where it differs from the service's."""

    issuer: str  # exactly as in `iss`, or a template naming TENANT
    audiences: tuple[str, ...]
    algorithms: tuple[str, ...]
    user_claim: str = "sub"
    tenants: frozenset[str] = frozenset()  # a template's allow-list, lower case
    any_tenant: bool = False  # a template accepting every tenant: only when the operator says so
    allowed_scopes: tuple[str, ...] | None = None  # None: TOKEN_ALLOWED_SCOPES
    max_minutes: int | None = None  # None: TOKEN_MAX_MINUTES
    # The app role its admins hold; None: its users are never admins (AUTH_ISSUERS' default).
    admin_role: str | None = ADMIN_ROLE
    metadata: str | None = None  # its discovery document's URL, where not at the issuer's own

    @property
    def multi_tenant(self) -> bool:
        return TENANT in self.issuer

    @property
    def metadata_url(self) -> str:
        """Its discovery document: given, or the issuer's own; a template's is the `common`
        tenant's (Entra), whose `issuer` is the template itself."""
        if self.metadata:
            return self.metadata
        return self.issuer.replace(TENANT, "common").rstrip("/") + "/.well-known/openid-configuration"

    def tenant_of(self, iss: str) -> str | None:
        """The tenant id a template's `iss` names, if `iss` matches it and the tenant is allowed."""
        tenant = _tenant_in(self.issuer, iss)
        if tenant is None or not (self.any_tenant or tenant in self.tenants):
            return None
        return tenant


def _tenant_in(template: str, iss: str) -> str | None:
    """The tenant id in `iss` where the template has TENANT: a GUID as Entra writes it (lower case)."""
    prefix, _, suffix = template.partition(TENANT)
    if not (iss.startswith(prefix) and iss.endswith(suffix) and len(iss) == len(prefix) + 36 + len(suffix)):
        return None
    tenant = iss[len(prefix) : len(prefix) + 36]
    return tenant if is_guid(tenant, canonical=True) else None


class TrustedIssuers:
    """Which entry an `iss` selects: an exact one first, then a template's allowed tenant."""

    def __init__(self, entries: tuple[TrustedIssuer, ...]) -> None:
        self.entries = entries
        self._exact = {e.issuer: e for e in entries if not e.multi_tenant}
        self._templates = [e for e in entries if e.multi_tenant]

    def select(self, iss: object) -> tuple[TrustedIssuer, str | None] | None:
        """(entry, tenant id for a template's) or None: no entry trusts this `iss`."""
        if not isinstance(iss, str):
            return None
        if (entry := self._exact.get(iss)) is not None:
            return entry, None
        for entry in self._templates:
            if (tenant := entry.tenant_of(iss)) is not None:
                return entry, tenant
        return None

    def object_id_issuers(self, tenant_id: str) -> tuple[str, ...]:
        """The issuers whose users in this Entra tenant would be keyed by object id (`userClaim`
        oid): where a Microsoft Graph event, naming (tenant, object id), finds them directly."""
        tenant = tenant_id.lower()
        found = []
        for entry in self.entries:
            if entry.user_claim != "oid":
                continue
            if not entry.multi_tenant:
                found.append(entry.issuer)
            elif entry.tenant_of(entry.issuer.replace(TENANT, tenant)) is not None:
                found.append(entry.issuer.replace(TENANT, tenant))
        return tuple(found)


# ---- AUTH_ISSUERS ---------------------------------------------------------------------------------


def parse(
    raw: str, *, safe_algorithms: tuple[str, ...], scopes: tuple[str, ...]
) -> tuple[TrustedIssuer, ...]:
    """AUTH_ISSUERS' JSON array; ValueError naming the first wrong field (`[1].audiences: ...`)."""
    try:
        value = jsonlimits.loads(raw)
    except (ValueError, jsonlimits.TooDeep):  # also JSONDecodeError
        raise ValueError("must be a JSON array of issuer objects") from None
    if not isinstance(value, list) or not value:
        raise ValueError("must be a JSON array of at least one issuer object")
    entries = tuple(_entry(item, f"[{i}]", safe_algorithms, scopes) for i, item in enumerate(value))
    seen: set[str] = set()
    for i, entry in enumerate(entries):
        if entry.issuer in seen:
            raise ValueError(f"[{i}].issuer: {entry.issuer} is listed twice")
        seen.add(entry.issuer)
        for other in entries:  # an exact issuer would take a template's tenant from it, unseen
            if other.multi_tenant and not entry.multi_tenant and _tenant_in(other.issuer, entry.issuer):
                raise ValueError(f"[{i}].issuer: {entry.issuer} is a tenant of {other.issuer}: list it there")
    return entries


def _strings(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise ValueError(f"{where}: must be a non-empty string or array of strings")
    return tuple(dict.fromkeys(v.strip() for v in value))


def _entry(item: Any, at: str, safe_algorithms: tuple[str, ...], scopes: tuple[str, ...]) -> TrustedIssuer:
    if not isinstance(item, dict):
        raise ValueError(f"{at}: must be an object")
    unknown = sorted(set(item) - ENTRY_FIELDS)
    if unknown:
        raise ValueError(
            f"{at}: unknown field(s) {', '.join(unknown)}; known: {', '.join(sorted(ENTRY_FIELDS))}"
        )
    issuer = item.get("issuer")
    if not isinstance(issuer, str) or not issuer.strip():
        raise ValueError(f"{at}.issuer: required, the issuer exactly as in `iss`")
    issuer = issuer.strip()
    if issuer.count(TENANT) > 1 or re.search(r"\{(?!tenantid\})", issuer):
        raise ValueError(f"{at}.issuer: the only placeholder is {TENANT}, at most once")
    if "audiences" not in item:
        raise ValueError(f"{at}.audiences: required, the audience(s) of your API")
    audiences = _strings(item["audiences"], f"{at}.audiences")
    algorithms = _strings(item.get("algorithms", ["RS256"]), f"{at}.algorithms")
    if unsafe := [a for a in algorithms if a not in safe_algorithms]:
        raise ValueError(
            f"{at}.algorithms: {', '.join(unsafe)} not allowed; use {', '.join(safe_algorithms)}"
        )
    user_claim = item.get("userClaim", "sub")
    if not isinstance(user_claim, str) or not user_claim.strip():
        raise ValueError(f"{at}.userClaim: must be a claim name")
    tenants, any_tenant = _tenants(item, at, multi_tenant=TENANT in issuer)
    allowed = None
    if "allowedScopes" in item:
        allowed = _strings(item["allowedScopes"], f"{at}.allowedScopes")
        if unknown := [s for s in allowed if s not in scopes]:
            raise ValueError(f"{at}.allowedScopes: unknown {', '.join(unknown)}; known: {', '.join(scopes)}")
    max_minutes = item.get("maxExpiresInMinutes")
    if max_minutes is not None and (not isinstance(max_minutes, int) or isinstance(max_minutes, bool)):
        raise ValueError(f"{at}.maxExpiresInMinutes: must be an integer")
    # No admin role unless named: whoever assigns app roles at an issuer would otherwise act on
    # every user of every issuer through /api/manage. Never for a template: each customer
    # tenant's own admins assign its app roles.
    admin_role = item.get("adminRole")
    if admin_role is not None and (not isinstance(admin_role, str) or not admin_role.strip()):
        raise ValueError(f"{at}.adminRole: must be an app role name")
    if admin_role is not None and TENANT in issuer:
        raise ValueError(
            f"{at}.adminRole: not for an issuer naming {TENANT}: every tenant's own admins assign "
            "its app roles, so any of them could act on everyone's identities"
        )
    metadata = item.get("metadata")
    if metadata is not None and (not isinstance(metadata, str) or not metadata.strip()):
        raise ValueError(f"{at}.metadata: must be the URL of the issuer's discovery document")
    return TrustedIssuer(
        issuer=issuer,
        audiences=audiences,
        algorithms=algorithms,
        user_claim=user_claim.strip(),
        tenants=tenants,
        any_tenant=any_tenant,
        allowed_scopes=allowed,
        max_minutes=max_minutes,
        admin_role=admin_role.strip() if admin_role else None,
        metadata=metadata.strip() if metadata else None,
    )


def _tenants(item: dict, at: str, *, multi_tenant: bool) -> tuple[frozenset[str], bool]:
    """A template's allow-list, and whether it takes any tenant (`"anyTenant": true`, never by default)."""
    tenants, any_tenant = item.get("tenants"), item.get("anyTenant", False)
    if not multi_tenant:
        if tenants is not None or any_tenant:
            raise ValueError(f"{at}: tenants and anyTenant are for an issuer naming {TENANT}")
        return frozenset(), False
    if not isinstance(any_tenant, bool):
        raise ValueError(f"{at}.anyTenant: must be true or false")
    if any_tenant:
        if tenants is not None:
            raise ValueError(f"{at}: either tenants or anyTenant, not both")
        return frozenset(), True
    if tenants is None:
        raise ValueError(
            f"{at}.tenants: required for an issuer naming {TENANT}: the tenant ids to accept "
            '(or "anyTenant": true to accept every Entra tenant in the world)'
        )
    listed = _strings(tenants, f"{at}.tenants")
    if bad := [t for t in listed if not is_guid(t)]:
        raise ValueError(f"{at}.tenants: not tenant ids (GUIDs): {', '.join(bad)}")
    return frozenset(t.lower() for t in listed), False


def problem(entries: tuple[TrustedIssuer, ...], *, min_minutes: int, max_minutes: int) -> str | None:
    """What is wrong with the list given the other settings (issuer URLs, lifetimes), or None."""
    for i, entry in enumerate(entries):
        if url_problem := https_url(entry.issuer.replace(TENANT, "common"), http_on_loopback=True):
            return f"[{i}].issuer: {url_problem}"
        if entry.metadata and (url_problem := https_url(entry.metadata, http_on_loopback=True)):
            return f"[{i}].metadata: {url_problem}"
        if entry.max_minutes is not None and not min_minutes <= entry.max_minutes <= max_minutes:
            return f"[{i}].maxExpiresInMinutes: must be within {min_minutes}..{max_minutes}"
    return None
