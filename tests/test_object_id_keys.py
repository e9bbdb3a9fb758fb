"""AUTH_USER_CLAIM=oid: users keyed by Entra object id, found by Graph events without a lookup row."""

from __future__ import annotations

import uuid

import jwt

import function_app
from shared import keys
from shared.auth import Caller
from shared.clients import get_clients, reset_clients
from shared.policy import TokenRequest
from shared.settings import load, reset_settings
from tests.service_fixtures import configure
from tests.service_helpers import Users, body_of, graph_rows, request

BASE = {
    "AUTH_ISSUER": "https://login.microsoftonline.com/t/v2.0",
    "AUTH_AUDIENCE": "a",
    "ACS_ENDPOINT": "https://a.example",
    "TABLES_ENDPOINT": "https://t.example",
}


def test_only_jwt_validation_with_the_oid_claim_keys_users_by_object_id():
    assert load(BASE).object_id_issuer is None
    assert load({**BASE, "AUTH_USER_CLAIM": "oid"}).object_id_issuer == BASE["AUTH_ISSUER"]
    easy = {**BASE, "AUTH_MODE": "easyauth", "AUTH_USER_CLAIM": "oid"}
    assert load(easy).object_id_issuer is None  # the issuer comes with each request there


def _graph_event(kind: str, tenant_id: str, object_id: str) -> bytes:
    import json

    return json.dumps(
        {
            "specversion": "1.0",
            "id": str(uuid.uuid4()),
            "source": f"/tenants/{tenant_id}/applications/00000000-0000-0000-0000-000000000000",
            "type": f"Microsoft.Graph.{kind}",
            "subject": f"Users/{object_id}",
            "data": {
                "changeType": "deleted",
                "resource": f"Users/{object_id}",
                "resourceData": {"id": object_id, "organizationId": tenant_id},
            },
        }
    ).encode()


async def _deliver(body: bytes):
    headers = {"Content-Type": "application/cloudevents+json; charset=utf-8"}
    return await function_app.events(request("POST", "events", raw=body, headers=headers))


async def test_graph_events_find_oid_keyed_users_without_a_lookup_row(stack, emulator, monkeypatch):
    await configure(monkeypatch, stack, managed_identity=False, AUTH_USER_CLAIM="oid")
    users = Users(stack)
    try:
        token = users.token("oid-keyed")
        claims = jwt.decode(token, options={"verify_signature": False})
        response = await function_app.issue_token(request("POST", "token", token=token))
        assert response.status_code == 200, response.get_body()
        issued = body_of(response)
        store = get_clients().store
        key = keys.user_key(stack["issuer"], claims["oid"])
        assert (await store.get(key)).communication_user_id == issued["communicationUserId"]
        assert await graph_rows(store.table, claims["tid"], claims["oid"]) == []

        # The same object id in another tenant is not this user: nothing happens.
        other_tenant = str(uuid.uuid4())
        ignored = await _deliver(_graph_event("UserDeleted", other_tenant, claims["oid"]))
        assert ignored.status_code == 200, ignored.get_body()
        assert emulator.verify(issued["token"])["valid"]

        deleted = await _deliver(_graph_event("UserDeleted", claims["tid"].upper(), claims["oid"].upper()))
        assert deleted.status_code == 200, deleted.get_body()
        assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}
        assert await store.get(key) is None
        assert await store.owner_of(issued["communicationUserId"]) is None
    finally:
        await reset_clients()
        reset_settings()


async def test_a_graph_row_acts_only_on_the_entra_user_the_mapping_records(service, emulator):
    token = service.token("graph-checked")
    claims = jwt.decode(token, options={"verify_signature": False})
    issued = body_of(await function_app.issue_token(request("POST", "token", token=token)))
    store = get_clients().store
    key = keys.user_key(service.stack["issuer"], "graph-checked")
    stranger = str(uuid.uuid4())  # a row naming this user for another object id: stale or misdirected
    await store.table.upsert_entity(
        {
            "PartitionKey": keys.INDEX_PARTITION,
            "RowKey": keys.graph_row(claims["tid"], stranger, key),
            "userKey": key,
        }
    )
    assert (await _deliver(_graph_event("UserDeleted", claims["tid"], stranger))).status_code == 200
    assert emulator.verify(issued["token"])["valid"]

    assert (await _deliver(_graph_event("UserDeleted", claims["tid"], claims["oid"]))).status_code == 200
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}


async def test_a_graph_event_reaches_every_app_key_of_the_entra_user(service, emulator):
    # One person, two app keys: e.g. two app registrations (a `sub` differs per app) or issuers.
    token = service.token("two-apps")
    claims = jwt.decode(token, options={"verify_signature": False})
    first = body_of(await function_app.issue_token(request("POST", "token", token=token)))
    clients = get_clients()
    other = Caller(
        issuer="https://login.microsoftonline.com/other-app/v2.0",
        subject="pairwise-sub-of-the-other-app",
        object_id=claims["oid"],
        tenant_id=claims["tid"],
    )
    other_key = keys.user_key(other.issuer, other.subject)
    second = await clients.tokens._create(other, other_key, TokenRequest(scopes=("chat",), minutes=60))
    assert second.communication_user_id != first["communicationUserId"]
    assert len(await graph_rows(clients.store.table, claims["tid"], claims["oid"])) == 2

    assert (await _deliver(_graph_event("UserDeleted", claims["tid"], claims["oid"]))).status_code == 200
    assert emulator.verify(first["token"]) == {"valid": False, "reason": "identity deleted"}
    assert emulator.verify(second.token.token) == {"valid": False, "reason": "identity deleted"}
    assert await clients.store.get(other_key) is None
    assert await graph_rows(clients.store.table, claims["tid"], claims["oid"]) == []
