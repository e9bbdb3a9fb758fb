"""The Event Grid webhook on the running dev host, fed by the real azure-eventgrid publisher.

Facts the webhook is built on, as their owners state them:
- CloudEvents 1.0 (the specification, spec.md, `id`): "Producers MUST ensure that source + id is
  unique for each distinct event. If a duplicate event is re-sent (e.g. due to a network error) it
  MAY have the same id. Consumers MAY assume that Events with identical source and id are
  duplicates." An id alone is unique only within its source.
- The Event Grid schema's `topic`: "Full resource path to the event source. This field isn't
  writeable. Event Grid provides this value" (Microsoft Learn, "Azure Event Grid event schema").
- Microsoft Learn, "Event Grid message delivery and retry": Event Grid waits 30 seconds for a
  response after delivering; after that the message is queued for retry, with exponential backoff
  (10 s, 30 s, 1 min, ...). It retries 5xx, never 400, 401, 403 or 413; a 200 is delivered, so an
  event wrongly answered "duplicate" is never sent again.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import jwt
import pytest
import requests
from azure.core.credentials import AzureKeyCredential
from azure.core.exceptions import HttpResponseError
from azure.core.messaging import CloudEvent
from azure.eventgrid import EventGridEvent, EventGridPublisherClient

import function_app
from shared.events import act
from shared.store import keys
from tests.service_helpers import Users, body_of, request

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


# Deduplication keyed on what the schemas make unique (issue 15, item 6) --------------------------------


def _custom(schema: str, source: str, event_id: str, issuer: str, user: str) -> CloudEvent | EventGridEvent:
    """A custom "credentials changed" event naming an app user, from `source` (the Event Grid
    schema's `topic`, as Event Grid stamps it)."""
    data = {"issuer": issuer, "subject": user}
    if schema == "cloudevents":
        return CloudEvent(source=source, type="MyApp.CredentialsChanged", id=event_id, data=data)
    return EventGridEvent(
        subject=f"users/{user}",
        event_type="MyApp.CredentialsChanged",
        data=data,
        data_version="1.0",
        topic=source,
        id=event_id,
    )


@pytest.mark.parametrize("schema", ["cloudevents", "eventgrid"])
def test_one_id_from_two_sources_is_two_events(stack, emulator, schema):
    """Two publishers may both send id "1": source + id is what is unique (CloudEvents), topic + id
    in the Event Grid schema. The second event used to be answered 200 "duplicate" and never acted
    on, and Event Grid does not retry a 200."""
    other = "eventgrid" if schema == "cloudevents" else "cloudevents"
    users = {name: f"evt-{schema}-{name}" for name in ("a", "b", "c")}
    issued = {name: _sign_in(stack, user)[0] for name, user in users.items()}
    event_id, publisher = str(uuid.uuid4()), _publisher(stack)  # "1" from each of three sources

    publisher.send(_custom(schema, "/contoso/app-a", event_id, stack["issuer"], users["a"]))
    assert emulator.verify(issued["a"]["token"])["reason"] == "revoked"
    publisher.send(_custom(schema, "/contoso/app-b", event_id, stack["issuer"], users["b"]))
    assert emulator.verify(issued["b"]["token"])["reason"] == "revoked"  # another source's event
    publisher.send(_custom(other, "/contoso/app-a", event_id, stack["issuer"], users["c"]))
    assert emulator.verify(issued["c"]["token"])["reason"] == "revoked"  # the other schema's

    again, _ = _sign_in(stack, users["a"])
    publisher.send(_custom(schema, "/contoso/app-a", event_id, stack["issuer"], users["a"]))  # redelivered
    assert emulator.verify(again["token"])["valid"]  # the same source + id is still acted on once


def test_an_event_id_cannot_pose_as_a_graph_identitys_mark(stack, emulator):
    """Each identity of a Graph event used to be marked done as "<event id>/<user key>" in the
    events' own key space: a custom event with that id, about nobody, made the Graph event skip
    the user ("duplicate"), so their tokens survived the UserUpdated. A CloudEvents publisher
    chooses its `source`, so the forgery may even claim Graph's: the identities' marks must live
    where no event's id and source can reach."""
    issued, claims = _sign_in(stack, "evt-forged-mark")
    graph_event_id = str(uuid.uuid4())
    forged_id = f"{graph_event_id}/{keys.user_key(stack['issuer'], 'evt-forged-mark')}"
    publisher = _publisher(stack)
    graph_source = GRAPH_SOURCE.format(tid=claims["tid"])
    publisher.send(_custom("cloudevents", graph_source, forged_id, stack["issuer"], "evt-nobody"))
    publisher.send(_graph_event("UserUpdated", claims, graph_event_id))
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "revoked"}


