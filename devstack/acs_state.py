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

import jwt

from .keys import SigningKey

SCOPES = ("chat", "voip", "chat.join", "chat.join.limited", "voip.join")
MIN_MINUTES, MAX_MINUTES, DEFAULT_MINUTES = 60, 1440, 1440
TEAMS_AUDIENCE = "https://auth.msft.communication.azure.com"

# Per resource and 30 s window, from the ACS service limits page.
LIMIT_WINDOW_SECONDS = 30.0
LIMITS = {
    "createIdentity": 1000,
    "issueAccessToken": 1000,
    "revokeAccessTokens": 500,
    "deleteIdentity": 500,
    "exchangeTeamsToken": 500,
}
OPERATIONS = tuple(LIMITS)


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


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


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
    retryAfterSeconds: int = 1
    errorRate: float = 0.0
    down: bool = False
    limits: bool = False

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
    revoked_after_seq: int = 0  # tokens issued at or before this sequence number are revoked
    deleted: bool = False


@dataclass
class IssuedToken:
    token: str
    expires_on: dt.datetime

    @property
    def expires_on_text(self) -> str:
        # The raw service string the SDK hands back unparsed: ISO 8601 with microseconds.
        return self.expires_on.isoformat()


@dataclass
class RateWindow:
    """Sliding 30 s windows per operation, for the service limits when they are switched on."""

    events: dict[str, collections.deque] = field(
        default_factory=lambda: collections.defaultdict(collections.deque)
    )

    def admit(self, operation: str, now: float) -> int | None:
        """Record one call; return seconds to wait when the limit is already reached."""
        window = self.events[operation]
        while window and window[0] <= now - LIMIT_WINDOW_SECONDS:
            window.popleft()
        if len(window) >= LIMITS[operation]:
            return max(1, int(window[0] + LIMIT_WINDOW_SECONDS - now) + 1)
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
            self.rate = RateWindow()

    # ---- bookkeeping -------------------------------------------------------------------------

    def count(self, operation: str) -> None:
        with self._lock:
            self.calls[operation] += 1

    def stats(self) -> dict:
        with self._lock:
            live = sum(1 for i in self.identities.values() if not i.deleted)
            return {"calls": dict(self.calls), "liveIdentities": live}

    def check_limit(self, operation: str) -> None:
        if not self.faults.limits:
            return
        with self._lock:
            wait = self.rate.admit(operation, self.clock())
        if wait is not None:
            raise AcsError(
                429,
                "TooManyRequests",
                f"Rate limit for {operation} exceeded. Try again in {wait} seconds.",
                retry_after=wait,
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
            identity.revoked_after_seq = next(self.seq)

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
        for name, value in (("Token", token), ("AppId", app_id), ("UserId", user_id)):
            if not isinstance(value, str) or not value:
                raise validation_error(f"{name}: The {name} field is required.", name)
        if app_id != self.teams_app_id:
            raise AcsError(400, "BadRequest", "AAD application is not the expected one.")
        invalid = AcsError(401, "InvalidAccessToken", "Provided access token is not valid.")
        try:
            claims = jwt.decode(
                token,
                self.teams_issuer_key.public_key,
                algorithms=["RS256"],
                audience=TEAMS_AUDIENCE,
                issuer=self.teams_issuer,
                options={"require": ["exp", "iat", "oid"]},
            )
        except jwt.PyJWTError:
            raise invalid from None
        if claims.get("oid") != user_id:
            raise invalid
        if claims.get("appid", claims.get("azp")) != app_id:
            raise AcsError(400, "BadRequest", "AAD application is not the expected one.")
        with self._lock:
            teams_identity = Identity(f"8:orgid:{user_id}", self.clock())
            minutes = min(60, max(1, int((claims["exp"] - self.clock()) // 60)))
            return self._sign(teams_identity, ["voip"], minutes, skype_id=f"orgid:{user_id}")

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
            if seq <= identity.revoked_after_seq:
                return False, "revoked"
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
