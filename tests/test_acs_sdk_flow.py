"""The seed quickstart's whole flow, through azure-communication-identity 1.5, against the emulator.

Four ways in: the sync and the aio client, each with the connection string (HMAC) and with
ManagedIdentityCredential (bearer tokens from the dev App Service endpoint).
"""

from __future__ import annotations

import base64
import datetime as dt
import json

import pytest
from azure.communication.identity import (
    CommunicationIdentityClient,
    CommunicationTokenScope,
    CommunicationUserIdentifier,
)
from azure.communication.identity.aio import CommunicationIdentityClient as AioCommunicationIdentityClient
from azure.core.exceptions import ClientAuthenticationError

SCOPES = [CommunicationTokenScope.CHAT, CommunicationTokenScope.VOIP]


def _expires(access_token) -> dt.datetime:
    # The SDK hands back the service's raw expiresOn string, not a number.
    return dt.datetime.fromisoformat(str(access_token.expires_on))


def _claims(token: str) -> dict:
    payload = token.split(".")[1]
    return json.loads(base64.b64decode(payload + "=="))  # standard base64, as the Python SDK reads it


def _assert_lifetime(access_token, minutes: int) -> None:
    remaining = _expires(access_token) - dt.datetime.now(dt.UTC)
    assert (
        dt.timedelta(minutes=minutes) - dt.timedelta(seconds=30) < remaining <= dt.timedelta(minutes=minutes)
    )
    assert abs(_claims(access_token.token)["exp"] - _expires(access_token).timestamp()) < 1


def _check_flow_results(emulator, results: dict) -> None:
    user, first, custom, pair_user, pair_token, refreshed = (
        results[k] for k in ("user", "first", "custom", "pair_user", "pair_token", "refreshed")
    )
    assert user.properties["id"].startswith("8:acs:")
    _assert_lifetime(first, 1440)  # the service default
    _assert_lifetime(custom, 60)
    assert _claims(custom.token)["acsScope"] == "chat,voip"
    assert pair_user.properties["id"] != user.properties["id"]
    assert _claims(pair_token.token)["acsScope"] == "voip"
    assert refreshed.token != first.token

    assert results["before_revoke"] == [True, True, True]
    assert results["after_revoke"] == [False, False, False]
    assert emulator.verify(results["after_revoke_new"].token)["valid"]
    assert emulator.verify(pair_token.token) == {"valid": False, "reason": "identity deleted"}


def _sync_client(stack, auth: str) -> CommunicationIdentityClient:
    if auth == "key":
        return CommunicationIdentityClient.from_connection_string(stack["acs_connection_string"])
    from azure.identity import ManagedIdentityCredential

    return CommunicationIdentityClient(stack["acs_endpoint"], ManagedIdentityCredential())


@pytest.mark.parametrize("auth", ["key", "managed_identity"])
def test_quickstart_flow_sync(stack, emulator, managed_identity_env, auth):
    client = _sync_client(stack, auth)
    before = emulator.stats()
    results: dict = {}
    results["user"] = user = client.create_user()
    results["first"] = client.get_token(user, SCOPES)
    results["custom"] = client.get_token(user, SCOPES, token_expires_in=dt.timedelta(minutes=60))
    results["pair_user"], results["pair_token"] = client.create_user_and_token(
        [CommunicationTokenScope.VOIP], token_expires_in=dt.timedelta(hours=2)
    )
    _assert_lifetime(results["pair_token"], 120)
    results["refreshed"] = client.get_token(CommunicationUserIdentifier(user.properties["id"]), SCOPES)
    results["before_revoke"] = [
        emulator.verify(t.token)["valid"] for t in (results["first"], results["custom"], results["refreshed"])
    ]
    client.revoke_tokens(user)
    results["after_revoke"] = [
        emulator.verify(t.token)["valid"] for t in (results["first"], results["custom"], results["refreshed"])
    ]
    results["after_revoke_new"] = client.get_token(user, SCOPES)
    client.delete_user(results["pair_user"])
    _check_flow_results(emulator, results)

    after = emulator.stats()
    calls = {op: after["calls"][op] - before["calls"][op] for op in after["calls"]}
    assert calls == {
        "createIdentity": 2,
        "issueAccessToken": 4,
        "revokeAccessTokens": 1,
        "deleteIdentity": 1,
        "exchangeTeamsToken": 0,
    }
    assert after["liveIdentities"] == before["liveIdentities"] + 1


@pytest.mark.parametrize("auth", ["key", "managed_identity"])
async def test_quickstart_flow_aio(stack, emulator, managed_identity_env, auth):
    if auth == "key":
        client = AioCommunicationIdentityClient.from_connection_string(stack["acs_connection_string"])
        credential = None
    else:
        from azure.identity.aio import ManagedIdentityCredential

        credential = ManagedIdentityCredential()
        client = AioCommunicationIdentityClient(stack["acs_endpoint"], credential)
    results: dict = {}
    async with client:
        results["user"] = user = await client.create_user()
        results["first"] = await client.get_token(user, SCOPES)
        results["custom"] = await client.get_token(user, SCOPES, token_expires_in=dt.timedelta(minutes=60))
        results["pair_user"], results["pair_token"] = await client.create_user_and_token(
            [CommunicationTokenScope.VOIP]
        )
        results["refreshed"] = await client.get_token(user, SCOPES)
        results["before_revoke"] = [
            emulator.verify(t.token)["valid"]
            for t in (results["first"], results["custom"], results["refreshed"])
        ]
        await client.revoke_tokens(user)
        results["after_revoke"] = [
            emulator.verify(t.token)["valid"]
            for t in (results["first"], results["custom"], results["refreshed"])
        ]
        results["after_revoke_new"] = await client.get_token(user, SCOPES)
        await client.delete_user(results["pair_user"])
    if credential is not None:
        await credential.close()
    _check_flow_results(emulator, results)


def test_sdk_token_credential_reads_emulator_tokens(stack, emulator):
    """CommunicationTokenCredential decodes `exp` with standard base64: emulator tokens must survive it."""
    from azure.communication.identity._shared.user_credential import CommunicationTokenCredential

    client = CommunicationIdentityClient.from_connection_string(stack["acs_connection_string"])
    for _ in range(20):  # different ids and timestamps give different payload bytes
        _user, token = client.create_user_and_token(SCOPES)
        with CommunicationTokenCredential(token.token) as credential:
            assert credential.get_token().expires_on == _claims(token.token)["exp"]


def test_bearer_token_for_another_audience_is_refused(stack, emulator, managed_identity_env):
    """A storage token from the same managed identity must not open ACS."""
    from azure.core.credentials import AccessToken
    from azure.identity import ManagedIdentityCredential

    storage_token = ManagedIdentityCredential().get_token("https://storage.azure.com/.default")

    class WrongAudience:
        def get_token(self, *scopes, **kwargs) -> AccessToken:
            return storage_token

    client = CommunicationIdentityClient(stack["acs_endpoint"], WrongAudience())
    with pytest.raises(ClientAuthenticationError):
        client.create_user()