# Large batches: answered in time, and no delivery over ACS's limits (issue 15, item 7) ------------------


def _sign_in_many(stack, names: list[str]) -> list[tuple[dict, dict]]:
    """First tokens for many users through the dev host, a few at a time."""
    users = Users(stack)
    http = requests.Session()
    http.mount("http://", requests.adapters.HTTPAdapter(pool_maxsize=8))

    def sign_in(name: str) -> tuple[dict, dict]:
        bearer = users.token(name)
        response = http.post(
            f"{stack['api']}/token", headers={"Authorization": f"Bearer {bearer}"}, timeout=60
        )
        assert response.status_code == 200, response.text
        return response.json(), jwt.decode(bearer, options={"verify_signature": False})

    with ThreadPoolExecutor(8) as pool:
        return list(pool.map(sign_in, names))


def _revocations(emulator) -> int:
    return emulator.stats()["calls"].get("revokeAccessTokens", 0)


@pytest.mark.slow
def test_a_large_batch_stays_within_acs_limits_and_its_redelivery_completes_it(stack, emulator):
    """520 Graph UserUpdated events (7 to 9 for each of 60 users who exist: Graph sends one per
    change), more revocations than ACS takes from a resource in 30 s (500). The webhook used to
    work through them one at a time and answer 200 after all, later than Event Grid waits for
    (30 s) once ACS is slow. Now one delivery starts at most ACS_CALLS_PER_DELIVERY of them and
    answers 503 before CUTOFF_SECONDS; Event Grid redelivers the whole batch (it retries 5xx),
    whose done events are skipped: every event revoked once, none twice, none lost."""
    cap, extra, people = act.ACS_CALLS_PER_DELIVERY, 120, 60
    signed_in = _sign_in_many(stack, [f"evt-batch-{uuid.uuid4().hex[:8]}-{i}" for i in range(people)])
    events = [_graph_event("UserUpdated", signed_in[i % people][1]) for i in range(cap + extra)]
    publisher = _publisher(stack)
    before = _revocations(emulator)

    started = time.monotonic()
    with pytest.raises(HttpResponseError) as first:  # Event Grid's redelivery is this test's to make
        publisher.send(events, retry_total=0)
    answered_in = time.monotonic() - started
    assert first.value.status_code == 503
    assert json.loads(first.value.response.text())["code"] == "events_deferred"
    # Work in flight at the budget's end finishes, up to the cut-off: answered well inside Event
    # Grid's 30 s either way (each revocation also marks the mapping first: shared/storm.py).
    assert answered_in < act.CUTOFF_SECONDS
    assert _revocations(emulator) - before == cap  # one delivery within ACS's limits

    publisher.send(events, retry_total=0)  # the redelivery: 200
    assert _revocations(emulator) - before == cap + extra  # the rest, and nothing twice
    for issued, _ in signed_in:
        assert emulator.verify(issued["token"])["reason"] == "revoked"


# The time budget, in-process: the dev host's worker keeps the real 20 s, a test shrinks it here.


def _batch(events: list[CloudEvent]) -> bytes:
    """A CloudEvents batch as Event Grid posts it (structured mode, JSON data)."""
    names = ("id", "source", "type", "subject", "data")
    return json.dumps([{"specversion": "1.0"} | {n: getattr(e, n) for n in names} for e in events]).encode()


