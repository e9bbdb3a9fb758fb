"""The emulator answers as ACS does: auth failures, validation errors, unknown identities, faults."""

from __future__ import annotations

import base64
import datetime as dt
import json
import time

import pytest
import requests
from azure.communication.identity import (
    CommunicationIdentityClient,
    CommunicationTokenScope,
    CommunicationUserIdentifier,
)
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

from tests.acs_signing import sdk_signed_headers

API = "?api-version=2023-10-01"


@pytest.fixture
def client(stack) -> CommunicationIdentityClient:
    return CommunicationIdentityClient.from_connection_string(stack["acs_connection_string"])


def _url(stack, path: str) -> str:
    return stack["acs_endpoint"].rstrip("/") + path + API


def _signed_post(stack, path: str, body: str, *, send_body: str | None = None, send_path: str | None = None):
    headers = sdk_signed_headers(stack["acs_connection_string"], "POST", _url(stack, path), body)
    sent = body if send_body is None else send_body
    return requests.post(_url(stack, send_path or path), data=sent.encode(), headers=headers, timeout=10)


def _error(response: requests.Response) -> dict:
    assert response.headers["Content-Type"].startswith("application/json")
    return response.json()["error"]


# ---- authentication ----------------------------------------------------------------------------


def test_signed_raw_request_succeeds(stack, emulator):
    response = _signed_post(stack, "/identities", "")
    assert response.status_code == 201
    assert response.json()["identity"]["id"].startswith("8:acs:")


def test_tampered_body_is_denied(stack, emulator):
    before = emulator.stats()["liveIdentities"]
    response = _signed_post(
        stack,
        "/identities",
        '{"createTokenWithScopes": ["chat"]}',
        send_body='{"createTokenWithScopes": ["voip"]}',
    )
    assert response.status_code == 401
    assert _error(response)["code"] == "Denied"
    assert emulator.stats()["liveIdentities"] == before


def test_missing_signature_is_denied(stack, emulator):
    response = requests.post(_url(stack, "/identities"), timeout=10)
    assert response.status_code == 401
    assert _error(response)["code"] == "Denied"


def test_wrong_key_is_denied(stack, emulator):
    wrong = base64.b64encode(b"not the resource key").decode()
    client = CommunicationIdentityClient.from_connection_string(
        f"endpoint={stack['acs_endpoint']};accesskey={wrong}"
    )
    with pytest.raises(ClientAuthenticationError) as caught:
        client.create_user()
    assert caught.value.status_code == 401
    assert caught.value.error.code == "Denied"


def test_stale_date_is_denied(stack, emulator, monkeypatch):
    from azure.communication.identity._shared import policy

    stale = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=20)
    monkeypatch.setattr(policy, "get_current_utc_time", lambda: stale.strftime("%a, %d %b %Y %H:%M:%S GMT"))
    client = CommunicationIdentityClient.from_connection_string(stack["acs_connection_string"])
    with pytest.raises(ClientAuthenticationError):
        client.create_user()


def test_signature_over_another_path_form_is_denied(stack, emulator, client):
    """Signing the encoded path but sending the decoded one (or back) is not what any SDK does."""
    user = client.create_user().properties["id"]
    encoded = f"/identities/{user.replace(':', '%3A')}/:issueAccessToken"
    decoded = f"/identities/{user}/:issueAccessToken"
    body = '{"scopes": ["chat"]}'
    assert _signed_post(stack, encoded, body).status_code == 200  # what the sync client does
    assert _signed_post(stack, decoded, body).status_code == 200  # what the aio client does
    assert _signed_post(stack, encoded, body, send_path=decoded).status_code == 401
    assert _signed_post(stack, decoded, body, send_path=encoded).status_code == 401


def test_garbage_bearer_token_is_refused(stack, emulator):
    response = requests.post(
        _url(stack, "/identities"), headers={"Authorization": "Bearer not.a.jwt"}, timeout=10
    )
    assert response.status_code == 401


