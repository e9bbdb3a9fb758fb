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


def test_a_small_issue_limit_answers_429_past_it_while_creates_go_on(stack, emulator):
    """Per-operation limits, counted as ACS counts them: the issue limit spends no create and no
    create-and-issue; past it, the SDK sees a 429 whose Retry-After comes from the window."""
    client = CommunicationIdentityClient.from_connection_string(stack["acs_connection_string"], retry_total=0)
    user = client.create_user()
    state = emulator.faults(limits={"issueAccessToken": 3, "windowSeconds": 20})
    assert state["limits"]["issueAccessToken"] == 3 and state["limits"]["windowSeconds"] == 20
    assert state["limits"]["createIdentity"] == 1000  # not named: ACS's own number
    assert emulator.faults()["limits"] == state["limits"]  # reported as in effect
    for _ in range(3):
        client.get_token(user, [CommunicationTokenScope.CHAT])
    with pytest.raises(HttpResponseError) as caught:
        client.get_token(user, [CommunicationTokenScope.CHAT])
    assert caught.value.status_code == 429
    assert 1 <= int(caught.value.response.headers["Retry-After"]) <= 21
    for _ in range(5):
        client.create_user()
        client.create_user_and_token([CommunicationTokenScope.VOIP])  # its own limit, not the issue one
    with pytest.raises(HttpResponseError):
        client.get_token(user, [CommunicationTokenScope.CHAT])  # still within the window
    emulator.faults(limits={"issueAccessToken": 3, "windowSeconds": 20})  # set again: fresh windows
    client.get_token(user, [CommunicationTokenScope.CHAT])


def test_create_and_issue_has_a_limit_of_its_own(stack, emulator):
    client = CommunicationIdentityClient.from_connection_string(stack["acs_connection_string"], retry_total=0)
    emulator.faults(limits={"createIdentityAndIssueAccessToken": 1}, retryAfterSeconds=None)
    client.create_user_and_token([CommunicationTokenScope.CHAT])
    raw = _signed_post(stack, "/identities", json.dumps({"createTokenWithScopes": ["chat"]}))
    assert raw.status_code == 429 and "Retry-After" not in raw.headers
    for body in ("", "{}", json.dumps({"createTokenWithScopes": []})):  # plain creates
        assert _signed_post(stack, "/identities", body).status_code == 201
    user = client.create_user()
    client.get_token(user, [CommunicationTokenScope.CHAT])


@pytest.mark.parametrize(
    ("bad", "field"),
    [
        ({"issueToken": 5}, "unknown operation 'issueToken'"),
        ({"issueAccessToken": 0}, "limits.issueAccessToken"),
        ({"issueAccessToken": 2.5}, "limits.issueAccessToken"),
        ({"windowSeconds": 0}, "limits.windowSeconds"),
        ("on", "limits must be true, false or an object"),
    ],
)
def test_bad_limits_are_refused_with_400_naming_the_field(stack, emulator, bad, field):
    emulator.faults(limits={"issueAccessToken": 4})
    before = emulator.faults()["limits"]
    response = requests.post(stack["acs_emulator_hooks"] + "faults", json={"limits": bad}, timeout=10)
    assert response.status_code == 400
    assert _error(response)["code"] == "ValidationError" and field in _error(response)["message"]
    assert emulator.faults()["limits"] == before


def test_reset_clears_identities_and_faults(stack, emulator, client):
    client.create_user()
    emulator.faults(latencyMs=10)
    cleared = emulator.reset()
    assert cleared["liveIdentities"] == 0
    assert emulator.faults()["latencyMs"] == 0


def test_unknown_route_is_404(stack, emulator):
    response = requests.get(stack["acs_endpoint"] + "nothing-here", timeout=10)
    assert response.status_code == 404


def test_throttling_without_retry_after_is_not_retried_by_the_sdk_on_a_post(stack, emulator, client):
    """azure-core retries a POST 429 only when it carries Retry-After (RetryPolicyBase.is_retry),
    and ACS's docs promise no Retry-After on Identity 429s: `retryAfterSeconds: null` sends none."""
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    raw = _signed_post(stack, "/identities", "")
    assert raw.status_code == 429 and "Retry-After" not in raw.headers
    before = emulator.stats()["calls"]["createIdentity"]
    with pytest.raises(HttpResponseError) as caught:
        client.create_user()
    assert caught.value.status_code == 429
    assert emulator.stats()["calls"]["createIdentity"] == before + 1  # no retry at all


