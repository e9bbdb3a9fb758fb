"""Keeping the Microsoft Graph subscription alive (shared/graph/), and replaying dead letters.

Against the local stack: the Graph stand-in (devstack/graph.py) over HTTPS, bearer tokens from the
dev managed-identity endpoint for https://graph.microsoft.com, Azurite for the record, the webhook
handler (in process, as the worker calls it) and the dev host (over HTTP, fed by the real
azure-eventgrid publisher).

Azure's behaviour the service is held to (Microsoft Learn):
- "subscription resource type": a subscription on users lasts at most 41,760 minutes.
- "Reduce missing subscriptions and change notifications": answer reauthorizationRequired with
  PATCH /subscriptions/{id} and a new expirationDateTime (renews and reauthorizes at once);
  lifecycle notifications carry subscriptionId, subscriptionExpirationDateTime, lifecycleEvent.
- "Receive Microsoft Graph API change events through Azure Event Grid": they arrive as
  Microsoft.Graph.SubscriptionReauthorizationRequired through the partner topic; an expired
  subscription must be created anew; notificationUrl is EventGrid:?azuresubscriptionid=...
- "List subscriptions": with application permissions an app sees the subscriptions it created.
- "Event Grid message delivery and retry": a 5xx answer is retried; dead-lettered events keep
  their schema, with deadletterreason & co. added, in blobs holding an array of events.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import uuid
from dataclasses import replace

import pytest
import requests

import function_app
from shared.compose import reset_services, services
from shared.errors import BadRequest
from shared.events import EventTypes, parse_delivery
from shared.graph.subscriptions import RETRY_AFTER_FAILURE
from shared.settings import IDENTITY_TABLE, reset_settings
from tests.service_fixtures import configure
from tests.service_helpers import body_of, request

TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
NOTIFY = (
    "EventGrid:?azuresubscriptionid=8a8a8a8a-4b4b-4c4c-4d4d-12e12e12e12e"
    "&resourcegroup=rg-test&partnertopic=graph-users&location=westus"
)
CE = "application/cloudevents+json"
REAUTHORIZATION = "Microsoft.Graph.SubscriptionReauthorizationRequired"
GRAPH_MAX = dt.timedelta(minutes=41760)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _graph_time(value: dt.datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.0000000Z")


def lifecycle_event(
    subscription_id: str, lifecycle: str = "reauthorizationRequired", event_id: str | None = None, **data
) -> dict:
    """A lifecycle notification as the partner topic delivers it (CloudEvents 1.0)."""
    return {
        "id": event_id or str(uuid.uuid4()),
        "type": REAUTHORIZATION if lifecycle == "reauthorizationRequired" else "Microsoft.Graph.Lifecycle",
        "source": f"/tenants/{TENANT}/applications/0ad2f5a2-6f32-4c1a-bd77-0d9f8c6b3b3e",
        "subject": f"Subscriptions/{subscription_id}",
        "time": _graph_time(_now()),
        "datacontenttype": "application/json",
        "specversion": "1.0",
        "data": {
            "subscriptionId": subscription_id,
            "subscriptionExpirationDateTime": _graph_time(_now() + dt.timedelta(hours=2)),
            "tenantId": TENANT,
            "lifecycleEvent": lifecycle,
            **data,
        },
    }


def user_event(subscription_id: str, expires: dt.datetime, kind: str = "UserUpdated") -> dict:
    """A Graph user change notification (shape of the "Microsoft Entra events" page)."""
    user = str(uuid.uuid4())
    return {
        "id": str(uuid.uuid4()),
        "type": f"Microsoft.Graph.{kind}",
        "source": f"/tenants/{TENANT}/applications/0ad2f5a2-6f32-4c1a-bd77-0d9f8c6b3b3e",
        "subject": f"Users/{user}",
        "time": _graph_time(_now()),
        "specversion": "1.0",
        "data": {
            "changeType": "updated",
            "resource": f"Users/{user}",
            "resourceData": {"@odata.type": "#Microsoft.Graph.User", "id": user, "organizationId": TENANT},
            "subscriptionExpirationDateTime": _graph_time(expires),
            "subscriptionId": subscription_id,
            "tenantId": TENANT,
        },
    }


async def deliver(event: dict | list, content_type: str = CE):
    return await function_app.events(
        request("POST", "events", raw=json.dumps(event).encode(), headers={"Content-Type": content_type})
    )


async def health() -> tuple[int, dict]:
    response = await function_app.health(request("GET", "health"))
    return response.status_code, body_of(response)


class GraphHooks:
    """The stand-in's test hooks (loopback, no auth, never faulted)."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.http = requests.Session()

    def subscriptions(self) -> list[dict]:
        return self.http.get(self.base + "subscriptions", timeout=10).json()["value"]

    def one(self) -> dict:
        [only] = self.subscriptions()
        return only

    def stats(self) -> dict:
        return self.http.get(self.base + "stats", timeout=10).json()["calls"]

    def faults(self, **faults) -> None:
        self.http.post(self.base + "faults", json=faults, timeout=10).raise_for_status()

    def set_expiry(self, subscription_id: str, when: dt.datetime) -> None:
        self.http.patch(
            f"{self.base}subscriptions/{subscription_id}",
            json={"expirationDateTime": when.isoformat()},
            timeout=10,
        ).raise_for_status()

    def remove(self, subscription_id: str) -> None:
        self.http.delete(f"{self.base}subscriptions/{subscription_id}", timeout=10).raise_for_status()

    def reset(self) -> None:
        self.http.post(self.base + "reset", timeout=10).raise_for_status()


