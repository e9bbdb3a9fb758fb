"""Domain errors with stable codes; `shared.http.problems` turns them into RFC 9457 responses.

Every error a caller can cause or meet is one of these, so handlers never build error responses
by hand and no path ends in an unexplained 500.
"""

from __future__ import annotations

from enum import StrEnum


class Code(StrEnum):
    """Every error code the service answers with (problem+json `code`): one place, no free strings.
    Clients branch on these; README ("Errors") and openapi.yaml document them."""

    ACS_AUTH_FAILED = "acs_auth_failed"
    ACS_IDENTITY_MISMATCH = "acs_identity_mismatch"
    ACS_REJECTED = "acs_rejected"
    ACS_THROTTLED = "acs_throttled"
    ACS_UNAVAILABLE = "acs_unavailable"
    BAD_REQUEST = "bad_request"
    CALLER_OID_MISSING = "caller_oid_missing"
    CONFIGURATION_ERROR = "configuration_error"
    CONFLICT = "conflict"
    DELETE_PENDING = "delete_pending"
    DEMO_PAGE_DISABLED = "demo_page_disabled"
    DEPENDENCY_FAILED = "dependency_failed"
    DEPENDENCY_UNAVAILABLE = "dependency_unavailable"
    EVENTS_DEFERRED = "events_deferred"
    FORBIDDEN = "forbidden"
    GRAPH_TOKEN_UNAVAILABLE = "graph_token_unavailable"
    GRAPH_UNAVAILABLE = "graph_unavailable"
    GRAPH_UNREACHABLE = "graph_unreachable"
    IDENTITY_CHANGED = "identity_changed"
    IDENTITY_CONFLICT = "identity_conflict"
    IDENTITY_DELETED = "identity_deleted"
    IDENTITY_GONE = "identity_gone"
    IDENTITY_NOT_FOUND = "identity_not_found"
    INTERNAL_ERROR = "internal_error"
    INVALID_BODY = "invalid_body"
    INVALID_EVENT = "invalid_event"
    INVALID_EXPIRY = "invalid_expiry"
    INVALID_HANDSHAKE = "invalid_handshake"
    INVALID_IDENTITY_ID = "invalid_identity_id"
    INVALID_JSON = "invalid_json"
    INVALID_LIMIT = "invalid_limit"
    INVALID_SCOPES = "invalid_scopes"
    INVALID_TEAMS_TOKEN = "invalid_teams_token"
    ISSUER_MISMATCH = "issuer_mismatch"
    ISSUER_UNAVAILABLE = "issuer_unavailable"
    NOT_FOUND = "not_found"
    PAYLOAD_TOO_LARGE = "payload_too_large"
    RATE_LIMITED = "rate_limited"
    REVOKE_PENDING = "revoke_pending"
    SCOPE_NOT_ALLOWED = "scope_not_allowed"
    SESSION_ENDED = "session_ended"
    TEAMS_APP_INVALID = "teams_app_invalid"
    TEAMS_APP_MISMATCH = "teams_app_mismatch"
    TEAMS_APP_REJECTED = "teams_app_rejected"
    TEAMS_TOKEN_INVALID = "teams_token_invalid"
    TEAMS_USER_MISMATCH = "teams_user_mismatch"
    UNAUTHENTICATED = "unauthenticated"
    UNAVAILABLE = "unavailable"
    UNKNOWN_FIELD = "unknown_field"
    UNKNOWN_SCOPE = "unknown_scope"


class ServiceError(Exception):
    status = 500
    code: Code = Code.INTERNAL_ERROR
    title = "Internal error"

    def __init__(
        self, detail: str, *, code: Code | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        if code:  # a more precise code than the class's own
            self.code = code


class BadRequest(ServiceError):
    status, code, title = 400, Code.BAD_REQUEST, "Bad request"


class Unauthenticated(ServiceError):
    """401: the bearer token is missing or invalid. Carries the RFC 6750 challenge."""

    status, code, title = 401, Code.UNAUTHENTICATED, "Authentication required"

    def __init__(self, detail: str, *, error: str | None = "invalid_token") -> None:
        challenge = 'Bearer realm="acs-token-service"'
        if error:
            description = detail.replace('"', "'")
            challenge += f', error="{error}", error_description="{description}"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class SessionEnded(Unauthenticated):
    """401: an event ended this user's sessions after the bearer was issued; sign in again."""

    code = Code.SESSION_ENDED


class Forbidden(ServiceError):
    status, code, title = 403, Code.FORBIDDEN, "Forbidden"


class NotFound(ServiceError):
    status, code, title = 404, Code.NOT_FOUND, "Not found"


class Conflict(ServiceError):
    """409: the user's identity is in a state that forbids this now (e.g. a pending revocation)."""

    status, code, title = 409, Code.CONFLICT, "Conflict"

    def __init__(self, detail: str, *, code: Code, retry_after: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        super().__init__(detail, code=code, headers=headers)


class PayloadTooLarge(ServiceError):
    status, code, title = 413, Code.PAYLOAD_TOO_LARGE, "Payload too large"


class TooManyRequests(ServiceError):
    """429: this caller is over its rate limit."""

    status, code, title = 429, Code.RATE_LIMITED, "Too many requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


class Unavailable(ServiceError):
    """503: a dependency is down, throttled or misconfigured; the caller may retry later."""

    status, code, title = 503, Code.UNAVAILABLE, "Service unavailable"

    def __init__(self, detail: str, *, code: Code, retry_after: int = 5) -> None:
        super().__init__(detail, code=code, headers={"Retry-After": str(max(1, retry_after))})


class Throttled(Unavailable):
    """429: ACS is refusing this service's calls (its limits), or the service refuses for it first
    (shared/throttle.py). An `Unavailable`, so work that can wait (a revocation) is queued, but 429,
    not 503: the service is not broken, it is being asked for more than ACS allows."""

    status, code, title = 429, Code.ACS_THROTTLED, "Too many requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, code=Code.ACS_THROTTLED, retry_after=retry_after)


class SettingError(Unavailable):
    """A setting is missing or invalid: the operator must fix the app settings."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"App setting {name}: {detail}", code=Code.CONFIGURATION_ERROR, retry_after=60)
        self.setting = name
