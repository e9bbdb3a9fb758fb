"""Property-based fuzzing of every documented route against the running dev host.

Schemathesis generates valid and invalid requests from openapi.yaml; whatever it sends, the
service must never answer 5xx (503 aside: dependencies may legitimately be unavailable, and it
is documented) and every answer must match the document: status, content type, headers, schema.
The budget is bounded so `make test` stays fast.

Schemathesis rarely builds the shapes that break parsers rather than handlers, so a fixed corpus
of them (issue 15) goes through every route that parses a body: JSON nested thousands deep,
numbers past Python's 4300-digit limit (json.loads raises a plain ValueError for those), and the
same inside the Teams token's claims. Each must be a 400 problem with a stable code, and the
dev host's log must show no crash for it.
"""

from __future__ import annotations

import base64

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from shared.http.openapi import DOCUMENT
from tests.service_helpers import HostLog

schema = schemathesis.openapi.from_path(str(DOCUMENT))
MAX_EXAMPLES = 25


def not_a_server_error(ctx, response, case) -> bool | None:
    """Like schemathesis' check, but a documented 503 (dependency unavailable) is allowed."""
    if response.status_code >= 500 and response.status_code != 503:
        raise AssertionError(f"Server error {response.status_code} for {case.method} {case.path}")
    return None


@pytest.fixture(scope="module")
def auth(stack) -> dict[str, str]:
    token = stack.token("fuzz-user", "--role", "TokenService.Admin").strip()
    return {"Authorization": f"Bearer {token}", "x-functions-key": stack["function_key"]}


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_api_conforms_to_its_document(case, stack, auth):
    headers = dict(auth)
    if case.headers:
        headers.update(
            {k: v for k, v in case.headers.items() if k.lower() not in ("authorization", "x-functions-key")}
        )
    case.call_and_validate(
        base_url=stack["api"],
        headers=headers,
        timeout=60,
        checks=[
            not_a_server_error,
            status_code_conformance,
            content_type_conformance,
            response_headers_conformance,
            response_schema_conformance,
        ],
    )


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _teams_body(claims: bytes) -> bytes:
    """A Teams token whose payload is `claims` (unsigned: it must be refused before ACS sees it)."""
    token = ".".join((_b64(b'{"alg":"RS256","typ":"JWT"}'), _b64(claims), _b64(b"sig")))
    return b'{"teamsAccessToken":"' + token.encode() + b'"}'


DIGITS = b"9" * 5000  # past the 4300 digits int() reads
NOT_A_JWT = "teams_token_invalid"
# name: (route, body, the problem's code)
PARSER_BOMBS = {
    "token-array-nested-8000": ("token", _nested(8000), "invalid_json"),
    "token-scopes-nested-8000": ("token", b'{"scopes":' + _nested(8000) + b"}", "invalid_json"),
    "token-expiry-5000-digits": ("token", b'{"expiresInMinutes":' + DIGITS + b"}", "invalid_json"),
    "token-expiry-minus-5000-digits": ("token", b'{"expiresInMinutes":-' + DIGITS + b"}", "invalid_json"),
    "token-expiry-1e999999": ("token", b'{"expiresInMinutes":1e999999}', "invalid_expiry"),
    "refresh-expiry-5000-digits": ("token/refresh", b'{"expiresInMinutes":' + DIGITS + b"}", "invalid_json"),
    "refresh-object-nested-2500": ("token/refresh", b'{"a":' * 2500 + b"1" + b"}" * 2500, "invalid_json"),
    "teams-body-nested-8000": ("teams/token", b'{"teamsAccessToken":' + _nested(8000) + b"}", "invalid_json"),
    "teams-body-5000-digits": ("teams/token", b'{"teamsAccessToken":' + DIGITS + b"}", "invalid_json"),
    "teams-claims-nested-5000": ("teams/token", _teams_body(b'{"oid":' + _nested(5000) + b"}"), NOT_A_JWT),
    "teams-claims-5000-digits": ("teams/token", _teams_body(b'{"oid":' + DIGITS + b"}"), NOT_A_JWT),
    "teams-claims-nested-array": ("teams/token", _teams_body(_nested(5000)), NOT_A_JWT),
    "events-array-nested-8000": ("events", _nested(8000), "invalid_event"),
    "events-nested-200000": ("events", _nested(200_000), "invalid_event"),
    "events-id-5000-digits": ("events", b'[{"id":' + DIGITS + b"}]", "invalid_event"),
}


@pytest.mark.parametrize(("route", "body", "code"), PARSER_BOMBS.values(), ids=PARSER_BOMBS.keys())
def test_parser_bombs_in_bodies_are_400_problems(stack, emulator, auth, route, body, code):
    log = HostLog(stack)
    before = emulator.stats()["calls"]
    response = requests.post(
        f"{stack['api']}/{route}",
        data=body,
        headers={**auth, "Content-Type": "application/json"},
        timeout=30,
    )
    assert response.status_code == 400, response
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == code
    assert len(response.content) < 1024  # no echo of the input
    assert emulator.stats()["calls"] == before  # refused before any ACS call
    log.assert_no_error(invocations=1)
