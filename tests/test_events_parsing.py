"""Event Grid webhook deliveries -> actions (`shared/events/`): both schemas, the handshakes, Graph payloads
as Microsoft documents them, custom app events, every malformed case, and what the real azure-eventgrid
publisher puts on the wire.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import azure.functions as func
import pytest
from azure.core.credentials import AzureKeyCredential
from azure.core.messaging import CloudEvent
from azure.eventgrid import EventGridEvent, EventGridPublisherClient

from shared.errors import BadRequest, PayloadTooLarge
from shared.events import (
    Action,
    Delivery,
    EventTarget,
    EventTypes,
    handshake_allowed_origin,
    parse_delivery,
)
from shared.events.delivery import MAX_BODY_BYTES, MAX_EVENTS
from shared.events.model import CLOUDEVENTS_SCHEMA, EVENT_GRID_SCHEMA

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
USER = "87d349ed-44d7-43e1-9a83-5f2406dee5bd"
APP = "0ad2f5a2-6f32-4c1a-bd77-0d9f8c6b3b3e"
ISSUER = "https://login.example.com/tenant/v2.0"
ACS_USER = "8:acs:0b3b1b0e-3bd5-4b2e-9c4a-1c1d5d3e5f00_00000020-1111-2222-3333-444455556666"

TYPES = EventTypes(
    user_deleted=("Contoso.App.UserDeleted",), credentials_changed=("Contoso.App.PasswordChanged",)
)
EG = "application/json"
CE = "application/cloudevents+json"
CE_BATCH = "application/cloudevents-batch+json"
VALIDATION = "Microsoft.EventGrid.SubscriptionValidationEvent"
TOPIC = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.EventGrid/topics/contoso"
GRAPH_SOURCE = f"/tenants/{TENANT}/applications/{APP}"
# What names an event once, by schema: (schema, source) go with the id into Action.
IN_GRID = (EVENT_GRID_SCHEMA, TOPIC)
IN_GRAPH = (CLOUDEVENTS_SCHEMA, GRAPH_SOURCE)


def body(value: Any) -> bytes:
    return json.dumps(value).encode()


def parse(
    value: Any, content_type: str | None = EG, aeg: str | None = "Notification", **types: Any
) -> Delivery:
    raw = value if isinstance(value, bytes) else body(value)
    return parse_delivery(raw, content_type, aeg, dataclasses.replace(TYPES, **types))


def rejected(value: Any, match: str, content_type: str | None = EG, aeg: str | None = "Notification") -> None:
    with pytest.raises(BadRequest, match=match) as caught:
        parse(value, content_type, aeg)
    assert caught.value.code == "invalid_event" and caught.value.status == 400


# Payloads as delivered ------------------------------------------------------------------------------


def graph_event(
    event_type: str = "Microsoft.Graph.UserDeleted", event_id: str = "graph-1", **change: Any
) -> dict:
    """A Microsoft Graph user change notification as a partner topic delivers it (CloudEvents 1.0).

    Shape from Microsoft's "Microsoft Entra events" page for Azure Event Grid.
    """
    data = {
        "changeType": "deleted" if event_type.endswith("Deleted") else "updated",
        "clientState": "5b8e1a39-0c0f-4d3d-a8a0-5e5d1b9d7c11",
        "resource": f"Users/{USER}",
        "resourceData": {
            "@odata.type": "#Microsoft.Graph.User",
            "@odata.id": f"Users/{USER}",
            "id": USER,
            "organizationId": TENANT,
            "eventTime": "2026-11-24T22:24:31.3062901Z",
            "sequenceNumber": 638,
        },
        "subscriptionExpirationDateTime": "2026-11-24T23:21:19.3554403+00:00",
        "subscriptionId": "d1c4e0a2-3b2e-4f6f-9c55-1e2f3a4b5c6d",
        "tenantId": TENANT,
    }
    data.update(change)
    return {
        "id": event_id,
        "type": event_type,
        "source": GRAPH_SOURCE,
        "subject": f"Users/{USER}",
        "time": "2026-11-24T22:24:31.3062901Z",
        "datacontenttype": "application/json",
        "specversion": "1.0",
        "data": data,
    }


def cloud_event(event_type: str, data: Any = None, event_id: str = "ce-1", **extra: Any) -> dict:
    event = {
        "specversion": "1.0",
        "id": event_id,
        "source": "/contoso/identity",
        "type": event_type,
        "time": "2026-11-24T22:24:31Z",
        "datacontenttype": "application/json",
        **extra,
    }
    if data is not None:
        event["data"] = data
    return event


def grid_event(event_type: str, data: Any = None, event_id: str = "eg-1", **extra: Any) -> dict:
    """An Event Grid schema event as Event Grid delivers it (topic and metadataVersion added)."""
    return {
        "id": event_id,
        "topic": TOPIC,
        "subject": "/identity/users",
        "eventType": event_type,
        "eventTime": "2026-11-24T22:24:31.1234567Z",
        "data": data if data is not None else {},
        "dataVersion": "1.0",
        "metadataVersion": "1",
        **extra,
    }


def validation_event(code: Any = "512d38b6-c7b8-40c8-89fe-f46f9e9622b6") -> dict:
    return grid_event(
        VALIDATION,
        {
            "validationCode": code,
            "validationUrl": "https://rp-eastus2.eventgrid.azure.net:553/eventsubscriptions/x/validate?id=1&t=2",
        },
        event_id="2d1781af-3a4c-4d7c-bd0c-e34b19da4e66",
        subject="",
    )


APP_USER = {"issuer": ISSUER, "subject": "alice"}
GRAPH_USER = EventTarget(tenant_id=TENANT, object_id=USER)


# Event Grid schema -----------------------------------------------------------------------------------


def test_event_grid_custom_user_deleted():
    delivery = parse([grid_event("Contoso.App.UserDeleted", APP_USER)])
    target = EventTarget(issuer=ISSUER, subject="alice")
    assert delivery == Delivery(
        None, (Action("eg-1", "delete", target, "Contoso.App.UserDeleted", *IN_GRID),), 0
    )


def test_event_grid_custom_credentials_changed_by_identity():
    delivery = parse([grid_event("Contoso.App.PasswordChanged", {"communicationUserId": ACS_USER})])
    (action,) = delivery.actions
    assert action.kind == "revoke" and action.target == EventTarget(communication_user_id=ACS_USER)


def test_event_grid_batch_mixing_types_keeps_order_and_counts_the_rest():
    delivery = parse(
        [
            grid_event("Microsoft.Storage.BlobCreated", {"url": "https://x"}, event_id="a"),
            grid_event("Contoso.App.PasswordChanged", APP_USER, event_id="b"),
            grid_event("Contoso.App.UserDeleted", {"communicationUserId": ACS_USER}, event_id="c"),
            grid_event("Contoso.App.SomethingElse", {}, event_id="d"),
        ]
    )
    assert [(a.event_id, a.kind) for a in delivery.actions] == [("b", "revoke"), ("c", "delete")]
    assert delivery.ignored == 2 and delivery.validation_code is None


def test_event_grid_schema_carrying_a_graph_event():
    data = graph_event()["data"]
    delivery = parse([grid_event("Microsoft.Graph.UserDeleted", data, subject=f"Users/{USER}")])
    assert delivery.actions == (
        Action("eg-1", "delete", GRAPH_USER, "Microsoft.Graph.UserDeleted", *IN_GRID),
    )


def test_only_unrelated_events():
    events = [
        grid_event("Microsoft.Resources.ResourceWriteSuccess", {"x": 1}, event_id=str(i)) for i in range(3)
    ]
    assert parse(events) == Delivery(None, (), 3)


def test_event_grid_event_without_data_is_fine_when_unrelated():
    event = grid_event("Other.Type")
    del event["data"]
    assert parse([event]).ignored == 1


# Validation handshake (Event Grid schema) --------------------------------------------------------------


@pytest.mark.parametrize(
    "header", ["SubscriptionValidation", "subscriptionvalidation", " SubscriptionValidation "]
)
def test_validation_handshake(header: str):
    delivery = parse([validation_event()], "application/json; charset=utf-8", header)
    assert delivery == Delivery("512d38b6-c7b8-40c8-89fe-f46f9e9622b6", (), 0)


@pytest.mark.parametrize("header", [None, "", "Notification"])
def test_validation_event_without_the_header_is_malformed(header: str | None):
    rejected([validation_event()], "aeg-event-type: SubscriptionValidation", aeg=header)


@pytest.mark.parametrize("code", [None, 42, "", "  ", ["x"], "x" * 1025])
def test_validation_event_needs_a_string_code(code: Any):
    rejected([validation_event(code)], "validationCode", aeg="SubscriptionValidation")


def test_validation_event_without_data_is_malformed():
    event = validation_event()
    del event["data"]
    rejected([event], "validationCode", aeg="SubscriptionValidation")


def test_validation_header_needs_exactly_one_validation_event():
    rejected([validation_event(), validation_event()], "exactly one", aeg="SubscriptionValidation")
    rejected([grid_event("Contoso.App.UserDeleted", APP_USER)], "exactly one", aeg="SubscriptionValidation")
    mixed = [grid_event("Contoso.App.UserDeleted", APP_USER), validation_event()]
    rejected(mixed, "exactly one", aeg="SubscriptionValidation")
    rejected(mixed, "SubscriptionValidation", aeg="Notification")


# CloudEvents 1.0 -----------------------------------------------------------------------------------------


def test_cloudevents_single_graph_user_deleted():
    delivery = parse(graph_event(), CE)
    assert delivery == Delivery(
        None, (Action("graph-1", "delete", GRAPH_USER, "Microsoft.Graph.UserDeleted", *IN_GRAPH),), 0
    )


def test_cloudevents_batch_mixing_graph_custom_and_unrelated():
    group = graph_event("Microsoft.Graph.GroupUpdated", event_id="g")
    group["subject"] = "Groups/0f0e0d0c-0000-0000-0000-000000000000"
    delivery = parse(
        [
            graph_event("Microsoft.Graph.UserUpdated", event_id="u1"),
            group,
            cloud_event("Contoso.App.PasswordChanged", {"communicationUserId": ACS_USER}, event_id="c1"),
            graph_event("Microsoft.Graph.UserDeleted", event_id="u2"),
            cloud_event("Contoso.App.UserDeleted", APP_USER, event_id="c2"),
            cloud_event("Contoso.App.Unrelated", event_id="x"),
        ],
        CE_BATCH,
    )
    assert [(a.event_id, a.kind, a.event_type) for a in delivery.actions] == [
        ("u1", "revoke", "Microsoft.Graph.UserUpdated"),
        ("c1", "revoke", "Contoso.App.PasswordChanged"),
        ("u2", "delete", "Microsoft.Graph.UserDeleted"),
        ("c2", "delete", "Contoso.App.UserDeleted"),
    ]
    assert delivery.actions[0].target == GRAPH_USER
    assert delivery.actions[1].target == EventTarget(communication_user_id=ACS_USER)
    assert delivery.actions[3].target == EventTarget(issuer=ISSUER, subject="alice")
    assert delivery.ignored == 2


def test_graph_user_updated_is_ignored_when_the_setting_is_off():
    events = [graph_event("Microsoft.Graph.UserUpdated"), graph_event("Microsoft.Graph.UserDeleted", "d")]
    delivery = parse(events, CE_BATCH, revoke_on_graph_user_updated=False)
    assert [a.kind for a in delivery.actions] == ["delete"] and delivery.ignored == 1
    # Not ours, so not inspected either: a UserUpdated without usable data is acknowledged.
    assert (
        parse(cloud_event("Microsoft.Graph.UserUpdated"), CE, revoke_on_graph_user_updated=False).ignored == 1
    )


def test_cloudevent_without_data_is_fine_when_unrelated():
    assert parse(cloud_event("Contoso.App.Other"), CE) == Delivery(None, (), 1)


def test_cloudevents_posted_as_application_json_are_recognised():
    assert parse(graph_event(), EG).actions[0].target == GRAPH_USER
    assert parse([graph_event(), cloud_event("x.y")], EG) == parse(
        [graph_event(), cloud_event("x.y")], CE_BATCH
    )


@pytest.mark.parametrize(
    "content_type",
    [
        "application/cloudevents-batch+json; charset=utf-8",
        "Application/CloudEvents-Batch+JSON;charset=UTF-8",
        " application/cloudevents-batch+json ; charset=utf-8 ",
    ],
)
def test_content_type_parameters_and_case_are_tolerated(content_type: str):
    assert parse([graph_event()], content_type).actions[0].kind == "delete"


@pytest.mark.parametrize("content_type", [None, "", "application/json", "APPLICATION/JSON; charset=utf-8"])
def test_plain_or_missing_content_type_reads_either_schema(content_type: str | None):
    assert parse([grid_event("Contoso.App.UserDeleted", APP_USER)], content_type).actions[0].kind == "delete"
    assert parse([graph_event()], content_type).actions[0].kind == "delete"


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/xml", "application/cloudevents", "multipart/x"]
)
def test_unsupported_content_type(content_type: str):
    rejected([graph_event()], "Unsupported content type", content_type)
    rejected(b"<events/>", "Unsupported content type", content_type)  # checked before the body


def test_cloudevent_extension_attributes_are_ignored():
    event = graph_event()
    event.update(traceparent="00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01", partitionkey="p")
    assert parse(event, CE).actions[0].target == GRAPH_USER


# Microsoft Graph payloads -------------------------------------------------------------------------------


def test_graph_object_id_falls_back_to_subject_and_tenant_to_data_tenant_id():
    event = graph_event()
    del event["data"]["resourceData"]
    assert parse(event, CE).actions[0].target == GRAPH_USER


def test_graph_resource_data_without_id_or_organization():
    event = graph_event()
    del event["data"]["resourceData"]["id"], event["data"]["resourceData"]["organizationId"]
    assert parse(event, CE).actions[0].target == GRAPH_USER


def test_graph_object_id_from_lowercase_subject_or_data_resource():
    event = graph_event()
    del event["data"]["resourceData"]["id"]
    event["subject"] = f"users/{USER}"
    assert parse(event, CE).actions[0].target.object_id == USER
    del event["subject"]
    assert parse(event, CE).actions[0].target.object_id == USER


def test_graph_resource_data_wins_over_the_fallbacks():
    event = graph_event(tenantId="other-tenant")
    event["subject"] = "Users/other-user"
    assert parse(event, CE).actions[0].target == GRAPH_USER


def test_graph_ids_are_kept_verbatim():
    event = graph_event()
    event["data"]["resourceData"]["id"] = USER.upper()
    assert parse(event, CE).actions[0].target.object_id == USER.upper()


def _without_tenant(event: dict) -> None:
    del event["data"]["resourceData"]["organizationId"], event["data"]["tenantId"]


def _without_object_id(event: dict) -> None:
    del event["data"]["resourceData"]["id"], event["data"]["resource"], event["subject"]


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def change(event: dict) -> None:
        *parents, leaf = path.split(".")
        target = event
        for key in parents:
            target = target[key]
        target[leaf] = value

    return change


@pytest.mark.parametrize("event_type", ["Microsoft.Graph.UserDeleted", "Microsoft.Graph.UserUpdated"])
@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_without_tenant, "tenant id"),
        (_without_object_id, "object id"),
        (_set("subject", "Groups/x"), None),
        (_set("subject", f"Users/{USER}/manager"), None),
        (_set("subject", "Users/"), None),
        (_set("data.resourceData.organizationId", ""), "tenant id"),
        (_set("data.resourceData.organizationId", 7), "tenant id"),
        (_set("data.resourceData.id", 12345), "object id"),
        (_set("data.resourceData.id", "x" * 1025), "longer than 1024"),
        (_set("data.resourceData", "Users/x"), "resourceData must be a JSON object"),
        (_set("data", None), "data as a JSON object"),
        (_set("data", [USER]), "data as a JSON object"),
    ],
)
def test_graph_event_without_usable_ids_is_malformed(event_type: str, change: Callable, match: str | None):
    event = graph_event(event_type)
    if match is None:  # a subject that is not Users/<id>, with no other object id to fall back on
        del event["data"]["resourceData"]["id"], event["data"]["resource"]
        match = "object id"
    change(event)
    rejected(event, match, CE)


# Custom app events ---------------------------------------------------------------------------------------


def test_custom_event_types_match_case_insensitively_and_delete_wins_a_tie():
    types = {"user_deleted": ("contoso.app.userdeleted", "Both"), "credentials_changed": ("Both",)}
    delivery = parse(
        [
            cloud_event("Contoso.App.UserDeleted", APP_USER, event_id="1"),
            cloud_event("BOTH", APP_USER, event_id="2"),
        ],
        CE_BATCH,
        **types,
    )
    assert [a.kind for a in delivery.actions] == ["delete", "delete"]
    assert delivery.actions[0].event_type == "Contoso.App.UserDeleted"  # as sent


def test_no_custom_types_configured_means_custom_events_are_ignored():
    event = cloud_event("Contoso.App.UserDeleted", APP_USER)
    assert parse(event, CE, user_deleted=(), credentials_changed=()) == Delivery(None, (), 1)


def test_custom_event_null_members_count_as_absent():
    data = {"issuer": None, "subject": None, "communicationUserId": ACS_USER}
    assert (
        parse(cloud_event("Contoso.App.UserDeleted", data), CE).actions[0].target.communication_user_id
        == ACS_USER
    )
    data = {**APP_USER, "communicationUserId": None, "reason": "offboarded"}
    assert parse(cloud_event("Contoso.App.UserDeleted", data), CE).actions[0].target.subject == "alice"


@pytest.mark.parametrize("schema", ["grid", "cloud"])
@pytest.mark.parametrize(
    ("data", "match"),
    [
        (None, "issuer"),
        ("alice", "issuer"),
        ([APP_USER], "issuer"),
        ({}, "issuer"),
        ({"user": "alice"}, "issuer"),
        ({**APP_USER, "communicationUserId": ACS_USER}, "both"),
        ({"subject": "alice", "communicationUserId": ACS_USER}, "both"),
        ({"issuer": ISSUER}, "data.subject"),
        ({"subject": "alice"}, "data.issuer"),
        ({"issuer": ISSUER, "subject": 42}, "data.subject"),
        ({"issuer": ISSUER, "subject": ""}, "data.subject"),
        ({"issuer": " ", "subject": "alice"}, "data.issuer"),
        ({"issuer": ISSUER, "subject": "a" * 1025}, "longer than 1024"),
        ({"communicationUserId": ""}, "communicationUserId"),
        ({"communicationUserId": {"id": ACS_USER}}, "communicationUserId"),
        ({"communicationUserId": "8" * 1025}, "longer than 1024"),
    ],
)
def test_custom_event_with_unusable_data_is_malformed(schema: str, data: Any, match: str):
    for event_type in ("Contoso.App.UserDeleted", "Contoso.App.PasswordChanged"):
        if schema == "grid":
            event = grid_event(event_type, data)
            if data is None:
                del event["data"]
            rejected([event], match)
        else:
            rejected(cloud_event(event_type, data), match, CE)


def test_custom_event_claims_up_to_1024_characters_are_kept():
    data = {"issuer": "i" * 1024, "subject": "s" * 1024}
    target = parse(cloud_event("Contoso.App.UserDeleted", data), CE).actions[0].target
    assert target == EventTarget(issuer="i" * 1024, subject="s" * 1024)


# What names an event once -------------------------------------------------------------------------------
# CloudEvents 1.0, `id`: "Producers MUST ensure that source + id is unique for each distinct event.
# [...] Consumers MAY assume that Events with identical source and id are duplicates" (the
# CloudEvents specification, spec.md, "id"); an id alone is unique only within its source. The Event
# Grid schema's `topic` is "Full resource path to the event source. This field isn't writeable.
# Event Grid provides this value" (Microsoft Learn, "Azure Event Grid event schema").


def test_each_event_carries_what_its_schema_makes_unique():
    cloud = parse(
        [cloud_event("Contoso.App.UserDeleted", APP_USER, event_id="1"), graph_event(event_id="1")],
        CE_BATCH,
    )
    assert [(a.schema, a.source, a.event_id) for a in cloud.actions] == [
        (CLOUDEVENTS_SCHEMA, "/contoso/identity", "1"),
        (CLOUDEVENTS_SCHEMA, GRAPH_SOURCE, "1"),
    ]
    grid = parse([grid_event("Contoso.App.UserDeleted", APP_USER, event_id="1")])
    assert [(a.schema, a.source, a.event_id) for a in grid.actions] == [(EVENT_GRID_SCHEMA, TOPIC, "1")]
    untopical = grid_event("Contoso.App.UserDeleted", APP_USER)
    del untopical["topic"]  # posted straight to the webhook, not through Event Grid
    assert parse([untopical]).actions[0].source == ""
    lifecycle = graph_event(
        "Microsoft.Graph.SubscriptionReauthorizationRequired",
        event_id="7",
        lifecycleEvent="reauthorizationRequired",
    )
    (notice,) = parse(lifecycle, CE).lifecycle
    assert (notice.schema, notice.source, notice.event_id) == (CLOUDEVENTS_SCHEMA, GRAPH_SOURCE, "7")


@pytest.mark.parametrize("topic", ["", 5, "x" * 1025])
def test_an_event_grid_topic_when_given_is_a_sane_string(topic: Any):
    rejected([grid_event("Contoso.App.UserDeleted", APP_USER, topic=topic)], "topic")


def test_mark_keys_keep_schemas_sources_and_kinds_apart():
    from shared.store import keys

    marks = {
        keys.event_mark(CLOUDEVENTS_SCHEMA, "/a", "1"),
        keys.event_mark(CLOUDEVENTS_SCHEMA, "/b", "1"),  # same id, another source
        keys.event_mark(EVENT_GRID_SCHEMA, "/a", "1"),  # same source and id, the other schema
        keys.event_mark(CLOUDEVENTS_SCHEMA, "/a|1", ""),  # the parts are length-prefixed
        keys.event_mark(CLOUDEVENTS_SCHEMA, "", "/a1"),
        keys.identity_mark(CLOUDEVENTS_SCHEMA, "/a", "1", "u-x"),
        keys.identity_mark(CLOUDEVENTS_SCHEMA, "/a", "1", "u-y"),
    }
    assert len(marks) == 7
    # An identity's mark lives under a prefix no event's mark has, whatever the event's id says:
    # before, an event with id "G/<user key>" marked what Graph event G's identity mark was.
    user_key = keys.user_key(ISSUER, "alice")
    forged = keys.event_mark(CLOUDEVENTS_SCHEMA, "/a", f"G/{user_key}")
    real = keys.identity_mark(CLOUDEVENTS_SCHEMA, GRAPH_SOURCE, "G", user_key)
    assert forged.startswith(keys.EVENT_MARK_PREFIX) and real.startswith(keys.IDENTITY_MARK_PREFIX)
    assert not keys.EVENT_MARK_PREFIX.startswith(keys.IDENTITY_MARK_PREFIX)
    assert not keys.IDENTITY_MARK_PREFIX.startswith(keys.EVENT_MARK_PREFIX)
    # ... and under neither of the first format's ("e-" + digest): such rows are never read again.
    assert not any(mark.startswith("e-") for mark in marks)
    assert all(len(mark) <= 64 and "/" not in mark for mark in marks)  # legal, short Table keys


# Malformed deliveries ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"   ",
        b"not json",
        b"[{]",
        b'[{"id": "a"}',
        '[{"id": "caf\xe9"}]'.encode("latin-1"),
        json.dumps([grid_event("x")]).encode("utf-16"),
        b'[{"id": "a", "eventType": "x", "data": NaN}]',
        b'[{"id": "a", "eventType": "x", "data": Infinity}]',
        b"[" * 100_000 + b"]" * 100_000,
    ],
)
def test_body_must_be_utf8_json(raw: bytes):
    rejected(raw, "not valid UTF-8 JSON")


def test_utf8_bom_is_tolerated():
    raw = b"\xef\xbb\xbf" + body([grid_event("Contoso.App.UserDeleted", APP_USER)])
    assert parse(raw).actions[0].kind == "delete"


def test_non_ascii_claims_survive():
    data = {"issuer": ISSUER, "subject": "zoë-日本"}
    raw = json.dumps([grid_event("Contoso.App.UserDeleted", data)], ensure_ascii=False).encode()
    assert parse(raw).actions[0].target.subject == "zoë-日本"


@pytest.mark.parametrize(
    ("value", "content_type", "match"),
    [
        (grid_event("x"), EG, "JSON array"),  # Event Grid schema must be an array
        ("events", EG, "JSON array"),
        (42, EG, "JSON array"),
        (None, EG, "JSON array"),
        ([graph_event()], CE, "one JSON object"),
        (graph_event(), CE_BATCH, "JSON array"),
        ("x", CE, "one JSON object"),
        (["x"], EG, "not a JSON object"),
        ([grid_event("x"), "x"], EG, "#1 is not a JSON object"),
        ([None], CE_BATCH, "#0 is not a JSON object"),
        ([graph_event(), []], CE_BATCH, "#1 is not a JSON object"),
    ],
)
def test_wrong_top_level_shape(value: Any, content_type: str, match: str):
    rejected(value, match, content_type)


@pytest.mark.parametrize("content_type", [EG, CE_BATCH])
def test_empty_batch(content_type: str):
    rejected([], "no events", content_type)


def _drop(key: str) -> Callable[[dict], None]:
    return lambda event: event.pop(key)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_drop("id"), "id must be"),
        (_set("id", ""), "id must be"),
        (_set("id", " "), "id must be"),
        (_set("id", 17), "id must be"),
        (_set("id", None), "id must be"),
        (_set("id", "x" * 1025), "id is longer than 1024"),
        (_drop("eventType"), "eventType"),
        (_set("eventType", ""), "eventType"),
        (_set("eventType", ["a"]), "eventType"),
    ],
)
def test_event_grid_event_needs_id_and_type(change: Callable, match: str):
    event = grid_event("Contoso.App.UserDeleted", APP_USER, event_id="bad")
    change(event)
    rejected([grid_event("Other", event_id="ok"), event], match)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (_drop("id"), "id must be"),
        (_set("id", ""), "id must be"),
        (_set("id", "x" * 1025), "longer than 1024"),
        (_drop("type"), "type must be"),
        (_set("type", 5), "type must be"),
        (_drop("source"), "source must be"),
        (_set("source", ""), "source must be"),
        (_drop("specversion"), "specversion"),  # in a cloudevents batch it is still required
        (_set("specversion", "0.3"), "specversion"),
        (_set("specversion", 1.0), "specversion"),
    ],
)
def test_cloudevent_needs_its_required_attributes(change: Callable, match: str):
    event = graph_event(event_id="bad")
    change(event)
    rejected([cloud_event("Other", event_id="ok"), event], match, CE_BATCH)
    rejected(event, match, CE)


def test_error_details_name_the_event():
    bad = cloud_event("Contoso.App.UserDeleted", {"issuer": ISSUER}, event_id="evt-42")
    with pytest.raises(BadRequest) as caught:
        parse([cloud_event("Other", event_id="a"), bad], CE_BATCH)
    assert "Event #1 (id 'evt-42')" in caught.value.detail
    assert ISSUER not in caught.value.detail  # event data is not echoed back


def test_one_malformed_event_rejects_the_whole_delivery():
    good = [cloud_event("Contoso.App.UserDeleted", APP_USER, event_id=str(i)) for i in range(10)]
    rejected([*good, cloud_event("Contoso.App.UserDeleted", {}, event_id="bad")], "bad", CE_BATCH)
    rejected([*good, {"specversion": "1.0"}], "#10", CE_BATCH)


def test_batch_size_limit():
    events = [grid_event("Other", {}, event_id=str(i)) for i in range(MAX_EVENTS)]
    for event in events:  # keep the body under 1 MiB
        del (
            event["topic"],
            event["subject"],
            event["eventTime"],
            event["dataVersion"],
            event["metadataVersion"],
        )
    assert parse(events).ignored == MAX_EVENTS
    events.append(events[0])
    rejected(events, "at most 5000")


def test_body_over_one_mebibyte_is_too_large():
    skeleton = body([grid_event("Other", {"pad": ""})])
    fits = body([grid_event("Other", {"pad": "x" * (MAX_BODY_BYTES - len(skeleton))})])
    assert len(fits) == MAX_BODY_BYTES and parse(fits).ignored == 1
    with pytest.raises(PayloadTooLarge):
        parse(fits[:-1] + b" ]")
    with pytest.raises(PayloadTooLarge):  # size is checked before anything else
        parse(b"\xff" * (MAX_BODY_BYTES + 1), "text/plain")


def test_results_are_immutable():
    delivery = parse([grid_event("Contoso.App.UserDeleted", APP_USER)])
    with pytest.raises(AttributeError):
        delivery.actions[0].target.issuer = "other"  # type: ignore[misc]
    assert isinstance(delivery.actions, tuple)


# CloudEvents OPTIONS handshake ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {"WebHook-Request-Origin": "eventgrid.azure.net"},
        {"webhook-request-origin": "eventgrid.azure.net"},
        {"WEBHOOK-REQUEST-ORIGIN": " eventgrid.azure.net "},
        {"WebHook-Request-Callback": "https://x", "WebHook-Request-Origin": "eventgrid.azure.net"},
    ],
)
def test_handshake_echoes_the_request_origin(headers: dict[str, str]):
    assert handshake_allowed_origin(headers) == "eventgrid.azure.net"


def test_handshake_reads_the_functions_request_headers():
    request = func.HttpRequest(
        "OPTIONS",
        "http://localhost:7071/api/events",
        headers={"WebHook-Request-Origin": "eventgrid.azure.net", "WebHook-Request-Rate": "120"},
        body=b"",
    )
    assert handshake_allowed_origin(request.headers) == "eventgrid.azure.net"
    assert handshake_allowed_origin(func.HttpRequest("OPTIONS", "http://x", body=b"").headers) is None


@pytest.mark.parametrize(
    "origin",
    [
        "",
        "   ",
        "eventgrid.azure.net\r\nSet-Cookie: a=b",
        "eventgrid.azure.net\nx",
        "a.example, b.example",
        "https://eventgrid.azure.net",
        "eventgrid.azure.net/path",
        "*",
        "-bad.example",
        "bad-.example",
        "a..b",
        "a" * 64 + ".example",
        ".".join(["abcdefgh"] * 30),  # over 253 characters
        "évent.example",
    ],
)
def test_handshake_refuses_missing_or_unreasonable_origins(origin: str):
    assert handshake_allowed_origin({"WebHook-Request-Origin": origin}) is None


def test_handshake_without_the_header():
    assert handshake_allowed_origin({}) is None
    assert handshake_allowed_origin({"Origin": "eventgrid.azure.net"}) is None


@pytest.mark.parametrize(
    "origin", ["eventgrid.azure.net", "localhost", "Emitter-1.Example.COM", "a" * 63 + ".b"]
)
def test_handshake_accepts_dns_names(origin: str):
    assert handshake_allowed_origin({"WebHook-Request-Origin": origin}) == origin


# What the real azure-eventgrid publisher sends -------------------------------------------------------------


class _Capture(BaseHTTPRequestHandler):
    """Records each POST the publisher makes and answers 200, as a webhook endpoint would."""

    received: list[tuple[str | None, bytes]]

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        self.server.received.append((self.headers.get("Content-Type"), self.rfile.read(length)))  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def publish() -> Iterator[Callable[[Any], tuple[str | None, bytes]]]:
    """Sends events with the real EventGridPublisherClient to a loopback endpoint; returns what it posted.

    Going through the public client's send() (rather than the SDK's private serialisation helpers)
    captures exactly the bytes and Content-Type a real publisher puts on the wire.
    """
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Capture)
    server.received = []  # type: ignore[attr-defined]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client = EventGridPublisherClient(
        f"http://127.0.0.1:{server.server_port}/api/events", AzureKeyCredential("k")
    )

    def send(events: Any) -> tuple[str | None, bytes]:
        client.send(events)
        return server.received.pop()  # type: ignore[attr-defined]

    try:
        yield send
    finally:
        client.close()
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_sdk_event_grid_events(publish: Callable):
    events = [
        EventGridEvent(
            subject="/identity/users/alice",
            event_type="Contoso.App.UserDeleted",
            data=APP_USER,
            data_version="1.0",
        ),
        EventGridEvent(
            subject="/identity/users/bob",
            event_type="Contoso.App.PasswordChanged",
            data={"communicationUserId": ACS_USER},
            data_version="1.0",
        ),
        EventGridEvent(subject="/x", event_type="Contoso.App.Other", data={"n": 1}, data_version="2.0"),
    ]
    content_type, raw = publish(events)
    assert content_type is not None and content_type.startswith("application/json")
    delivery = parse_delivery(raw, content_type, "Notification", TYPES)
    assert delivery.actions == (
        Action(
            str(events[0].id),
            "delete",
            EventTarget(issuer=ISSUER, subject="alice"),
            "Contoso.App.UserDeleted",
            EVENT_GRID_SCHEMA,
            "",  # posted straight to the webhook: no topic (Event Grid would stamp one)
        ),
        Action(
            str(events[1].id),
            "revoke",
            EventTarget(communication_user_id=ACS_USER),
            "Contoso.App.PasswordChanged",
            EVENT_GRID_SCHEMA,
            "",
        ),
    )
    assert delivery.ignored == 1


def test_sdk_cloud_event_batch_with_graph_payloads(publish: Callable):
    graph = graph_event("Microsoft.Graph.UserUpdated")
    events = [
        CloudEvent(
            source=graph["source"],
            type=graph["type"],
            subject=graph["subject"],
            data=graph["data"],
            datacontenttype="application/json",
        ),
        CloudEvent(
            source="/contoso/identity", type="Contoso.App.UserDeleted", data={"communicationUserId": ACS_USER}
        ),
        CloudEvent(source="/contoso/identity", type="Contoso.App.Audit", data=None),
    ]
    content_type, raw = publish(events)
    assert content_type is not None and content_type.startswith(CE_BATCH)
    delivery = parse_delivery(raw, content_type, None, TYPES)
    assert delivery.actions == (
        Action(events[0].id, "revoke", GRAPH_USER, "Microsoft.Graph.UserUpdated", *IN_GRAPH),
        Action(
            events[1].id,
            "delete",
            EventTarget(communication_user_id=ACS_USER),
            "Contoso.App.UserDeleted",
            CLOUDEVENTS_SCHEMA,
            "/contoso/identity",
        ),
    )
    assert delivery.ignored == 1


def test_sdk_single_cloud_event_with_extensions(publish: Callable):
    event = CloudEvent(
        source="/contoso/identity",
        type="Contoso.App.PasswordChanged",
        data=APP_USER,
        extensions={"tenant": "contoso", "sequence": "7"},
    )
    content_type, raw = publish(event)
    (action,) = parse_delivery(raw, content_type, None, TYPES).actions
    assert (action.event_id, action.kind, action.target) == (
        event.id,
        "revoke",
        EventTarget(issuer=ISSUER, subject="alice"),
    )
    # The same event as Event Grid would deliver it alone, in structured mode.
    (single,) = json.loads(raw)
    assert parse_delivery(
        body(single), "application/cloudevents+json; charset=utf-8", None, TYPES
    ).actions == (action,)


def test_sdk_cloud_event_with_binary_data(publish: Callable):
    """Bytes travel as data_base64: not the contract's JSON data, so a custom event type is refused."""
    data = json.dumps({"communicationUserId": ACS_USER}).encode()
    _, raw = publish(CloudEvent(source="/contoso", type="Contoso.App.UserDeleted", data=data))
    assert "data_base64" in json.loads(raw)[0]
    with pytest.raises(BadRequest, match="communicationUserId"):
        parse_delivery(raw, CE_BATCH, None, TYPES)
    _, raw = publish(CloudEvent(source="/contoso", type="Contoso.App.Audit", data=data))
    assert parse_delivery(raw, CE_BATCH, None, TYPES).ignored == 1