@pytest.fixture
def dev_host_record(stack):
    """The dev host's table is every test's: leave no Graph record in it (health would show it)."""
    from azure.data.tables import TableClient

    yield
    connection_string = stack["tables_connection_string"]
    with TableClient.from_connection_string(connection_string, IDENTITY_TABLE.default) as table:
        table.delete_entity("graph-subscription", "current")


@pytest.fixture
def graph(stack):
    hooks = GraphHooks(stack["graph_hooks"])
    hooks.reset()
    yield hooks
    hooks.reset()


async def _graph_service(stack, monkeypatch, **settings: str):
    """The service keyless (managed identity for Graph, ACS, Storage) on a table of its own, so
    that its Graph record is this test's alone."""
    table = f"graph{uuid.uuid4().hex[:12]}"
    await configure(monkeypatch, stack, managed_identity=True, IDENTITY_TABLE=table, **settings)
    yield services()
    try:
        await services().store.table.client.delete_table()
    finally:
        await reset_services()
        reset_settings()


@pytest.fixture
async def graph_service(stack, emulator, graph, monkeypatch):
    """... and with GRAPH_NOTIFICATION_URL: the service creates its subscription itself."""
    async for clients in _graph_service(stack, monkeypatch, GRAPH_NOTIFICATION_URL=NOTIFY):
        yield clients


@pytest.fixture
async def observing_service(stack, emulator, graph, monkeypatch):
    """... without it: the service only renews a subscription it hears of."""
    async for clients in _graph_service(stack, monkeypatch):
        yield clients


async def _timer() -> dict:
    return await services().cleanup.run(ignore_backoff=True)


async def _created(graph: GraphHooks) -> dict:
    report = await _timer()
    assert report.get("graph_created") == 1, report
    return graph.one()


def _expiry(subscription: dict) -> dt.datetime:
    return dt.datetime.fromisoformat(subscription["expirationDateTime"])


# ---- creation, renewal, health ---------------------------------------------------------------------


