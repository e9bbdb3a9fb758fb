"""The managed-identity endpoint and the Teams token exchange refuse what Azure refuses."""

from __future__ import annotations

import pytest
import requests
from azure.communication.identity import CommunicationIdentityClient
from azure.core.exceptions import ClientAuthenticationError, HttpResponseError

TEAMS_AUDIENCE = "https://auth.msft.communication.azure.com"


def _msi(stack, header: str | None = None, **params: str) -> requests.Response:
    query = {"api-version": "2019-08-01", "resource": "https://storage.azure.com/", **params}
    headers = {"X-IDENTITY-HEADER": header if header is not None else stack["identity_header"]}
    return requests.get(stack["identity_endpoint"], params=query, headers=headers, timeout=10)


def test_msi_issues_storage_and_acs_tokens(stack):
    for resource in ("https://storage.azure.com/", "https://communication.azure.com"):
        body = _msi(stack, resource=resource).json()
        assert body["resource"] == resource and body["token_type"] == "Bearer"
        assert int(body["expires_on"]) > 0 and body["access_token"].count(".") == 2


@pytest.mark.parametrize(
    ("header", "params", "status"),
    [
        ("wrong", {}, 401),
        ("", {}, 401),
        (None, {"resource": "https://vault.azure.net"}, 400),
        (None, {"api-version": "2017-09-01"}, 400),
        (None, {"client_id": "00000000-0000-0000-0000-000000000000"}, 400),
    ],
)
def test_msi_refusals(stack, header, params, status):
    response = _msi(stack, header, **params)
    assert response.status_code == status
    assert response.json()["message"]


def _teams_token(stack, user: str, *, app_id: str, audience: str = TEAMS_AUDIENCE) -> str:
    return stack.token(user, "--audience", audience, "--app-id", app_id).strip()


def _oid(token: str) -> str:
    import jwt

    return jwt.decode(token, options={"verify_signature": False})["oid"]


def test_teams_exchange(stack, emulator):
    client = CommunicationIdentityClient.from_connection_string(stack["acs_connection_string"])
    app = stack["teams_app_id"]
    aad = _teams_token(stack, "teams-user", app_id=app)
    token = client.get_token_for_teams_user(aad, app, _oid(aad))
    assert emulator.verify(token.token)["valid"]

    with pytest.raises(HttpResponseError) as wrong_app:
        client.get_token_for_teams_user(aad, "11111111-1111-1111-1111-111111111111", _oid(aad))
    assert wrong_app.value.status_code == 400
    assert wrong_app.value.error.message == "AAD application is not the expected one."

    with pytest.raises(HttpResponseError) as empty_app:
        client.get_token_for_teams_user(aad, "", _oid(aad))
    assert empty_app.value.status_code == 400

    for bad in (_teams_token(stack, "teams-user", app_id=app, audience=stack["audience"]), aad + "x"):
        with pytest.raises(ClientAuthenticationError) as caught:
            client.get_token_for_teams_user(bad, app, _oid(aad))
        assert caught.value.error.code == "InvalidAccessToken"
    with pytest.raises(HttpResponseError) as wrong_user:  # someone else's object id: 400, as recorded
        client.get_token_for_teams_user(aad, app, _oid(_teams_token(stack, "other", app_id=app)))
    assert wrong_user.value.status_code == 400 and wrong_user.value.error.code == "ValidationError"
    assert wrong_user.value.error.message == "Provided AAD token issued for unexpected user."
    assert emulator.stats()["calls"]["exchangeTeamsToken"] >= 6
