"""Every error to its answer, in one registry: RFC 9457 problem+json.

As in starlette's ExceptionMiddleware, an error is answered by the handler registered for the
nearest class in its MRO. The service's own errors say their status, code and headers; azure-core's
are a backing service down or failing, not our bug; anything else is, and answers a bare 500.
"""

from __future__ import annotations

import logging
import traceback
from collections.abc import Callable
from functools import cache
from typing import TYPE_CHECKING, Any

import azure.functions as func

from ..errors import Code, ServiceError, Unavailable
from ..store.errors import BUSY, StoreError, Unreachable
from .bodies import json_response

if TYPE_CHECKING:
    from azure.core.exceptions import HttpResponseError

log = logging.getLogger("acs_token_service.http")
PROBLEM_TYPE = "urn:acs-token-service:problem:"  # + code; documented in README

Handler = Callable[[Any], func.HttpResponse]


def problem(
    status: int, code: str, title: str, detail: str, headers: dict[str, str] | None = None
) -> func.HttpResponse:
    body = {"type": PROBLEM_TYPE + code, "title": title, "status": status, "detail": detail, "code": code}
    return json_response(body, status, headers, mimetype="application/problem+json")


def _service_error(err: ServiceError) -> func.HttpResponse:
    if err.status >= 500:  # the log says why, so an operator need not reproduce it (no secret in detail)
        log.warning("answered %s %s: %s", err.status, err.code, err.detail)
    return problem(err.status, err.code, err.title, err.detail, err.headers)


def _unreachable(err: Exception) -> func.HttpResponse:
    log.warning("a backing service cannot be reached: %s", type(err).__name__)
    return _service_error(
        Unavailable("A backing service cannot be reached.", code=Code.DEPENDENCY_UNAVAILABLE)
    )


def _answered(err: HttpResponseError | StoreError) -> func.HttpResponse:
    if (err.status_code or 0) not in BUSY:
        return _failed(err)
    log.warning("a backing service answered %s (%s)", err.status_code, type(err).__name__)
    return _service_error(
        Unavailable("A backing service is busy or failing.", code=Code.DEPENDENCY_UNAVAILABLE)
    )


def _failed(err: Exception) -> func.HttpResponse:
    log.error("backing service error: %s", type(err).__name__)
    return _service_error(Unavailable("A backing service failed.", code=Code.DEPENDENCY_FAILED))


def _unexpected(err: Exception) -> func.HttpResponse:
    # The type and where it was raised, not the message: a message may quote an ACS id or a token.
    stack = "".join(traceback.format_list(traceback.extract_tb(err.__traceback__)))
    log.error("unexpected error: %s\n%s", type(err).__name__, stack.rstrip())
    return problem(500, Code.INTERNAL_ERROR, "Internal error", "Something went wrong on our side.")


HANDLERS: dict[type[Exception], Handler] = {
    ServiceError: _service_error,
    Unreachable: _unreachable,  # the store's failures (shared/store/errors.py), as azure-core's below
    StoreError: _answered,
    Exception: _unexpected,
}


@cache
def _register_azure_errors() -> None:
    """Registered with the first error that is not ours: azure-core takes ~200 ms to import, which
    indexing function_app, and answers such as a disabled demo page's 404, need not pay."""
    from azure.core.exceptions import AzureError, HttpResponseError, ServiceRequestError, ServiceResponseError

    HANDLERS.update(
        {
            ServiceRequestError: _unreachable,
            ServiceResponseError: _unreachable,
            HttpResponseError: _answered,
            AzureError: _failed,
        }
    )


def response_for(err: Exception) -> func.HttpResponse:
    """The answer to `err`, by the handler of the nearest class in its MRO."""
    if not isinstance(err, ServiceError):
        _register_azure_errors()
    handler = next(HANDLERS[cls] for cls in type(err).__mro__ if cls in HANDLERS)
    return handler(err)