async def test_timer_creates_the_subscription_with_the_managed_identity(graph_service, graph, stack):
    status, body = await health()
    assert status == 503 and body["checks"]["graphSubscription"].startswith("degraded: no subscription yet")
    created = await _created(graph)
    assert created["resource"] == "users" and created["changeType"] == "updated,deleted"
    # Notifications and lifecycle notifications go to the same partner topic (Microsoft Learn).
    assert created["notificationUrl"] == created["lifecycleNotificationUrl"] == NOTIFY
    # Created by the Function App's own identity, the only one that can renew it later.
    assert created["applicationId"] == stack["managed_identity_client_id"]
    assert GRAPH_MAX - dt.timedelta(hours=2) < _expiry(created) - _now() <= GRAPH_MAX
    status, body = await health()
    assert status == 200 and body["status"] == "ok"
    assert (
        body["checks"]["graphSubscription"]
        == f"ok (expires {_expiry(created).strftime('%Y-%m-%dT%H:%M:%SZ')})"
    )
    # A subscription far from expiry is left alone: no second creation, no renewal.
    assert not any(k.startswith("graph") for k in await _timer())
    assert graph.stats() == {"createSubscription": 1}


async def test_reauthorization_required_renews_once_per_event(graph_service, graph, caplog):
    created = await _created(graph)
    graph.set_expiry(created["id"], _now() + dt.timedelta(hours=2))  # Graph: about to expire
    event = lifecycle_event(created["id"])
    caplog.set_level(logging.DEBUG)
    response = await deliver(event)
    assert response.status_code == 200, response.get_body()
    assert body_of(response) == {"results": {"graph_renewed": 1, "ignored": 0}}
    assert GRAPH_MAX - dt.timedelta(hours=2) < _expiry(graph.one()) - _now() <= GRAPH_MAX
    assert graph.stats()["updateSubscription"] == 1
    # Event Grid delivers at least once: the same event again renews nothing.
    again = await deliver(event)
    assert body_of(again) == {"results": {"duplicate": 1, "ignored": 0}}
    assert graph.stats()["updateSubscription"] == 1
    # The bearer the managed identity got for Graph reached no log record.
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "eyJ" not in text and "Bearer " not in text
    assert any("renewed (reauthorizationRequired)" in r.getMessage() for r in caplog.records)


async def test_graph_down_answers_503_so_event_grid_redelivers(graph_service, graph):
    created = await _created(graph)
    event = lifecycle_event(created["id"])
    graph.faults(failWith=503, retryAfterSeconds=1)
    response = await deliver(event)
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert response.mimetype == "application/problem+json"
    assert body_of(response)["code"] == "graph_unavailable"
    status, body = await health()
    assert status == 503 and body["checks"]["graphSubscription"].startswith(
        "degraded: renewal failed (graph_unavailable)"
    )
    graph.faults(failWith=None)
    # Event Grid's retry of the same event: not marked done, so it renews now.
    retried = await deliver(event)
    assert body_of(retried) == {"results": {"graph_renewed": 1, "ignored": 0}}
    assert (await health())[0] == 200


async def test_missing_permission_is_recorded_answered_200_and_retried_by_the_timer(graph_service, graph):
    created = await _created(graph)
    graph.faults(failWith=403)  # an administrator took User.Read.All away
    response = await deliver(lifecycle_event(created["id"]))
    # Redelivering cannot help before an operator acts: 200, recorded, and the timer keeps trying.
    assert response.status_code == 200 and body_of(response)["results"]["graph_renewal_failed"] == 1
    status, body = await health()
    assert status == 503 and body["checks"]["graphSubscription"].startswith(
        "degraded: renewal failed (graph_forbidden)"
    )
    graph.faults(failWith=None)
    before = graph.stats()["updateSubscription"]
    assert "graph_renewed" not in await _timer()  # it waits RETRY_AFTER_FAILURE between tries
    assert graph.stats()["updateSubscription"] == before
    store = services().store
    state = await store.subscription.get()
    earlier = state.attempted_at - RETRY_AFTER_FAILURE - dt.timedelta(seconds=1)
    await store.subscription.save(replace(state, attempted_at=earlier))
    assert (await _timer())["graph_renewed"] == 1
    assert (await health())[0] == 200