# ---- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize("minutes", [59, 1441])
def test_expiry_outside_bounds_is_a_validation_error(client, emulator, minutes):
    user = client.create_user()
    with pytest.raises(HttpResponseError) as caught:
        client.get_token(user, [CommunicationTokenScope.CHAT], token_expires_in=dt.timedelta(minutes=minutes))
    assert caught.value.status_code == 400
    assert caught.value.error.code == "ValidationError"
    assert caught.value.error.target == "ExpiresInMinutes"
    assert f"ExpiresInMinutes value {minutes} is invalid" in caught.value.error.message


@pytest.mark.parametrize("minutes", [59, 1441])
def test_create_and_issue_checks_expiry_before_creating(client, emulator, minutes):
    before = emulator.stats()["liveIdentities"]
    with pytest.raises(HttpResponseError) as caught:
        client.create_user_and_token(
            [CommunicationTokenScope.CHAT], token_expires_in=dt.timedelta(minutes=minutes)
        )
    assert caught.value.status_code == 400
    assert emulator.stats()["liveIdentities"] == before


@pytest.mark.parametrize("minutes", [60, 1440])
def test_expiry_bounds_are_inclusive(client, emulator, minutes):
    user = client.create_user()
    token = client.get_token(
        user, [CommunicationTokenScope.CHAT], token_expires_in=dt.timedelta(minutes=minutes)
    )
    assert emulator.verify(token.token)["valid"]


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("{}", "Scopes: The Scopes field is required."),
        ('{"scopes": []}', "Invalid scopes - Scopes field is required."),
        ('{"scopes": ["chat", "email"]}', "Invalid scope value"),
        ('{"scopes": ["chat"], "expiresInMinutes": "x"}', "not a valid integer"),
        ("[1, 2]", "must be a JSON object"),
        ("{not json", "not valid JSON"),
    ],
)
def test_bad_issue_bodies_get_400(stack, emulator, client, body, message):
    user = client.create_user().properties["id"]
    response = _signed_post(stack, f"/identities/{user.replace(':', '%3A')}/:issueAccessToken", body)
    assert response.status_code == 400
    assert message in _error(response)["message"]


def test_unsupported_api_version(stack, emulator):
    url = stack["acs_endpoint"].rstrip("/") + "/identities?api-version=1999-01-01"
    response = requests.post(
        url, headers=sdk_signed_headers(stack["acs_connection_string"], "POST", url), timeout=10
    )
    assert response.status_code == 400
    assert _error(response)["code"] == "UnsupportedApiVersion"


def test_unknown_identity_is_not_owned(client, emulator, stack):
    stranger = CommunicationUserIdentifier(
        "8:acs:00000000-0000-0000-0000-000000000000_00000000-0000-0000-0000-000000000001"
    )
    for call in (
        lambda: client.get_token(stranger, [CommunicationTokenScope.CHAT]),
        lambda: client.revoke_tokens(stranger),
        lambda: client.delete_user(stranger),
    ):
        with pytest.raises(ClientAuthenticationError) as caught:
            call()
        assert caught.value.status_code == 401
        assert caught.value.error.code == "IdentityNotOwned"
        assert caught.value.error.message == "Provided identity doesn't belong to the resource."


def test_deleted_identity_cannot_get_tokens(client, emulator):
    user, token = client.create_user_and_token([CommunicationTokenScope.CHAT])
    client.delete_user(user)
    assert emulator.verify(token.token) == {"valid": False, "reason": "identity deleted"}
    with pytest.raises(ClientAuthenticationError) as caught:
        client.get_token(user, [CommunicationTokenScope.CHAT])
    assert caught.value.error.code == "IdentityNotOwned"


def test_token_valid_until_revoked_even_within_one_second(client, emulator):
    user = client.create_user()
    tokens = [client.get_token(user, [CommunicationTokenScope.VOIP]).token for _ in range(3)]
    assert all(emulator.verify(t)["valid"] for t in tokens)
    client.revoke_tokens(user)
    assert [emulator.verify(t) for t in tokens] == [{"valid": False, "reason": "revoked"}] * 3
    fresh = client.get_token(user, [CommunicationTokenScope.VOIP]).token
    assert emulator.verify(fresh)["valid"]


