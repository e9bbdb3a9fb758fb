"""The HTTP boundary's two registries, without a stack: errors to problems, results to bodies."""

from __future__ import annotations

import datetime as dt
import json
import logging
import subprocess
import sys

import azure.functions as func
import pytest
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ServiceRequestError,
    ServiceResponseTimeoutError,
)

from shared.acs import IssuedToken
from shared.errors import NotFound, TooManyRequests, Unauthenticated, Unavailable
from shared.http import bodies
from shared.http.problems import PROBLEM_TYPE, response_for
from shared.revocation import Outcome
from shared.tokens import TokenResult
from tests.conftest import REPO_ROOT


def _problem(response: func.HttpResponse) -> dict:
    assert response.mimetype == "application/problem+json"
    assert response.headers["Cache-Control"] == "no-store"
    body = json.loads(response.get_body())
    assert body["type"] == PROBLEM_TYPE + body["code"] and body["status"] == response.status_code
    return body


def _status(status: int) -> HttpResponseError:
    err = HttpResponseError("the service said no")
    err.status_code = status
    return err


def test_the_service_errors_say_their_own_status_code_and_headers():
    response = response_for(Unauthenticated("The bearer token expired."))
    assert response.status_code == 401 and _problem(response)["code"] == "unauthenticated"
    assert response.headers["WWW-Authenticate"].startswith('Bearer realm="acs-token-service"')
    limited = response_for(TooManyRequests("Too many.", retry_after=7))
    assert limited.status_code == 429 and limited.headers["Retry-After"] == "7"
    missing = _problem(response_for(NotFound("No such thing.", code="identity_not_found")))
    assert (missing["code"], missing["title"], missing["detail"]) == (
        "identity_not_found",
        "Not found",
        "No such thing.",
    )


@pytest.mark.parametrize(
    ("err", "code", "level"),
    [
        (ServiceRequestError("no route to host"), "dependency_unavailable", logging.WARNING),
        (ServiceResponseTimeoutError("read timed out"), "dependency_unavailable", logging.WARNING),
        (_status(503), "dependency_unavailable", logging.WARNING),
        (_status(429), "dependency_unavailable", logging.WARNING),
        (_status(400), "dependency_failed", logging.ERROR),
        (ResourceExistsError("exists"), "dependency_failed", logging.ERROR),
        (AzureError("odd"), "dependency_failed", logging.ERROR),
    ],
)
def test_backing_service_errors_are_503s_never_our_500(caplog, err, code, level):
    caplog.set_level(logging.INFO, logger="acs_token_service.http")
    response = response_for(err)
    assert response.status_code == 503 and response.headers["Retry-After"] == "5"
    assert _problem(response)["code"] == code
    first = caplog.records[0]
    assert first.levelno == level and type(err).__name__ in first.getMessage()
    assert caplog.records[-1].getMessage().startswith(f"answered 503 {code}: ")


def test_anything_else_is_a_bare_500_whose_log_names_the_type_and_place_not_the_message(caplog):
    caplog.set_level(logging.INFO, logger="acs_token_service.http")
    secret = "8:acs:" + "secret-identity"  # the raising line must not quote it: the stack shows lines
    try:
        raise ValueError(secret)
    except ValueError as err:
        response = response_for(err)
    assert response.status_code == 500
    assert _problem(response) | {"type": ""} == {
        "type": "",
        "title": "Internal error",
        "status": 500,
        "detail": "Something went wrong on our side.",
        "code": "internal_error",
    }
    [record] = caplog.records
    assert record.levelno == logging.ERROR and "ValueError" in record.getMessage()
    assert "test_http_boundary.py" in record.getMessage() and "secret-identity" not in record.getMessage()


def test_the_service_s_own_errors_are_answered_without_loading_the_sdk():
    """azure-core's handlers register with the first error that is not ours (a 404 need not pay)."""
    code = (
        "import sys, function_app\n"
        "from shared.errors import NotFound, Unavailable\n"
        "from shared.http.problems import response_for\n"
        "response_for(NotFound('x')); response_for(Unavailable('y', code='z'))\n"
        "print('azure.core' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=60
    )
    assert out.stdout.strip() == "False"


def test_every_moment_is_answered_in_utc_to_the_second():
    paris = dt.timezone(dt.timedelta(hours=1))
    assert bodies.iso(dt.datetime(2026, 1, 2, 3, 4, 5, 999_999, tzinfo=paris)) == "2026-01-02T02:04:05Z"


def test_a_token_body_names_its_identity_scopes_and_expiry():
    expires = dt.datetime(2026, 5, 1, 12, 0, 0, tzinfo=dt.UTC)
    result = TokenResult("8:acs:x", IssuedToken("t0k", expires), ("chat", "voip"), identity_created=True)
    response = bodies.token(result)
    assert response.status_code == 200 and response.headers["Cache-Control"] == "no-store"
    assert json.loads(response.get_body()) == {
        "communicationUserId": "8:acs:x",
        "token": "t0k",
        "expiresOn": "2026-05-01T12:00:00Z",
        "scopes": ["chat", "voip"],
        "identityCreated": True,
    }


@pytest.mark.parametrize(("status", "http_status"), [("revoked", 200), ("deleted", 200), ("pending", 202)])
def test_an_outcome_is_202_while_it_waits_for_acs(status, http_status):
    response = bodies.outcome(Outcome(status, "8:acs:x"))
    assert response.status_code == http_status
    assert json.loads(response.get_body()) == {"status": status, "communicationUserId": "8:acs:x"}


def test_unavailable_keeps_its_retry_after():
    response = response_for(Unavailable("Later.", code="events_deferred", retry_after=10))
    assert response.status_code == 503 and response.headers["Retry-After"] == "10"