async def test_removed_subscription_is_created_anew_by_the_timer(graph_service, graph):
    first = await _created(graph)
    graph.remove(first["id"])  # Graph removed it (or it expired: then it must be created anew)
    response = await deliver(lifecycle_event(first["id"], "subscriptionRemoved"))
    assert body_of(response)["results"]["graph_renewal_failed"] == 1
    status, body = await health()
    assert status == 503 and "subscription_not_found" in body["checks"]["graphSubscription"]
    report = await _timer()
    assert report["graph_created"] == 1
    second = graph.one()
    assert second["id"] != first["id"]
    assert (await services().store.subscription.get()).subscription_id == second["id"]
    assert (await health())[0] == 200


async def test_timer_renews_before_expiry_when_no_lifecycle_event_comes(graph_service, graph):
    created = await _created(graph)
    soon = _now() + dt.timedelta(days=2)
    graph.set_expiry(created["id"], soon)
    store = services().store
    await store.subscription.save(replace(await store.subscription.get(), expires_at=soon))
    status, body = await health()
    assert status == 503 and body["checks"]["graphSubscription"].startswith("degraded: expires ")
    assert (await _timer())["graph_renewed"] == 1
    assert _expiry(graph.one()) - _now() > GRAPH_MAX - dt.timedelta(hours=2)
    assert (await health())[0] == 200


async def test_missed_notifications_show_in_health(graph_service, graph):
    created = await _created(graph)
    response = await deliver(lifecycle_event(created["id"], "missed"))
    assert body_of(response)["results"]["graph_missed_recorded"] == 1
    assert graph.stats().get("updateSubscription", 0) == 0  # nothing to renew: users to re-check
    status, body = await health()
    assert status == 503 and "missed change notifications" in body["checks"]["graphSubscription"]


async def test_a_lifecycle_notification_without_subscription_id_is_400_and_calls_nothing(
    graph_service, graph
):
    event = lifecycle_event("x")
    del event["data"]["subscriptionId"]
    response = await deliver(event)
    assert response.status_code == 400 and body_of(response)["code"] == "invalid_event"
    assert graph.stats() == {}


async def test_user_events_make_their_subscription_known(observing_service, graph):
    assert "graphSubscription" not in (await health())[1]["checks"]  # Graph not in use: nothing to say
    far = _now() + dt.timedelta(days=20)
    response = await deliver(user_event("b7d1e2f3-0000-4000-8000-000000000001", far))
    assert response.status_code == 200
    status, body = await health()
    assert (
        status == 200
        and body["checks"]["graphSubscription"] == f"ok (expires {far.strftime('%Y-%m-%dT%H:%M:%SZ')})"
    )
    # One it cannot renew (not its own, or gone) shows up once due: never silently.
    store = services().store
    state = await store.subscription.get()
    await store.subscription.save(replace(state, expires_at=_now() + dt.timedelta(days=5)))
    assert (await _timer())["graph_renewal_failed"] == 1
    status, body = await health()
    assert status == 503 and "subscription_not_found" in body["checks"]["graphSubscription"]
    assert graph.stats().get("createSubscription", 0) == 0  # no GRAPH_NOTIFICATION_URL: never creates


async def test_the_graph_record_holds_no_secret(graph_service, graph):
    await _created(graph)
    entity = await services().store.table.client.get_entity("graph-subscription", "current")
    assert set(entity) == {
        "PartitionKey",
        "RowKey",
        "subscriptionId",
        "outcome",
        "expiresAt",
        "attemptedAt",
        "renewedAt",
    }


# ---- the stand-in answers as Graph does ------------------------------------------------------------


def _msi_token(stack, resource: str) -> str:
    response = requests.get(
        stack["identity_endpoint"],
        params={"api-version": "2019-08-01", "resource": resource},
        headers={"X-IDENTITY-HEADER": stack["identity_header"]},
        timeout=10,
    )
    response.raise_for_status()
    return response.json()["access_token"]