@pytest.mark.parametrize(
    ("token", "reason"), [("", "no token"), ("a.b.c", "malformed"), ("eyJhbGciOiJub25lIn0.e30.", "malformed")]
)
def test_verify_rejects_junk(emulator, token, reason):
    result = emulator.verify(token)
    assert result["valid"] is False and reason in result["reason"]


# ---- faults --------------------------------------------------------------------------------------


def test_throttling_answers_429_with_retry_after_before_any_change(stack, emulator):
    emulator.faults(throttleRate=1.0, retryAfterSeconds=7)
    before = emulator.stats()
    response = _signed_post(stack, "/identities", "")
    assert response.status_code == 429
    assert response.headers["Retry-After"] == "7"
    assert _error(response)["code"] == "TooManyRequests"
    after = emulator.stats()
    assert after["liveIdentities"] == before["liveIdentities"]
    assert after["calls"]["createIdentity"] == before["calls"]["createIdentity"] + 1


def test_sdk_retries_throttled_requests_that_carry_retry_after(stack, emulator):
    emulator.faults(throttleRate=1.0, retryAfterSeconds=0)
    client = CommunicationIdentityClient.from_connection_string(stack["acs_connection_string"], retry_total=2)
    before = emulator.stats()["calls"]["createIdentity"]
    with pytest.raises(HttpResponseError) as caught:
        client.create_user()
    assert caught.value.status_code == 429
    assert emulator.stats()["calls"]["createIdentity"] == before + 3


def test_errors_answer_500(stack, emulator):
    emulator.faults(errorRate=1.0)
    response = _signed_post(stack, "/identities", "")
    assert response.status_code == 500
    assert _error(response)["code"] == "InternalError"


def test_partial_fault_rates_mix_answers(stack, emulator):
    emulator.faults(throttleRate=0.5)
    codes = {_signed_post(stack, "/identities", "").status_code for _ in range(40)}
    assert codes == {201, 429}


def test_latency_slows_answers(stack, emulator):
    emulator.faults(latencyMs=1200)
    started = time.monotonic()
    assert _signed_post(stack, "/identities", "").status_code == 201
    assert time.monotonic() - started >= 1.2


def test_down_closes_connections_without_answer_but_hooks_still_work(stack, emulator):
    emulator.faults(down=True)
    before = emulator.stats()
    with pytest.raises(requests.ConnectionError):
        _signed_post(stack, "/identities", "")
    after = emulator.stats()  # the hooks keep answering
    assert after["liveIdentities"] == before["liveIdentities"]
    assert after["calls"]["createIdentity"] == before["calls"]["createIdentity"] + 1
    emulator.faults(down=False)
    assert _signed_post(stack, "/identities", "").status_code == 201


def test_faults_omitted_fields_stay_unchanged(emulator):
    emulator.faults(latencyMs=5, errorRate=0.25)
    state = emulator.faults(down=False)
    assert state["latencyMs"] == 5 and state["errorRate"] == 0.25


@pytest.mark.parametrize(
    "bad", [{"throttleRate": 2}, {"latencyMs": -1}, {"down": "yes"}, {"speed": 1}, {"errorRate": True}]
)
def test_bad_fault_settings_are_refused(stack, emulator, bad):
    response = requests.post(stack["acs_emulator_hooks"] + "faults", data=json.dumps(bad), timeout=10)
    assert response.status_code == 400
    assert emulator.faults()["throttleRate"] == 0  # nothing applied


def test_reset_clears_identities_and_faults(stack, emulator, client):
    client.create_user()
    emulator.faults(latencyMs=10)
    cleared = emulator.reset()
    assert cleared["liveIdentities"] == 0
    assert emulator.faults()["latencyMs"] == 0


def test_unknown_route_is_404(stack, emulator):
    response = requests.get(stack["acs_endpoint"] + "nothing-here", timeout=10)
    assert response.status_code == 404
