"""Bearer JWT validation: complete or nothing.

The token's `iss` selects the one trusted issuer it is checked against (shared/issuers.py): an
issuer nobody trusts is refused before any key is looked up or fetched. The algorithm must be on
that issuer's allow-list (no "none", no HS256 keyed with a public key), the key comes from that
issuer's own discovery document (its `JwksCache`: one issuer's keys never check another's tokens),
and iss, aud, exp and nbf are all checked; for an Entra multi-tenant issuer, `tid` must be the
tenant its `iss` names. Every JSON segment is parsed with bounds (`shared.jsonlimits`): never a 500.

A token that passed all of that is remembered (by its SHA-256, at most VERIFIED_CACHE_SIZE of them,
like an API gateway's JWT cache): presented again, it costs a lookup instead of a signature check,
for as long as it has not expired and the key that verified it is still the issuer's current one.
Only tokens that passed are remembered; anything else takes the full path every time.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import time
from collections import OrderedDict
from collections.abc import Mapping

import jwt

from .. import jsonlimits
from ..errors import Unauthenticated
from ..issuers import TrustedIssuer, TrustedIssuers
from .caller import Caller, caller_from_claims
from .jwks import JwksCache

MAX_TOKEN_BYTES = 16 * 1024
LEEWAY_SECONDS = 60
VERIFIED_CACHE_SIZE = 8192


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
    """The caller a bearer JWT names, after every check; tokens that passed are remembered."""

    def __init__(self, trusted: TrustedIssuers, keys: Mapping[str, JwksCache]) -> None:
        """`keys`: each trusted issuer's key cache, by its `issuer`."""
        self.trusted = trusted
        self.keys = keys
        # sha256(token) -> (caller, exp, kid, key, keys): tokens that passed every check.
        self._verified: OrderedDict[bytes, tuple[Caller, int, str, jwt.PyJWK, JwksCache]] = OrderedDict()
        self.verifications = 0  # full validations (signature checked); tests and benchmarks read it

    async def authenticate(self, headers: Mapping[str, str]) -> Caller:
        token = _bearer(headers.get("authorization"))
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        known = self._verified.get(digest)
        if known is not None:
            caller, exp, kid, key, keys = known
            # PyJWT's own expiry rule (expired when exp <= now - leeway), and the same key as now.
            if time.time() < exp + LEEWAY_SECONDS and keys.is_current(kid, key):
                self._verified.move_to_end(digest)
                return caller
            del self._verified[digest]  # the full path below says why it no longer passes
        verified = await self._verify(token)
        self._verified[digest] = verified
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return verified[0]

    def _issuer(self, token: str) -> tuple[TrustedIssuer, str, str | None]:
        """The trusted issuer the unverified `iss` selects, that `iss`, and a template's tenant."""
        payload = unverified_segment(token, 1)
        iss = payload.get("iss") if payload is not None else None
        selected = self.trusted.select(iss)
        if selected is None or not isinstance(iss, str):
            raise Unauthenticated("The token is from an issuer this service does not trust.")
        return selected[0], iss, selected[1]

    async def _verify(self, token: str) -> tuple[Caller, int, str, jwt.PyJWK, JwksCache]:
        self.verifications += 1
        header = _unverified_header(token)
        trusted, iss, tenant = self._issuer(token)
        alg, kid = header.get("alg"), header.get("kid")
        if alg not in trusted.algorithms:
            if not isinstance(alg, str) or len(alg) > 20:  # never echo an attacker's blob in headers
                raise Unauthenticated("The token's algorithm (alg) is not accepted.")
            raise Unauthenticated(f"Tokens signed with {alg!r} are not accepted.")
        if not isinstance(kid, str) or not kid:
            raise Unauthenticated("The token header has no key id (kid).")
        keys = self.keys[trusted.issuer]
        key = await keys.key(kid)
        try:
            claims = jwt.decode(
                token,
                key.key,
                algorithms=[alg],
                audience=list(trusted.audiences),
                issuer=iss,
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
        if tenant is not None and str(claims.get("tid", "")).lower() != tenant.lower():
            # Entra: a multi-tenant token's tid must be the tenant in its iss (its keys are shared).
            raise Unauthenticated("The token's tenant (tid) is not the one its issuer names.")
        caller = caller_from_claims(claims, issuer=iss, user_claim=trusted.user_claim, trusted=trusted)
        return caller, int(claims["exp"]), kid, key, keys
