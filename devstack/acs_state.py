"""The ACS Identity resource the emulator pretends to be: identities, tokens, faults, counters.

Pure state and rules, no HTTP: `acs_emulator` maps requests onto these methods and `AcsError`s onto
ACS's error bodies. Rules follow the 2023-10-01 REST spec and recorded service answers.
"""

from __future__ import annotations

import collections
import datetime as dt
import hashlib
import itertools
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field, fields
from typing import Literal, TypeIs

import jwt

from .signing import SigningKey

SCOPES = ("chat", "voip", "chat.join", "chat.join.limited", "voip.join")
MIN_MINUTES, MAX_MINUTES, DEFAULT_MINUTES = 60, 1440, 1440
TEAMS_AUDIENCE = "https://auth.msft.communication.azure.com"

# The API operations, as the stats hook counts them (create-and-issue counts as createIdentity).
OPERATIONS = (
    "createIdentity",
    "issueAccessToken",
    "revokeAccessTokens",
    "deleteIdentity",
    "exchangeTeamsToken",
)
# ACS limits a create that also issues a token (`createTokenWithScopes`) on its own, apart from
# plain creates and issues (shared REFERENCE.md, service limits): the emulator's name for it.
CREATE_AND_ISSUE = "createIdentityAndIssueAccessToken"
# Per resource and 30 s window, from the ACS service limits page.
LIMIT_WINDOW_SECONDS = 30.0
MAX_LIMIT_WINDOW_SECONDS = 3600.0
LIMITS = {
    "createIdentity": 1000,
    "issueAccessToken": 1000,
    CREATE_AND_ISSUE: 1000,
    "revokeAccessTokens": 500,
    "deleteIdentity": 500,
    "exchangeTeamsToken": 500,
}
# ACS: revocation "can take up to 15 minutes to propagate"; the delay fault may simulate no more.
MAX_REVOCATION_DELAY_SECONDS = 15 * 60
Seconds = float  # a fault field kind: a non-negative number of seconds
ServiceLimits = dict[str, float] | Literal[False]  # a fault field kind: see `service_limits`


class AcsError(Exception):
    """An error answer of the service: HTTP status plus ACS's `{"error": {...}}` body."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        target: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.target = status, code, message, target
        self.retry_after = retry_after

    def body(self) -> dict:
        error = {"code": self.code, "message": self.message}
        if self.target:
            error["target"] = self.target
        return {"error": error}


def validation_error(message: str, target: str | None = None) -> AcsError:
    return AcsError(400, "ValidationError", message, target)


def not_owned() -> AcsError:
    return AcsError(401, "IdentityNotOwned", "Provided identity doesn't belong to the resource.")


def _is_int(value: object) -> TypeIs[int]:
    return isinstance(value, int) and not isinstance(value, bool)


def _guid(value: object) -> uuid.UUID | None:
    """The GUID a string spells (any case, as Entra ids are compared), or None."""
    if not isinstance(value, str):
        return None
    try:
        return uuid.UUID(value)
    except ValueError:
        return None


def acs_limits() -> dict[str, float]:
    """ACS's own limits, each operation's per its window."""
    return {**LIMITS, "windowSeconds": LIMIT_WINDOW_SECONDS}


def service_limits(value: object) -> ServiceLimits:
    """The `limits` fault as the emulator keeps and reports it: False (off), or every limited
    operation's limit plus `windowSeconds`. `true` is ACS's own numbers per 30 s; an object names
    limits for some operations (positive integers) and optionally the window, and the operations it
    does not name keep ACS's numbers. Anything else raises ValueError naming the field."""
    if value is False:
        return False
    if value is True:
        return acs_limits()
    if not isinstance(value, dict):
        raise ValueError("limits must be true, false or an object of per-operation limits")
    effective = acs_limits()
    for name, limit in value.items():
        if name == "windowSeconds":
            if (
                isinstance(limit, bool)
                or not isinstance(limit, int | float)
                or not 0 < limit <= MAX_LIMIT_WINDOW_SECONDS
            ):
                raise ValueError(
                    "limits.windowSeconds must be a number of seconds greater than 0 "
                    f"and at most {MAX_LIMIT_WINDOW_SECONDS:g}"
                )
            effective[name] = float(limit)
        elif name in LIMITS:
            if not _is_int(limit) or limit < 1:
                raise ValueError(f"limits.{name} must be a positive integer")
            effective[name] = limit
        else:
            raise ValueError(f"limits: unknown operation {name!r}; known: {', '.join(LIMITS)}, windowSeconds")
    return effective