def test_stand_in_answers_subscription_requests_as_graph(stack, graph):
    api = f"{stack['graph_endpoint']}/v1.0/subscriptions"
    token = _msi_token(stack, "https://graph.microsoft.com")
    auth = {"Authorization": f"Bearer {token}"}
    new = {
        "changeType": "updated,deleted",
        "notificationUrl": NOTIFY,
        "lifecycleNotificationUrl": NOTIFY,
        "resource": "users",
        "expirationDateTime": _graph_time(_now() + dt.timedelta(days=2)),
    }

    def error(response: requests.Response, status: int) -> str:
        assert response.status_code == status, response.text
        return response.json()["error"]["code"]

    assert error(requests.post(api, json=new, timeout=10), 401) == "InvalidAuthenticationToken"
    acs = {"Authorization": f"Bearer {_msi_token(stack, 'https://communication.azure.com')}"}
    assert error(requests.post(api, json=new, headers=acs, timeout=10), 401) == "InvalidAuthenticationToken"
    too_long = {**new, "expirationDateTime": _graph_time(_now() + GRAPH_MAX + dt.timedelta(minutes=5))}
    rejected = requests.post(api, json=too_long, headers=auth, timeout=10)
    assert error(rejected, 400) == "ExtensionError" and "41760 minutes" in rejected.json()["error"]["message"]
    webhook = {**new, "notificationUrl": "https://example.com/hook"}
    assert error(requests.post(api, json=webhook, headers=auth, timeout=10), 400) == "InvalidRequest"
    created = requests.post(api, json=new, headers=auth, timeout=10)
    assert created.status_code == 201
    sid = created.json()["id"]
    assert created.json()["expirationDateTime"].endswith("0Z")  # seven fractional digits, as Graph
    listed = requests.get(api, headers=auth, timeout=10).json()["value"]
    assert [s["id"] for s in listed] == [sid]
    later = _graph_time(_now() + dt.timedelta(days=10))
    renewed = requests.patch(f"{api}/{sid}", json={"expirationDateTime": later}, headers=auth, timeout=10)
    assert renewed.status_code == 200 and renewed.json()["expirationDateTime"] == later
    unknown = requests.patch(
        f"{api}/{uuid.uuid4()}", json={"expirationDateTime": later}, headers=auth, timeout=10
    )
    assert error(unknown, 404) == "ResourceNotFound"
    assert requests.delete(f"{api}/{sid}", headers=auth, timeout=10).status_code == 204
    assert error(requests.get(f"{api}/{sid}", headers=auth, timeout=10), 404) == "ResourceNotFound"
    graph.faults(failWith=429, retryAfterSeconds=3)
    throttled = requests.get(api, headers=auth, timeout=10)
    assert error(throttled, 429) == "TooManyRequests" and throttled.headers["Retry-After"] == "3"


# ---- parsing (pure) ---------------------------------------------------------------------------------


def _parse(events) -> object:
    raw = json.dumps(events).encode()
    return parse_delivery(raw, "application/cloudevents-batch+json", None, EventTypes())


def test_lifecycle_notifications_are_parsed_by_their_lifecycle_event():
    sid = "d1c4e0a2-3b2e-4f6f-9c55-1e2f3a4b5c6d"
    typed = lifecycle_event(sid, event_id="l1")
    del typed["data"]["lifecycleEvent"]  # the type alone says it
    removed = lifecycle_event(sid, "subscriptionRemoved", event_id="l2")
    missed = lifecycle_event(sid, "missed", event_id="l3")
    delivery = _parse([typed, removed, missed, user_event(sid, _now() + dt.timedelta(days=9))])
    assert [(n.event_id, n.lifecycle_event, n.subscription_id) for n in delivery.lifecycle] == [
        ("l1", "reauthorizationRequired", sid),
        ("l2", "subscriptionRemoved", sid),
        ("l3", "missed", sid),
    ]
    assert delivery.lifecycle[0].expires_at is not None and delivery.lifecycle[0].expires_at.tzinfo
    assert delivery.ignored == 0 and len(delivery.actions) == 1
    assert [s.subscription_id for s in delivery.subscriptions] == [sid]
    for broken in ({"subscriptionExpirationDateTime": "soon"}, {"subscriptionId": ""}):
        with pytest.raises(BadRequest) as caught:
            _parse([lifecycle_event(sid, **broken)])
        assert caught.value.code == "invalid_event"


