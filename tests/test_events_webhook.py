"""The Event Grid webhook on the running dev host, fed by the real azure-eventgrid publisher."""

from __future__ import annotations

import uuid

import jwt
import pytest
import requests
from azure.core.credentials import AzureKeyCredential
from azure.core.messaging import CloudEvent
from azure.eventgrid import EventGridEvent, EventGridPublisherClient

GRAPH_SOURCE = "/tenants/{tid}/applications/00000000-0000-0000-0000-000000000000"


def _publisher(stack) -> EventGridPublisherClient:
    # Event Grid authenticates to a Functions webhook with the function key in the URL.
    return EventGridPublisherClient(
        f"{stack['api']}/events?code={stack['function_key']}", AzureKeyCredential("unused-by-webhooks")
    )


def _sign_in(stack, user: str) -> tuple[dict, dict]:
    token = stack.token(user).strip()
    response = requests.post(
        f"{stack['api']}/token", headers={"Authorization": f"Bearer {token}"}, timeout=60
    )
    assert response.status_code == 200, response.text
    return response.json(), jwt.decode(token, options={"verify_signature": False})


def _graph_event(kind: str, claims: dict, event_id: str | None = None) -> CloudEvent:
    return CloudEvent(
        source=GRAPH_SOURCE.format(tid=claims["tid"]),
        type=f"Microsoft.Graph.{kind}",
        subject=f"Users/{claims['oid']}",
        id=event_id or str(uuid.uuid4()),
        data={
            "changeType": "deleted" if kind == "UserDeleted" else "updated",
            "resource": f"Users/{claims['oid']}",
            "resourceData": {
                "@odata.type": "#Microsoft.Graph.User",
                "id": claims["oid"],
                "organizationId": claims["tid"],
            },
        },
    )


def test_graph_user_deleted_cloud_event_deletes_the_identity(stack, emulator):
    issued, claims = _sign_in(stack, "evt-deleted")
    _publisher(stack).send(_graph_event("UserDeleted", claims))
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}
    refresh = requests.post(
        f"{stack['api']}/token/refresh",
        headers={"Authorization": f"Bearer {stack.token('evt-deleted').strip()}"},
        timeout=60,
    )
    assert refresh.status_code == 404


def test_graph_user_updated_revokes_and_the_same_event_twice_acts_once(stack, emulator):
    issued, claims = _sign_in(stack, "evt-updated")
    event_id = str(uuid.uuid4())
    _publisher(stack).send(_graph_event("UserUpdated", claims, event_id))
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "revoked"}
    after, _ = _sign_in(stack, "evt-updated")
    _publisher(stack).send(_graph_event("UserUpdated", claims, event_id))  # redelivered
    assert emulator.verify(after["token"])["valid"]


def test_custom_events_in_event_grid_schema_batched(stack, emulator):
    deleted, _ = _sign_in(stack, "evt-custom-del")
    changed, _ = _sign_in(stack, "evt-custom-cred")
    by_acs_id, _ = _sign_in(stack, "evt-custom-acs")
    events = [
        EventGridEvent(
            subject="users/1",
            event_type="MyApp.UserDeleted",
            data_version="1.0",
            data={"issuer": stack["issuer"], "subject": "evt-custom-del"},
        ),
        EventGridEvent(
            subject="users/2",
            event_type="MyApp.CredentialsChanged",
            data_version="1.0",
            data={"issuer": stack["issuer"], "subject": "evt-custom-cred"},
        ),
        EventGridEvent(
            subject="users/3",
            event_type="MyApp.CredentialsChanged",
            data_version="1.0",
            data={"communicationUserId": by_acs_id["communicationUserId"]},
        ),
        EventGridEvent(subject="x", event_type="Contoso.Items.ItemSold", data_version="1.0", data={"n": 1}),
    ]
    _publisher(stack).send(events)
    assert emulator.verify(deleted["token"])["reason"] == "identity deleted"
    assert emulator.verify(changed["token"])["reason"] == "revoked"
    assert emulator.verify(by_acs_id["token"])["reason"] == "revoked"


def test_subscription_validation_handshake(stack):
    body = [
        {
            "id": str(uuid.uuid4()),
            "topic": "t",
            "subject": "",
            "eventTime": "2026-11-25T12:00:00Z",
            "eventType": "Microsoft.EventGrid.SubscriptionValidationEvent",
            "dataVersion": "1",
            "data": {
                "validationCode": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6",
                "validationUrl": "https://rp-eastus2.eventgrid.azure.net/x",
            },
        }
    ]
    response = requests.post(
        f"{stack['api']}/events",
        json=body,
        timeout=30,
        headers={"aeg-event-type": "SubscriptionValidation", "x-functions-key": stack["function_key"]},
    )
    assert response.status_code == 200
    assert response.json() == {"validationResponse": "512d38b6-c7b8-40c8-89fe-f46f9e9622b6"}


def test_cloudevents_abuse_protection_handshake(stack):
    response = requests.options(
        f"{stack['api']}/events?code={stack['function_key']}",
        timeout=30,
        headers={"WebHook-Request-Origin": "eventgrid.azure.net"},
    )
    assert response.status_code == 200
    assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"


def test_webhook_needs_the_function_key(stack):
    for headers in ({}, {"x-functions-key": "wrong"}):
        assert (
            requests.post(f"{stack['api']}/events", json=[], headers=headers, timeout=30).status_code == 401
        )


@pytest.mark.parametrize("body", [b"{nope", b"[]", b'[{"eventType": "Microsoft.Graph.UserDeleted"}]'])
def test_malformed_deliveries_are_400_and_touch_nothing(stack, emulator, body):
    before = emulator.stats()
    response = requests.post(
        f"{stack['api']}/events",
        data=body,
        timeout=30,
        headers={"x-functions-key": stack["function_key"], "Content-Type": "application/json"},
    )
    assert response.status_code == 400
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert emulator.stats() == before
