"""Who is calling: a bearer JWT from the app's OpenID Connect issuer, or an Easy Auth principal.

JWT validation is complete or it is nothing: the algorithm must be on the allow-list before any
key is looked up (no "none", no HS256 keyed with a public key), the key comes from the issuer's
own discovery document, and iss, aud, exp and nbf are all checked. Keys are cached per worker and
refetched at most once a minute for an unknown `kid`, so forged kids cannot make us hammer the IdP;
while the IdP fails, known keys serve from the stale cache (bounded) and refreshes back off
(`JwksCache`). Every JSON segment is parsed with bounds (`shared.jsonlimits`): never a 500.

A token that passed all of that is remembered (by its SHA-256, at most VERIFIED_CACHE_SIZE of them,
like an API gateway's JWT cache): presented again, it costs a lookup instead of a signature check,
for as long as it has not expired and the key that verified it is still the issuer's current one.
Only tokens that passed are remembered; anything else takes the full path every time.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hashlib
import logging
import math
import re
import time
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
import jwt

from . import jsonlimits
from .errors import Unauthenticated, Unavailable
from .settings import Settings

log = logging.getLogger("acs_token_service.auth")

MAX_TOKEN_BYTES = 16 * 1024
LEEWAY_SECONDS = 60
KEYS_TTL_SECONDS = 3600  # a fetched key set is fresh this long, or as long as its max-age says
KEYS_MIN_TTL_SECONDS = 5  # ... but never less: at most one refresh per 5 s per worker, whatever it says
KEYS_MAX_STALE_SECONDS = 6 * 3600  # known keys serve this long after their fetch while refreshes fail
UNKNOWN_KID_REFETCH_SECONDS = 60
REFRESH_TIMEOUT_SECONDS = 5.0  # discovery + JWKS together; a slower IdP counts as down
REFRESH_BACKOFF_SECONDS = 1.0  # after a failed refresh; doubling per failure in a row
REFRESH_BACKOFF_MAX_SECONDS = 60.0
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,9})", re.IGNORECASE)
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
    # When the issuer says it issued the bearer (`iat`), for refusing bearers from before an event
    # ended the user's sessions; None when the token (or an Easy Auth principal) carries none.
    issued_at: dt.datetime | None = None

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
    )


class JwksCache:
    """The issuer's signing keys, from its discovery document, fetched lazily and shared per worker.

    One refresh at a time, as a task of its own, and no request waits for it while the cache has
    its key: past the key set's TTL (an hour, or the JWKS's shorter max-age) a known kid is served
    from the stale set while the refresh runs, and while refreshes fail, for at most
    KEYS_MAX_STALE_SECONDS after the last good fetch. A failed refresh backs off (1 s doubling to
    60 s); a kid the set lacks starts one at most once a minute, whatever became of the last.
    Requests that need a fetch share the one in flight, bounded by its deadline; while the IdP
    fails and nothing usable is cached, they get 503 issuer_unavailable with Retry-After at once.
    """

    def __init__(self, issuer: str, session_factory=aiohttp.ClientSession, clock=time.monotonic) -> None:
        self.issuer = issuer
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # the last good refresh
        self._ttl: float = KEYS_TTL_SECONDS
        self._max_age: int | None = None  # Cache-Control max-age of the last answer read
        self._attempted_at: float | None = None  # the last refresh started, whatever its outcome
        self._failures = 0  # failed refreshes in a row
        self._retry_at = 0.0  # no refresh starts before this while failing (backoff)
        self._error: Unavailable | None = None  # why the last refresh failed
        self._refreshing: asyncio.Task[bool] | None = None
        self.fetches = 0  # how many times the JWKS was downloaded; benchmarks and tests read it
        self.attempts = 0  # refreshes started, failed ones included

    async def close(self) -> None:
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # its event loop is gone already (tests): nothing left to stop
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def settled(self) -> None:
        """Wait for the refresh in flight, if any (tests: a stale key's refresh runs in the background)."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)

    async def _get_json(self, url: str) -> dict:
        if self._session is None:
            self._session = self._session_factory(
                timeout=aiohttp.ClientTimeout(total=REFRESH_TIMEOUT_SECONDS)
            )
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise Unavailable(
                        f"The identity provider answered {response.status} for {url}.",
                        code="issuer_unavailable",
                    )
                body = await response.json(content_type=None)
                found = _MAX_AGE.search(response.headers.get("Cache-Control", ""))
                self._max_age = int(found.group(1)) if found else None
        except (TimeoutError, aiohttp.ClientError, ValueError, RecursionError) as err:
            # ValueError: JSONDecodeError, UnicodeDecodeError, the int-digit limit
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
        max_age = self._max_age
        entries = document.get("keys")
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid:
                continue
            try:
                keys[kid] = jwt.PyJWK(entry)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue  # a key type we do not use, or a malformed entry
        if not keys:  # keep the keys we have rather than refuse every caller
            raise Unavailable("The issuer's JWKS has no signing key we can use.", code="issuer_unavailable")
        ttl = KEYS_TTL_SECONDS if max_age is None else min(max_age, KEYS_TTL_SECONDS)
        self._keys, self._fetched_at, self._ttl = keys, self._clock(), max(KEYS_MIN_TTL_SECONDS, ttl)
        self.fetches += 1

    async def _run_refresh(self) -> bool:
        """One refresh under its deadline; never raises: the outcome is the cache's state."""
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                await self._refresh()
        except Exception as err:  # noqa: BLE001 - a failed refresh is a 503 or a stale key, never a 500
            if isinstance(err, Unavailable):
                error = err
            elif isinstance(err, TimeoutError):
                error = Unavailable(
                    f"The identity provider did not answer within {REFRESH_TIMEOUT_SECONDS:g} s.",
                    code="issuer_unavailable",
                )
            else:
                error = Unavailable(
                    f"The identity provider's keys could not be read ({type(err).__name__}).",
                    code="issuer_unavailable",
                )
            self._failures += 1
            doubled = REFRESH_BACKOFF_SECONDS * 2 ** min(self._failures - 1, 16)
            backoff = min(REFRESH_BACKOFF_MAX_SECONDS, doubled)
            self._retry_at, self._error = self._clock() + backoff, error
            log.warning(
                "issuer keys not refreshed (%s: %s); failure %d in a row, next try in %g s, cached keys %s",
                error.code,
                error.detail,
                self._failures,
                backoff,
                "none" if self._fetched_at is None else f"{self._clock() - self._fetched_at:.0f} s old",
            )
            return False
        finally:
            self._refreshing = None
        if self._failures:
            log.info("issuer keys refreshed after %d failed attempts", self._failures)
        self._failures, self._retry_at, self._error = 0, 0.0, None
        return True

    def _start_refresh(self, now: float) -> asyncio.Task[bool]:
        self._attempted_at = now
        self.attempts += 1
        self._refreshing = asyncio.get_running_loop().create_task(self._run_refresh(), name="jwks-refresh")
        return self._refreshing

    def _age(self, now: float) -> float:
        return math.inf if self._fetched_at is None else now - self._fetched_at

    def _wait_for_fetch(self, now: float, *, unknown_kid: bool) -> float:
        """Seconds until a request that needs the IdP may start a refresh (<= 0: now)."""
        wait = self._retry_at - now
        if unknown_kid and self._attempted_at is not None:
            wait = max(wait, self._attempted_at + UNKNOWN_KID_REFETCH_SECONDS - now)
        return wait

    def _unavailable(self, wait: float) -> Unavailable:
        error = self._error
        return Unavailable(
            error.detail if error else "The identity provider is unavailable.",
            code=error.code if error else "issuer_unavailable",
            retry_after=max(1, math.ceil(wait)),
        )

    def is_current(self, kid: str, key: jwt.PyJWK) -> bool:
        """`key` is what `key(kid)` would return now, without a refetch (no I/O)."""
        return self._keys.get(kid) is key and self._age(self._clock()) < self._ttl

    async def key(self, kid: str) -> jwt.PyJWK:
        now = self._clock()
        age = self._age(now)
        cached = self._keys.get(kid)
        if cached is not None and age < self._ttl:
            return cached
        usable = age < KEYS_MAX_STALE_SECONDS  # the set we have may still answer for its kids
        if cached is not None and usable:
            if self._refreshing is None and now >= self._retry_at:
                self._start_refresh(now)  # in the background: this request does not wait for it
            return cached
        # Nothing usable for this kid: it needs the IdP's current key set.
        task = self._refreshing
        if task is None:
            wait = self._wait_for_fetch(now, unknown_kid=usable)
            if wait > 0:
                if self._failures:
                    raise self._unavailable(wait)
                raise Unauthenticated("The token is signed with a key the issuer does not publish.")
            task = self._start_refresh(now)
        # Shared with every request that needs it; shielded, so a caller that gives up does not
        # cancel it for the others. Bounded by the refresh's own deadline.
        if not await asyncio.shield(task):
            now = self._clock()
            usable = self._age(now) < KEYS_MAX_STALE_SECONDS
            raise self._unavailable(self._wait_for_fetch(now, unknown_kid=usable))
        cached = self._keys.get(kid)
        if cached is None:
            raise Unauthenticated("The token is signed with a key the issuer does not publish.")
        return cached


def unverified_segment(token: str, index: int) -> dict | None:
    """JWT segment `index` (0 header, 1 payload) as a JSON object, NOT verified; None if not a JWT.

    Only for choosing (algorithm, key) or refusing early: `jwt.decode` checks everything that is
    trusted. Cheaper than `jwt.get_unverified_header`, which decodes and checks every segment.
    Bounded (`jsonlimits`): deep nesting or a 5000-digit number is "not a JWT", never a 500.
    """
    parts = token.split(".")
    if len(parts) != 3 or not parts[index]:
        return None
    segment = parts[index]
    try:
        value = jsonlimits.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))
    except (binascii.Error, ValueError):  # also UnicodeDecodeError, JSONDecodeError, TooDeep
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
            if not isinstance(alg, str) or len(alg) > 20:  # never echo an attacker's blob in headers
                raise Unauthenticated("The token's algorithm (alg) is not accepted.")
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
            principal = jsonlimits.loads(base64.b64decode(encoded, validate=True))
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