# ---- over HTTP through the dev host ---------------------------------------------------------------


def test_lifecycle_event_from_event_grid_renews_through_the_dev_host(stack, graph, dev_host_record):
    """The real publisher, the dev host (keyless, GRAPH_ENDPOINT = the stand-in) and Graph."""
    from azure.core.credentials import AzureKeyCredential
    from azure.core.messaging import CloudEvent
    from azure.eventgrid import EventGridPublisherClient

    api = f"{stack['graph_endpoint']}/v1.0/subscriptions"
    auth = {"Authorization": f"Bearer {_msi_token(stack, 'https://graph.microsoft.com')}"}
    soon = _now() + dt.timedelta(hours=2)
    new = {"changeType": "updated,deleted", "notificationUrl": NOTIFY, "resource": "users"}
    created = requests.post(
        api, json={**new, "expirationDateTime": _graph_time(soon)}, headers=auth, timeout=10
    )
    sid = created.json()["id"]
    event = lifecycle_event(sid)
    publisher = EventGridPublisherClient(
        f"{stack['api']}/events?code={stack['function_key']}", AzureKeyCredential("unused-by-webhooks")
    )
    publisher.send(
        CloudEvent(source=event["source"], type=event["type"], subject=event["subject"], data=event["data"])
    )
    assert _expiry(graph.one()) - _now() > GRAPH_MAX - dt.timedelta(hours=2)
    checks = requests.get(f"{stack['api']}/health", timeout=30).json()["checks"]
    assert checks["graphSubscription"].startswith("ok (expires ")


def test_dead_lettered_events_replay_as_they_are_stored(stack, emulator, dev_host_record):
    """README's replay: a dead-letter blob is an array of the events, each with Event Grid's
    dead-letter properties added; posted back as it is, it is acted on."""
    import jwt

    token = stack.token("replay-dana").strip()
    issued = requests.post(f"{stack['api']}/token", headers={"Authorization": f"Bearer {token}"}, timeout=60)
    claims = jwt.decode(token, options={"verify_signature": False})
    deleted = {
        **user_event("b7d1e2f3-0000-4000-8000-000000000002", _now() + dt.timedelta(days=9), "UserDeleted"),
        "deadletterreason": "MaxDeliveryAttemptsExceeded",
        "deliveryattempts": 30,
        "lastdeliveryoutcome": "Probation",
        "publishtime": "2026-11-24T21:21:36.4018726Z",
    }
    deleted["data"]["resourceData"].update(id=claims["oid"], organizationId=claims["tid"])
    blob = json.dumps([deleted])
    replayed = requests.post(
        f"{stack['api']}/events",
        data=blob,
        headers={
            "Content-Type": "application/cloudevents-batch+json",
            "x-functions-key": stack["function_key"],
        },
        timeout=60,
    )
    assert replayed.status_code == 200, replayed.text
    assert emulator.verify(issued.json()["token"]) == {"valid": False, "reason": "identity deleted"}
    # Replaying the blob twice (two operators, a retried script) acts once.
    again = requests.post(
        f"{stack['api']}/events",
        data=blob,
        headers={
            "Content-Type": "application/cloudevents-batch+json",
            "x-functions-key": stack["function_key"],
        },
        timeout=60,
    )
    assert again.json()["results"] == {"duplicate": 1, "ignored": 0}
