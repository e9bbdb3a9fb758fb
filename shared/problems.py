"""RFC 9457 problem+json responses, built in one place from domain errors."""

from __future__ import annotations

import json
import logging
import traceback

import azure.functions as func

from .errors import ServiceError, Unavailable
from .store.errors import BUSY, StoreError, Unreachable

log = logging.getLogger("acs_token_service.http")
PROBLEM_TYPE = "urn:acs-token-service:problem:"  # + code; documented in README


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> func.HttpResponse:
    return func.HttpResponse(
        json.dumps(body),
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
        mimetype="application/json",
    )


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> func.HttpResponse:
    body = {"type": PROBLEM_TYPE + code, "title": title, "status": status, "detail": detail, "code": code}
    return func.HttpResponse(
        json.dumps(body),
        status_code=status,
        headers={"Cache-Control": "no-store", **(headers or {})},
        mimetype="application/problem+json",
    )


def from_error(err: ServiceError) -> func.HttpResponse:
    if err.status >= 500:  # the log says why, so an operator need not reproduce it (no secret in detail)
        log.warning("answered %s %s: %s", err.status, err.code, err.detail)
    return problem(err.status, err.code, err.title, err.detail, err.headers)


def from_unexpected(err: BaseException) -> func.HttpResponse:
    """The last resort. Storage and network failures are dependencies being down, not our bug."""
    from azure.core.exceptions import AzureError, HttpResponseError, ServiceRequestError, ServiceResponseError

    if isinstance(err, StoreError):  # Table Storage's failures, as the store names them
        if isinstance(err, Unreachable):
            log.warning("a backing service cannot be reached: %s", type(err).__name__)
            return from_error(
                Unavailable("A backing service cannot be reached.", code="dependency_unavailable")
            )
        if (err.status_code or 0) in BUSY:
            log.warning("a backing service answered %s (%s)", err.status_code, type(err).__name__)
            return from_error(
                Unavailable("A backing service is busy or failing.", code="dependency_unavailable")
            )
        log.error("backing service error: %s", type(err).__name__)
        return from_error(Unavailable("A backing service failed.", code="dependency_failed"))
    if isinstance(err, ServiceRequestError | ServiceResponseError):
        log.warning("a backing service cannot be reached: %s", type(err).__name__)
        return from_error(Unavailable("A backing service cannot be reached.", code="dependency_unavailable"))
    if isinstance(err, HttpResponseError) and (err.status_code or 0) in (429, 500, 502, 503, 504):
        log.warning("a backing service answered %s (%s)", err.status_code, type(err).__name__)
        return from_error(Unavailable("A backing service is busy or failing.", code="dependency_unavailable"))
    if isinstance(err, AzureError):
        log.error("backing service error: %s", type(err).__name__)
        return from_error(Unavailable("A backing service failed.", code="dependency_failed"))
    # The type and where it was raised, not the message: a message may quote an ACS id or a token.
    stack = "".join(traceback.format_list(traceback.extract_tb(err.__traceback__)))
    log.error("unexpected error: %s\n%s", type(err).__name__, stack.rstrip())
    return problem(500, "internal_error", "Internal error", "Something went wrong on our side.")
