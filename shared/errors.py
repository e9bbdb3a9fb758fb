"""Domain errors with stable codes; `shared.http.problems` turns them into RFC 9457 responses.

Every error a caller can cause or meet is one of these, so handlers never build error responses
by hand and no path ends in an unexplained 500.
"""

from __future__ import annotations


class ServiceError(Exception):
    status = 500
    code = "internal_error"
    title = "Internal error"

    def __init__(
        self, detail: str, *, code: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.headers = headers or {}
        if code:  # a more precise code than the class's own
            self.code = code


class BadRequest(ServiceError):
    status, code, title = 400, "bad_request", "Bad request"


class Unauthenticated(ServiceError):
    """401: the bearer token is missing or invalid. Carries the RFC 6750 challenge."""

    status, code, title = 401, "unauthenticated", "Authentication required"

    def __init__(self, detail: str, *, error: str | None = "invalid_token") -> None:
        challenge = 'Bearer realm="acs-token-service"'
        if error:
            description = detail.replace('"', "'")
            challenge += f', error="{error}", error_description="{description}"'
        super().__init__(detail, headers={"WWW-Authenticate": challenge})


class SessionEnded(Unauthenticated):
    """401: an event ended this user's sessions after the bearer was issued; sign in again."""

    code = "session_ended"


class Forbidden(ServiceError):
    status, code, title = 403, "forbidden", "Forbidden"


class NotFound(ServiceError):
    status, code, title = 404, "not_found", "Not found"


class Conflict(ServiceError):
    """409: the user's identity is in a state that forbids this now (e.g. a pending revocation)."""

    status, code, title = 409, "conflict", "Conflict"

    def __init__(self, detail: str, *, code: str, retry_after: int | None = None) -> None:
        headers = {"Retry-After": str(retry_after)} if retry_after else None
        super().__init__(detail, code=code, headers=headers)


class PayloadTooLarge(ServiceError):
    status, code, title = 413, "payload_too_large", "Payload too large"


class TooManyRequests(ServiceError):
    """429: this caller is over its rate limit."""

    status, code, title = 429, "rate_limited", "Too many requests"

    def __init__(self, detail: str, *, retry_after: int) -> None:
        super().__init__(detail, headers={"Retry-After": str(max(1, retry_after))})


class Unavailable(ServiceError):
    """503: a dependency is down, throttled or misconfigured; the caller may retry later."""

    status, code, title = 503, "unavailable", "Service unavailable"

    def __init__(self, detail: str, *, code: str, retry_after: int = 5) -> None:
        super().__init__(detail, code=code, headers={"Retry-After": str(max(1, retry_after))})


class SettingError(Unavailable):
    """A setting is missing or invalid: the operator must fix the app settings."""

    def __init__(self, name: str, detail: str) -> None:
        super().__init__(f"App setting {name}: {detail}", code="configuration_error", retry_after=60)
        self.setting = name