async def _deliver(body: bytes):
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    return await function_app.events(request("POST", "events", raw=body, headers=headers))


async def _sign_in_here(service, names: list[str]) -> list[tuple[dict, dict]]:
    async def sign_in(name: str) -> tuple[dict, dict]:
        bearer = service.token(name)
        response = await function_app.issue_token(request("POST", "token", token=bearer))
        assert response.status_code == 200, response
        return body_of(response), jwt.decode(bearer, options={"verify_signature": False})

    return list(await asyncio.gather(*(sign_in(name) for name in names)))


async def test_a_delivery_past_its_time_budget_answers_in_time_and_the_redelivery_finishes(
    service, emulator, monkeypatch
):
    """ACS slow (400 ms a call): 64 Graph UserUpdated events cannot all be done within a budget of
    1 s. Those started in time finish and are marked; no other starts; the answer is 503 (Event
    Grid retries 5xx) shortly after the budget, not after all the work. The redelivery of the whole
    batch skips what was done and does the rest: each event revoked once."""
    monkeypatch.setattr(act, "BUDGET_SECONDS", 1.0)
    monkeypatch.setattr(act, "CUTOFF_SECONDS", 3.0)
    people = 32
    signed_in = await _sign_in_here(service, [f"budget-{uuid.uuid4().hex[:8]}-{i}" for i in range(people)])
    body = _batch([_graph_event("UserUpdated", signed_in[i % people][1]) for i in range(2 * people)])
    emulator.faults(latencyMs=400)
    before = _revocations(emulator)

    started = time.monotonic()
    first = await _deliver(body)
    answered_in = time.monotonic() - started
    assert first.status_code == 503 and body_of(first)["code"] == "events_deferred"
    assert first.headers["Retry-After"] == str(act.RETRY_AFTER_SECONDS)
    assert answered_in < act.CUTOFF_SECONDS  # the budget, and the events in flight at its end
    done = _revocations(emulator) - before
    assert 0 < done < 2 * people

    emulator.faults(latencyMs=0)
    monkeypatch.setattr(act, "BUDGET_SECONDS", 20.0)  # the redelivery has time enough
    second = await _deliver(body)
    assert second.status_code == 200
    assert body_of(second)["results"] == {"duplicate": done, "revoked": 2 * people - done, "ignored": 0}
    assert _revocations(emulator) - before == 2 * people  # nothing twice, nothing lost


async def test_work_stuck_past_the_cutoff_is_cut_off_and_done_by_the_redelivery(
    service, emulator, monkeypatch
):
    """ACS hangs (5 s a call, past the cut-off): the calls in flight are cancelled at
    CUTOFF_SECONDS, like a crash, so the answer still leaves before Event Grid stops waiting; no
    mark was written for them, and the redelivery revokes every identity."""
    monkeypatch.setattr(act, "BUDGET_SECONDS", 0.5)
    monkeypatch.setattr(act, "CUTOFF_SECONDS", 1.5)
    signed_in = await _sign_in_here(service, [f"cutoff-{uuid.uuid4().hex[:8]}-{i}" for i in range(4)])
    body = _batch([_graph_event("UserUpdated", claims) for _, claims in signed_in])
    emulator.faults(latencyMs=5000)

    started = time.monotonic()
    first = await _deliver(body)
    answered_in = time.monotonic() - started
    assert first.status_code == 503 and body_of(first)["code"] == "events_deferred"
    assert "4 of 4 events" in body_of(first)["detail"]
    assert answered_in < act.CUTOFF_SECONDS + 1

    emulator.faults(latencyMs=0)
    monkeypatch.setattr(act, "BUDGET_SECONDS", 20.0)
    monkeypatch.setattr(act, "CUTOFF_SECONDS", 25.0)
    second = await _deliver(body)
    assert second.status_code == 200 and body_of(second)["results"]["revoked"] == 4
    for issued, _ in signed_in:
        assert emulator.verify(issued["token"])["reason"] == "revoked"
