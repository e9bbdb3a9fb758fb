"""The token routes over real HTTP through the dev host that `python -m devstack up` starts.

The host runs function_app keyless (managed identity for ACS and Storage), as in Azure.
"""

from __future__ import annotations

import concurrent.futures

import pytest
import requests


def _user_token(stack, user: str) -> str:
    return stack.token(user).strip()


def _post(stack, route: str, token: str | None, body: object = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{stack['api']}/{route}", json=body, headers=headers, timeout=60)


def test_issue_refresh_and_identity_over_http(stack, emulator):
    token = _user_token(stack, "http-alice")
    first = _post(stack, "token", token)
    assert first.status_code == 200, first.text
    assert first.headers["Content-Type"].startswith("application/json")
    created = first.json()
    assert created["identityCreated"] is True
    again = _post(stack, "token", token, {"scopes": ["voip"], "expiresInMinutes": 120}).json()
    assert (
        again["communicationUserId"] == created["communicationUserId"] and again["identityCreated"] is False
    )
    assert again["scopes"] == ["voip"]
    refreshed = _post(stack, "token/refresh", token)
    assert refreshed.status_code == 200 and emulator.verify(refreshed.json()["token"])["valid"]
    identity = requests.get(
        f"{stack['api']}/identity", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert identity.json()["communicationUserId"] == created["communicationUserId"]


def test_errors_over_http_are_problem_json(stack, emulator):
    missing = _post(stack, "token", None)
    assert missing.status_code == 401 and missing.headers["WWW-Authenticate"].startswith("Bearer")
    assert missing.headers["Content-Type"].startswith("application/problem+json")
    token = _user_token(stack, "http-bob")
    bad = requests.post(
        f"{stack['api']}/token", data=b"{oops", headers={"Authorization": f"Bearer {token}"}, timeout=30
    )
    assert bad.status_code == 400 and bad.json()["code"] == "invalid_json"
    assert _post(stack, "token/refresh", token).status_code == 404
    assert requests.get(f"{stack['api']}/health", timeout=30).json()["status"] == "ok"


def test_concurrent_first_requests_over_http_make_one_identity(stack, emulator):
    token = _user_token(stack, "http-carol")
    before = emulator.stats()["liveIdentities"]
    with concurrent.futures.ThreadPoolExecutor(max_workers=20) as pool:
        responses = list(pool.map(lambda _: _post(stack, "token", token), range(20)))
    assert {r.status_code for r in responses} == {200}
    assert len({r.json()["communicationUserId"] for r in responses}) == 1
    assert emulator.stats()["liveIdentities"] == before + 1


@pytest.mark.parametrize("route", ["token", "token/refresh"])
def test_acs_down_over_http_is_503_with_retry_after(stack, emulator, route):
    token = _user_token(stack, "http-dan")
    assert _post(stack, "token", token).status_code == 200
    emulator.faults(down=True)
    response = _post(stack, route, token, {"expiresInMinutes": 61})  # a token ACS must be asked for
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