def check_expires_in(value: object) -> int:
    if value is None:
        return DEFAULT_MINUTES
    if not _is_int(value):
        raise validation_error("The value of ExpiresInMinutes is not a valid integer.", "ExpiresInMinutes")
    if not MIN_MINUTES <= value <= MAX_MINUTES:
        raise validation_error(
            f"ExpiresInMinutes value {value} is invalid. "
            f"Value must be within the [{MIN_MINUTES}, {MAX_MINUTES}] interval.",
            "ExpiresInMinutes",
        )
    return value


def check_scopes(value: object, *, field_name: str = "Scopes") -> list[str]:
    if value is None:
        raise validation_error(f"{field_name}: The {field_name} field is required.", field_name)
    if not isinstance(value, list) or not value:
        raise validation_error(f"Invalid scopes - {field_name} field is required.", field_name)
    for scope in value:
        if scope not in SCOPES:
            raise validation_error(f"Invalid scope value: {scope!r}.", field_name)
    return list(dict.fromkeys(value))


@dataclass
class Faults:
    """What the emulator does wrong on purpose. Field names are the JSON names of POST /faults."""

    latencyMs: int = 0
    throttleRate: float = 0.0
    # None: every 429 (throttled or over a limit) comes without Retry-After, which ACS's docs do
    # not promise on Identity 429s, and without which azure-core does not retry a POST.
    retryAfterSeconds: int | None = 1
    errorRate: float = 0.0
    down: bool = False
    # False, or the effective limits (`service_limits`): set from true, false or an object.
    limits: ServiceLimits = False
    # How long a revocation takes to reach token verification (ACS: up to 15 minutes).
    revocationDelaySeconds: Seconds = 0.0

    def update(self, patch: object) -> None:
        """Apply a partial update; raise ValueError naming the first bad field, changing nothing."""
        if not isinstance(patch, dict):
            raise ValueError("faults must be a JSON object")
        known = {f.name: f for f in fields(self)}
        staged = {}
        for name, value in patch.items():
            if name not in known:
                raise ValueError(f"unknown fault {name!r}")
            kind = known[name].type
            if kind == "bool" and not isinstance(value, bool):
                raise ValueError(f"{name} must be true or false")
            if kind == "int" and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer")
            if kind == "int | None" and value is not None and (not _is_int(value) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer or null")
            if kind == "Seconds":
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise ValueError(f"{name} must be a number of seconds")
                if not 0 <= value <= MAX_REVOCATION_DELAY_SECONDS:
                    raise ValueError(f"{name} must be from 0 to {MAX_REVOCATION_DELAY_SECONDS}")
                value = float(value)
            if kind == "ServiceLimits":
                value = service_limits(value)
            if kind == "float":
                if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1:
                    raise ValueError(f"{name} must be a number from 0 to 1")
                value = float(value)
            staged[name] = value
        for name, value in staged.items():
            setattr(self, name, value)


@dataclass
class Identity:
    id: str
    created_at: float
    # (sequence number, when it takes effect) per revocation: tokens issued at or before the number
    # are revoked from that time on. The time is the revoke's plus the propagation-delay fault.
    revocations: list[tuple[int, float]] = field(default_factory=list)
    deleted: bool = False

    def revoked_through(self, now: float, *, propagated: bool = True) -> int:
        """The highest revoked sequence number: counting only revocations in effect, or all."""
        return max((seq for seq, at in self.revocations if at <= now or not propagated), default=0)


@dataclass
class IssuedToken:
    token: str
    expires_on: dt.datetime

    @property
    def expires_on_text(self) -> str:
        # The raw service string the SDK hands back unparsed: ISO 8601 with microseconds.
        return self.expires_on.isoformat()


class RateWindow:
    """Sliding windows, one per limited operation, for the service limits when they are on."""

    def __init__(self, limits: dict[str, float] | None = None) -> None:
        # The effective limits it counts against (`service_limits`); new limits, new windows.
        self.limits = limits or acs_limits()
        self.events: dict[str, collections.deque] = collections.defaultdict(collections.deque)

    def admit(self, operation: str, now: float) -> int | None:
        """Record one call; return whole seconds to wait when the limit is already reached."""
        span = self.limits["windowSeconds"]
        window = self.events[operation]
        while window and window[0] <= now - span:
            window.popleft()
        if len(window) >= self.limits[operation]:
            return max(1, int(window[0] + span - now) + 1)
        window.append(now)
        return None


class AcsResource:
    """One emulated Communication Services resource: its identities and the tokens it signed."""

    def __init__(
        self,
        *,
        resource_id: str,
        signing_key: SigningKey,
        teams_app_id: str,
        teams_issuer: str,
        teams_issuer_key: SigningKey,
        clock=time.time,
    ) -> None:
        self.resource_id = resource_id
        self.signing_key = signing_key
        self.teams_app_id = teams_app_id
        self.teams_issuer = teams_issuer
        self.teams_issuer_key = teams_issuer_key
        self.clock = clock
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.identities: dict[str, Identity] = {}
            # Issue stamps by token digest: revocation must beat tokens issued in the same second,
            # which `iat` alone cannot tell apart.
            self.issued_seq: dict[str, int] = {}
            self.seq = itertools.count(1)
            self.faults = Faults()
            self.calls = collections.Counter({op: 0 for op in OPERATIONS})
            # 429s answered for the service limits, by the limited operation (`LIMITS`' names:
            # create-and-issue apart from plain creates); the calls above include them.
            self.limited = collections.Counter({op: 0 for op in LIMITS})
            self.rate = RateWindow()

    # ---- bookkeeping -------------------------------------------------------------------------

    def count(self, operation: str) -> None:
        with self._lock:
            self.calls[operation] += 1

    def stats(self) -> dict:
        with self._lock:
            live = sum(1 for i in self.identities.values() if not i.deleted)
            return {"calls": dict(self.calls), "limited": dict(self.limited), "liveIdentities": live}

    def check_limit(self, operation: str) -> None:
        """Count one call of a limited operation (`LIMITS`' names) against its window, when limits
        are on; over the limit, a 429 whose Retry-After is when the window's oldest call leaves."""
        limits = self.faults.limits
        if not limits:
            return
        with self._lock:
            if self.rate.limits is not limits:  # limits were set again: fresh windows
                self.rate = RateWindow(limits)
            wait = self.rate.admit(operation, self.clock())
            if wait is not None:
                self.limited[operation] += 1
        if wait is not None:
            raise AcsError(
                429,
                "TooManyRequests",
                f"Rate limit for {operation} exceeded. Try again in {wait} seconds.",
                retry_after=None if self.faults.retryAfterSeconds is None else wait,
            )

    # ---- identities ----------------------------------------------------------------------------

    def _new_id(self) -> str:
        suffix = secrets.token_hex(16)
        return (
            f"8:acs:{self.resource_id}_{suffix[:8]}-{suffix[8:12]}-{suffix[12:16]}-"
            f"{suffix[16:20]}-{suffix[20:]}"
        )

    def _owned(self, identity_id: str) -> Identity:
        identity = self.identities.get(identity_id)
        if identity is None or identity.deleted:
            raise not_owned()
        return identity

    def create_identity(self) -> str:
        with self._lock:
            identity = Identity(self._new_id(), self.clock())
            self.identities[identity.id] = identity
            return identity.id

    def issue(self, identity_id: str, scopes: list[str], minutes: int) -> IssuedToken:
        with self._lock:
            identity = self._owned(identity_id)
            return self._sign(identity, scopes, minutes)

    def revoke(self, identity_id: str) -> None:
        with self._lock:
            identity = self._owned(identity_id)
            effective = self.clock() + self.faults.revocationDelaySeconds
            identity.revocations.append((next(self.seq), effective))

    def delete(self, identity_id: str) -> None:
        with self._lock:
            self._owned(identity_id).deleted = True

    def _sign(
        self, identity: Identity, scopes: list[str], minutes: int, skype_id: str | None = None
    ) -> IssuedToken:
        now = self.clock()
        expires_on = dt.datetime.fromtimestamp(now, dt.UTC) + dt.timedelta(minutes=minutes)
        iat = int(now)
        claims = {
            "skypeid": skype_id or identity.id.removeprefix("8:"),
            "scp": 1792,
            "csi": str(iat),
            "exp": int(expires_on.timestamp()),
            "acsScope": ",".join(scopes),
            "resourceId": self.resource_id,
            "resourceLocation": "devstack",
            "iat": iat,
            # Not in ACS's tokens; makes two tokens issued in one second distinct strings.
            "jti": uuid.uuid4().hex,
        }
        token = encode_acs_token(claims, self.signing_key)
        self.issued_seq[_digest(token)] = next(self.seq)
        return IssuedToken(token, expires_on)

    # ---- Teams users -------------------------------------------------------------------------

    def exchange_teams_token(self, token: object, app_id: object, user_id: object) -> IssuedToken:
        """ACS's checks in ACS's order, with its recorded answers (azure-sdk-for-python's
        `test_get_token_for_teams_user_*` recordings): the token first (an empty token with an
        empty userId is still 401 InvalidAccessToken), then the fields, then the match."""
        claims = self._teams_claims(token)
        for name, value in (("AppId", app_id), ("UserId", user_id)):
            if not isinstance(value, str) or not value:
                raise validation_error(f"{name}: The {name} field is required.", name)
        if _guid(app_id) is None:
            raise validation_error("Provided AppId has invalid format.", "appId")
        if _guid(user_id) is None:
            raise validation_error("Provided UserId has invalid format.", "userId")
        token_app = _guid(claims.get("appid", claims.get("azp")))  # v1 tokens: appid; v2: azp
        if _guid(app_id) != _guid(self.teams_app_id) or token_app != _guid(app_id):
            raise validation_error("AAD application is not the expected one.", "appId")
        if _guid(claims.get("oid")) != _guid(user_id):
            raise validation_error("Provided AAD token issued for unexpected user.", "userId")
        with self._lock:
            teams_identity = Identity(f"8:orgid:{user_id}", self.clock())
            minutes = min(60, max(1, int((claims["exp"] - self.clock()) // 60)))
            return self._sign(teams_identity, ["voip"], minutes, skype_id=f"orgid:{user_id}")

    def _teams_claims(self, token: object) -> dict:
        """The Teams user's Entra token, verified: from the dev issuer, for ACS's Teams audience."""
        invalid = AcsError(401, "InvalidAccessToken", "Provided access token is not valid.")
        if not isinstance(token, str) or not token:
            raise invalid
        try:
            return jwt.decode(
                token,
                self.teams_issuer_key.public_key,
                algorithms=["RS256"],
                audience=TEAMS_AUDIENCE,
                issuer=self.teams_issuer,
                options={"require": ["exp", "iat", "oid"]},
            )
        except jwt.PyJWTError:
            raise invalid from None

    # ---- verification hook ---------------------------------------------------------------------

    def verify(self, token: object) -> tuple[bool, str]:
        if not isinstance(token, str) or not token:
            return False, "no token given"
        try:
            claims = jwt.decode(
                token,
                self.signing_key.public_key,
                algorithms=["RS256"],
                options={"verify_exp": False, "require": ["exp"]},
            )
        except jwt.PyJWTError:
            return False, "bad signature or malformed token"
        if claims["exp"] <= self.clock():
            return False, "expired"
        with self._lock:
            seq = self.issued_seq.get(_digest(token))
            if seq is None:
                return False, "not issued by this emulator"
            skype_id = claims.get("skypeid", "")
            if skype_id.startswith("orgid:"):
                return True, "valid"
            identity = self.identities.get(f"8:{skype_id}")
            if identity is None:
                return False, "unknown identity"
            if identity.deleted:
                return False, "identity deleted"
            if seq <= identity.revoked_through(self.clock()):
                return False, "revoked"
            if seq <= identity.revoked_through(self.clock(), propagated=False):
                return True, "valid: revocation not yet propagated"
        return True, "valid"


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode("ascii")).hexdigest()


def encode_acs_token(claims: dict, key: SigningKey) -> str:
    """Sign an ACS-shaped RS256 token whose payload decodes as standard base64 too.

    The Python CommunicationTokenCredential reads `exp` with `base64.b64decode`, which silently
    drops '-' and '_'. For ASCII input base64url only emits those where a byte in the third
    position of a 3-byte group is one of `> ? ~ DEL`, so we refuse such payloads outright.
    """
    headers = {"kid": key.kid, "x5t": key.thumbprint, "typ": "JWT"}
    token = jwt.encode(claims, key.private_key, algorithm="RS256", headers=headers)
    payload = token.split(".")[1]
    if "-" in payload or "_" in payload:
        raise ValueError("ACS token payload would not decode as standard base64")
    return token


def new_resource_id() -> str:
    return str(uuid.uuid4())
