"""azure-data-tables against the stack's Azurite, over HTTPS, with a key and with managed identity."""

from __future__ import annotations

import uuid

import pytest
from azure.data.tables import TableClient, TableServiceClient
from azure.data.tables.aio import TableServiceClient as AioTableServiceClient


def _entity() -> dict:
    return {"PartitionKey": "p", "RowKey": uuid.uuid4().hex, "communicationUserId": "8:acs:x_y", "uses": 3}


def _table_name() -> str:
    return "t" + uuid.uuid4().hex[:12]


@pytest.mark.parametrize("auth", ["connection_string", "managed_identity"])
def test_tables_sync(stack, managed_identity_env, auth):
    if auth == "connection_string":
        service = TableServiceClient.from_connection_string(stack["tables_connection_string"])
    else:
        from azure.identity import ManagedIdentityCredential

        service = TableServiceClient(stack["tables_endpoint"], credential=ManagedIdentityCredential())
    assert service.url.startswith("https://127.0.0.1:")
    name, entity = _table_name(), _entity()
    with service:
        table = service.create_table(name)
        table.create_entity(entity)
        got = table.get_entity(entity["PartitionKey"], entity["RowKey"])
    assert got["communicationUserId"] == entity["communicationUserId"] and got["uses"] == 3


@pytest.mark.parametrize("auth", ["connection_string", "managed_identity"])
async def test_tables_aio(stack, managed_identity_env, auth):
    credential = None
    if auth == "connection_string":
        service = AioTableServiceClient.from_connection_string(stack["tables_connection_string"])
    else:
        from azure.identity.aio import ManagedIdentityCredential

        credential = ManagedIdentityCredential()
        service = AioTableServiceClient(stack["tables_endpoint"], credential=credential)
    name, entity = _table_name(), _entity()
    async with service:
        table = await service.create_table(name)
        await table.create_entity(entity)
        got = await table.get_entity(entity["PartitionKey"], entity["RowKey"])
    if credential:
        await credential.close()
    assert got["RowKey"] == entity["RowKey"]


def test_user_assigned_identity_through_azure_client_id(stack, managed_identity_env, monkeypatch):
    """DefaultAzureCredential with AZURE_CLIENT_ID picks the user-assigned identity."""
    from azure.identity import DefaultAzureCredential

    monkeypatch.setenv("AZURE_CLIENT_ID", stack["user_assigned_client_id"])
    credential = DefaultAzureCredential(
        exclude_environment_credential=True, exclude_workload_identity_credential=True
    )
    table = TableClient(stack["tables_endpoint"], _table_name(), credential=credential)
    table.create_table()
    assert list(table.list_entities()) == []


def test_bearer_token_for_acs_is_refused_by_azurite(stack, managed_identity_env):
    from azure.core.credentials import AccessToken
    from azure.core.exceptions import ClientAuthenticationError, HttpResponseError
    from azure.identity import ManagedIdentityCredential

    acs_token = ManagedIdentityCredential().get_token("https://communication.azure.com//.default")

    class AcsAudience:
        def get_token(self, *scopes, **kwargs) -> AccessToken:
            return acs_token

    table = TableClient(stack["tables_endpoint"], _table_name(), credential=AcsAudience())
    with pytest.raises((ClientAuthenticationError, HttpResponseError)) as caught:
        table.create_table()
    assert caught.value.status_code in (401, 403)
