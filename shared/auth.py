"""Who is calling: a bearer JWT from the app's OpenID Connect issuer, or an Easy Auth principal.

JWT validation is complete or it is nothing: the algorithm must be on the allow-list before any
key is looked up (no "none", no HS256 keyed with a public key), the key comes from the issuer's
own discovery document, and iss, aud, exp and nbf are all checked. Keys are cached per worker and
refetched at most once a minute for an unknown `kid`, so forged kids cannot make us hammer the IdP.

A token that passed all of that is remembered (by its SHA-256, at most VERIFIED_CACHE_SIZE of them,
like an API gateway's JWT cache): presented again, it costs a lookup instead of a signature check,
for as long as it has not expired and the key that verified it is still the issuer's current one.
Only tokens that passed are remembered; anything else takes the full path every time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import jwt

from .errors import Unauthenticated, Unavailable
from .settings import Settings

MAX_TOKEN_BYTES = 16 * 1024
LEEWAY_SECONDS = 60
KEYS_TTL_SECONDS = 3600
UNKNOWN_KID_REFETCH_SECONDS = 60
VERIFIED_CACHE_SIZE = 8192
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

    def has_role(self, role: str) -> bool:
        return role in self.roles


def _bearer(authorization: str | None) -> str:
    if not authorization:
        raise Unauthenticated("A bearer token is required.", error=None)
    scheme, _, token = authorization.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise Unauthenticated("The Authorization header must be 'Bearer <token>'.", error="invalid_request")
    if len(token) > MAX_TOKEN_BYTES:
        raise Unauthenticated("The bearer token is too large.")
    return token


def _caller_from_claims(claims: Mapping, *, issuer: str, user_claim: str) -> Caller:
    subject = claims.get(user_claim)
    if not isinstance(subject, str) or not subject:
        raise Unauthenticated(f"The token has no '{user_claim}' claim to identify the user.")
    roles = claims.get("roles", [])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list):
        roles = []
    oid, tid = claims.get(OID_CLAIM), claims.get(TID_CLAIM)
    return Caller(
        issuer=issuer,
        subject=subject,
        roles=frozenset(r for r in roles if isinstance(r, str)),
        object_id=oid if isinstance(oid, str) and oid else None,
        tenant_id=tid if isinstance(tid, str) and tid else None,
    )


class JwksCache:
    """The issuer's signing keys, from its discovery document, fetched lazily and shared per worker."""

    def __init__(self, issuer: str, session_factory=aiohttp.ClientSession) -> None:
        self.issuer = issuer
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at = 0.0
        self._lock = asyncio.Lock()
        self.fetches = 0  # how many times the JWKS was downloaded; benchmarks and tests read it

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _get_json(self, url: str) -> dict:
        if self._session is None:
            self._session = self._session_factory(timeout=aiohttp.ClientTimeout(total=10))
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise Unavailable(
                        f"The identity provider answered {response.status} for {url}.",
                        code="issuer_unavailable",
                    )
                body = await response.json(content_type=None)
        except (TimeoutError, aiohttp.ClientError, json.JSONDecodeError, UnicodeDecodeError) as err:
            raise Unavailable(
                f"The identity provider could not be reached ({type(err).__name__}).",
                code="issuer_unavailable",
            ) from None
        if not isinstance(body, dict):
            raise Unavailable(f"{url} did not return a JSON object.", code="issuer_unavailable")
        return body

    async def _refresh(self) -> None:
        discovery = await self._get_json(self.issuer.rstrip("/") + "/.well-known/openid-configuration")
        if discovery.get("issuer") != self.issuer:
            raise Unavailable(
                "The discovery document names another issuer than AUTH_ISSUER.", code="issuer_mismatch"
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise Unavailable("The discovery document has no jwks_uri.", code="issuer_unavailable")
        document = await self._get_json(jwks_uri)
        keys: dict[str, jwt.PyJWK] = {}
        for entry in document.get("keys", []):
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig" or "kid" not in entry:
                continue
            try:
                keys[entry["kid"]] = jwt.PyJWK(entry)
            except jwt.PyJWTError:
                continue  # a key type we do not use
        self._keys, self._fetched_at = keys, time.monotonic()
        self.fetches += 1

    def is_current(self, kid: str, key: jwt.PyJWK) -> bool:
        """`key` is what `key(kid)` would return now, without a refetch (no I/O)."""
        return self._keys.get(kid) is key and time.monotonic() - self._fetched_at < KEYS_TTL_SECONDS

    async def key(self, kid: str) -> jwt.PyJWK:
        now = time.monotonic()
        if kid in self._keys and now - self._fetched_at < KEYS_TTL_SECONDS:
            return self._keys[kid]
        async with self._lock:
            stale = time.monotonic() - self._fetched_at
            if (kid not in self._keys and stale >= UNKNOWN_KID_REFETCH_SECONDS) or stale >= KEYS_TTL_SECONDS:
                try:
                    await self._refresh()
                except Unavailable:
                    if kid not in self._keys:
                        raise
                    # The IdP is briefly unreachable but this key was published: keep using it.
        if kid not in self._keys:
            raise Unauthenticated("The token is signed with a key the issuer does not publish.")
        return self._keys[kid]


def unverified_segment(token: str, index: int) -> dict | None:
    """JWT segment `index` (0 header, 1 payload) as a JSON object, NOT verified; None if not a JWT.

    Only for choosing (algorithm, key) or refusing early: `jwt.decode` checks everything that is
    trusted. Cheaper than `jwt.get_unverified_header`, which decodes and checks every segment.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[index]:
        return None
    segment = parts[index]
    try:
        value = json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):  # also UnicodeDecodeError and JSONDecodeError
        return None
    return value if isinstance(value, dict) else None


def _unverified_header(token: str) -> dict:
    """The JOSE header, to pick the algorithm and key; decoding it twice cost a tenth of a refresh."""
    header = unverified_segment(token, 0)
    if header is None:
        raise Unauthenticated("The bearer token is not a JWT.")
    return header


class JwtAuthenticator:
    def __init__(self, settings: Settings, keys: JwksCache) -> None:
        self.settings = settings
        self.keys = keys
        # sha256(token) -> (caller, exp, kid, key): tokens that passed every check.
        self._verified: OrderedDict[bytes, tuple[Caller, int, str, jwt.PyJWK]] = OrderedDict()
        self.verifications = 0  # full validations (signature checked); tests and benchmarks read it

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        token = _bearer(headers.get("authorization"))
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        known = self._verified.get(digest)
        if known is not None:
            caller, exp, kid, key = known
            # PyJWT's own expiry rule (expired when exp <= now - leeway), and the same key as now.
            if time.time() < exp + LEEWAY_SECONDS and self.keys.is_current(kid, key):
                self._verified.move_to_end(digest)
                return caller
            del self._verified[digest]  # the full path below says why it no longer passes
        caller, exp, kid, key = await self._verify(token)
        self._verified[digest] = (caller, exp, kid, key)
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return caller

    async def _verify(self, token: str) -> tuple[Caller, int, str, jwt.PyJWK]:
        self.verifications += 1
        header = _unverified_header(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in self.settings.algorithms:
            raise Unauthenticated(f"Tokens signed with {alg!r} are not accepted.")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("The token header has no key id (kid).")
        key = await self.keys.key(kid)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=list(self.settings.audiences),
                issuer=self.settings.issuer,
                leeway=LEEWAY_SECONDS,
                options={"require": ["exp", "iss", "aud"], "verify_nbf": True, "verify_iat": True},
            )
        except jwt.ExpiredSignatureError:
            raise Unauthenticated("The token has expired.") from None
        except jwt.ImmatureSignatureError:
            raise Unauthenticated("The token is not valid yet (nbf).") from None
        except jwt.InvalidAudienceError:
            raise Unauthenticated("The token is for another audience.") from None
        except jwt.InvalidIssuerError:
            raise Unauthenticated("The token is from another issuer.") from None
        except jwt.PyJWTError:
            raise Unauthenticated("The token signature or claims are invalid.") from None
        caller = _caller_from_claims(claims, issuer=self.settings.issuer, user_claim=self.settings.user_claim)
        return caller, int(claims["exp"]), kid, key


# App Service Authentication ("Easy Auth") validates the token at the front end and passes the
# principal on in this header; the platform strips any client-supplied copy. Only use this mode
# with Easy Auth switched on and set to reject unauthenticated requests.
PRINCIPAL_HEADER = "x-ms-client-principal"
PRINCIPAL_IDP_HEADER = "x-ms-client-principal-idp"
_CLAIM_ALIASES = {
    "oid": ("oid", "http://schemas.microsoft.com/identity/claims/objectidentifier"),
    "tid": ("tid", "http://schemas.microsoft.com/identity/claims/tenantid"),
    "sub": ("sub", "http://schemas.xmlsoap.org/ws/2005/05/identity/claims/nameidentifier"),
    "iss": ("iss",),
}


class EasyAuthAuthenticator:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        encoded = headers.get(PRINCIPAL_HEADER)
        if not encoded:
            raise Unauthenticated("No authenticated principal: is App Service Authentication on?", error=None)
        try:
            principal = json.loads(base64.b64decode(encoded, validate=True))
            raw_claims = principal["claims"]
            role_type = principal.get("role_typ") or "roles"
        except (binascii.Error, ValueError, KeyError, TypeError):
            raise Unauthenticated("The client principal header is malformed.") from None
        claims: dict[str, object] = {}
        roles: list[str] = []
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
        return _caller_from_claims(claims, issuer=str(issuer), user_claim=self.settings.user_claim)