def test_revocation_reaches_verification_after_the_delay_fault(client, emulator):
    """ACS: revocation "can take up to 15 minutes to propagate" (docs: identity model, revoke)."""
    emulator.faults(revocationDelaySeconds=0.5)
    user, token = client.create_user_and_token([CommunicationTokenScope.CHAT])
    client.revoke_tokens(user)
    assert emulator.verify(token.token) == {"valid": True, "reason": "valid: revocation not yet propagated"}
    time.sleep(0.6)
    assert emulator.verify(token.token) == {"valid": False, "reason": "revoked"}


@pytest.mark.parametrize("bad", [{"retryAfterSeconds": -1}, {"revocationDelaySeconds": "soon"}])
def test_bad_delay_settings_are_refused(stack, emulator, bad):
    response = requests.post(stack["acs_emulator_hooks"] + "faults", data=json.dumps(bad), timeout=10)
    assert response.status_code == 400
    assert emulator.faults()["retryAfterSeconds"] == 1 and emulator.faults()["revocationDelaySeconds"] == 0


# ---- Teams exchange: ACS's recorded answers, in ACS's order ---------------------------------------
# Source: azure-sdk-for-python, sdk/communication/azure-communication-identity/tests/recordings/
# test_communication_identity_client.pyTestClienttest_get_token_for_teams_user_with_*.json


OTHER_GUID = "0b8d3c4e-9f1a-4e55-8a1b-2c3d4e5f6a7b"


def _teams_token(stack, user: str, **overrides) -> str:
    from devstack.acs_state import TEAMS_AUDIENCE
    from tests.service_helpers import Users

    return Users(stack).token(
        user, **({"audience": TEAMS_AUDIENCE, "app_id": stack["teams_app_id"]} | overrides)
    )


def test_teams_exchange_with_matching_user_and_app_succeeds(stack, emulator, client):
    from devstack.issuer import object_id_for

    token = client.get_token_for_teams_user(
        _teams_token(stack, "rec-tina"), stack["teams_app_id"], object_id_for("rec-tina").upper()
    )
    assert emulator.verify(token.token)["valid"]  # Entra object ids compare as GUIDs, in any case


@pytest.mark.parametrize(
    ("case", "message", "target"),
    [
        ("wrong_user", "Provided AAD token issued for unexpected user.", "userId"),
        ("wrong_app", "AAD application is not the expected one.", "appId"),
        ("token_for_other_app", "AAD application is not the expected one.", "appId"),
        ("empty_app", "AppId: The AppId field is required.", "AppId"),
        ("invalid_app", "Provided AppId has invalid format.", "appId"),
        ("empty_user", "UserId: The UserId field is required.", "UserId"),
        ("invalid_user", "Provided UserId has invalid format.", "userId"),
    ],
)
def test_teams_exchange_validation_errors_are_recorded_400s(stack, emulator, client, case, message, target):
    from devstack.issuer import object_id_for

    token = _teams_token(stack, "rec-tom")
    app, user = stack["teams_app_id"], object_id_for("rec-tom")
    args = {
        "wrong_user": (token, app, object_id_for("rec-someone-else")),
        "wrong_app": (token, OTHER_GUID, user),
        "token_for_other_app": (_teams_token(stack, "rec-tom", app_id=OTHER_GUID), app, user),
        "empty_app": (token, "", user),
        "invalid_app": (token, "invalid", user),
        "empty_user": (token, app, ""),
        "invalid_user": (token, app, "invalid"),
    }[case]
    with pytest.raises(HttpResponseError) as caught:
        client.get_token_for_teams_user(*args)
    assert not isinstance(caught.value, ClientAuthenticationError)
    assert caught.value.status_code == 400
    error = caught.value.error
    assert (error.code, error.message, error.target) == ("ValidationError", message, target)


@pytest.mark.parametrize("case", ["empty_token", "invalid_token", "expired_token", "forged_token"])
def test_teams_exchange_checks_the_token_before_the_fields(stack, emulator, client, case):
    """Recorded: an empty token with an empty userId is 401 InvalidAccessToken, not a 400."""
    from devstack.signing import SigningKey

    token = {
        "empty_token": "",
        "invalid_token": "invalid",
        "expired_token": _teams_token(stack, "rec-tim", now=time.time() - 7200),
        "forged_token": _teams_token(stack, "rec-tim", key=SigningKey.generate()),
    }[case]
    with pytest.raises(ClientAuthenticationError) as caught:
        client.get_token_for_teams_user(token, "", "")  # the fields would be 400s on their own
    assert caught.value.status_code == 401
    assert (caught.value.error.code, caught.value.error.message) == (
        "InvalidAccessToken",
        "Provided access token is not valid.",
    )
