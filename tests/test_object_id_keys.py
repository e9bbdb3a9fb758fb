"""AUTH_USER_CLAIM=oid: users keyed by Entra object id, found by Graph events without a lookup row."""

from __future__ import annotations

import asyncio
import dataclasses
import datetime as dt
import uuid

import jwt

import function_app
from shared.auth import Caller
from shared.compose import reset_services, services
from shared.errors import Unavailable
from shared.policy import TokenRequest
from shared.settings import load, reset_settings
from shared.store import keys
from tests.service_fixtures import configure
from tests.service_helpers import Users, body_of, deliver, graph_rows, graph_user_event, request

BASE = {
    "AUTH_ISSUER": "https://login.microsoftonline.com/t/v2.0",
    "AUTH_AUDIENCE": "a",
    "ACS_ENDPOINT": "https://a.example",
    "TABLES_ENDPOINT": "https://t.example",
}


def test_only_jwt_validation_with_the_oid_claim_keys_users_by_object_id():
    assert load(BASE).object_id_issuer is None
    assert load({**BASE, "AUTH_USER_CLAIM": "oid"}).object_id_issuer == BASE["AUTH_ISSUER"]
    easy = {**BASE, "AUTH_MODE": "easyauth", "WEBSITE_AUTH_ENABLED": "True", "AUTH_USER_CLAIM": "oid"}
    assert load(easy).object_id_issuer is None  # the issuer comes with each request there


async def test_graph_events_find_oid_keyed_users_without_a_lookup_row(stack, emulator, monkeypatch):
    await configure(monkeypatch, stack, managed_identity=False, AUTH_USER_CLAIM="oid")
    users = Users(stack)
    try:
        token = users.token("oid-keyed")
        claims = jwt.decode(token, options={"verify_signature": False})
        response = await function_app.issue_token(request("POST", "token", token=token))
        assert response.status_code == 200, response.get_body()
        issued = body_of(response)
        store = services().store
        key = keys.user_key(stack["issuer"], claims["oid"])
        assert (await store.identities.get(key)).communication_user_id == issued["communicationUserId"]
        assert await graph_rows(store.table.client, claims["tid"], claims["oid"]) == []

        # The same object id in another tenant is not this user: nothing happens.
        other_tenant = str(uuid.uuid4())
        ignored = await deliver(graph_user_event("UserDeleted", other_tenant, claims["oid"]))
        assert ignored.status_code == 200, ignored.get_body()
        assert emulator.verify(issued["token"])["valid"]

        deleted = await deliver(graph_user_event("UserDeleted", claims["tid"].upper(), claims["oid"].upper()))
        assert deleted.status_code == 200, deleted.get_body()
        assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}
        assert await store.identities.get(key) is None
        assert await store.lookups.owner_of(issued["communicationUserId"]) is None
    finally:
        await reset_services()
        reset_settings()


async def test_a_graph_row_acts_only_on_the_entra_user_the_mapping_records(service, emulator):
    token = service.token("graph-checked")
    claims = jwt.decode(token, options={"verify_signature": False})
    issued = body_of(await function_app.issue_token(request("POST", "token", token=token)))
    store = services().store
    key = keys.user_key(service.stack["issuer"], "graph-checked")
    stranger = str(uuid.uuid4())  # a row naming this user for another object id: stale or misdirected
    await store.table.client.upsert_entity(
        {
            "PartitionKey": keys.INDEX_PARTITION,
            "RowKey": keys.graph_row(claims["tid"], stranger, key),
            "userKey": key,
        }
    )
    assert (await deliver(graph_user_event("UserDeleted", claims["tid"], stranger))).status_code == 200
    assert emulator.verify(issued["token"])["valid"]

    assert (await deliver(graph_user_event("UserDeleted", claims["tid"], claims["oid"]))).status_code == 200
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}


async def _two_app_keys(service, user: str) -> tuple[dict, dict[str, tuple[Caller, str]]]:
    """One person, two app keys: e.g. two app registrations (a `sub` differs per app) or issuers.
    Returns the token's claims, and for each ACS identity the caller it is for and its token."""
    token = service.token(user)
    claims = jwt.decode(token, options={"verify_signature": False})
    first = body_of(await function_app.issue_token(request("POST", "token", token=token)))
    callers = [
        Caller(issuer=claims["iss"], subject=user, object_id=claims["oid"], tenant_id=claims["tid"]),
        Caller(
            issuer="https://login.microsoftonline.com/other-app/v2.0",
            subject=f"pairwise-sub-of-{user}-in-the-other-app",
            object_id=claims["oid"],
            tenant_id=claims["tid"],
        ),
    ]
    second = await services().tokens.issue(callers[1], TokenRequest(scopes=("chat",), minutes=60))
    assert second.communication_user_id != first["communicationUserId"]
    return claims, {
        first["communicationUserId"]: (callers[0], first["token"]),
        second.communication_user_id: (callers[1], second.token.token),
    }


async def test_a_graph_event_reaches_every_app_key_of_the_entra_user(service, emulator):
    claims, identities = await _two_app_keys(service, "two-apps")
    store = services().store
    assert len(await graph_rows(store.table.client, claims["tid"], claims["oid"])) == 2

    assert (await deliver(graph_user_event("UserDeleted", claims["tid"], claims["oid"]))).status_code == 200
    for caller, token in identities.values():
        assert emulator.verify(token) == {"valid": False, "reason": "identity deleted"}
        assert await store.identities.get(keys.user_key(caller.issuer, caller.subject)) is None
    assert await graph_rows(store.table.client, claims["tid"], claims["oid"]) == []


async def test_a_redelivery_after_a_partial_failure_acts_only_on_the_identities_not_done(
    service, emulator, monkeypatch
):
    claims, identities = await _two_app_keys(service, "two-apps-retried")
    clients = services()
    # The first one acted on fails: the other still gets its turn.
    records = await clients.store.lookups.graph_users(claims["tid"], claims["oid"])
    failed, done = [r.communication_user_id for r in records]
    failing = {failed}
    real_revoke = clients.revocation.revoke

    async def revoke(record, *, source):
        if record.communication_user_id in failing:
            failing.clear()
            raise Unavailable("Table Storage is not answering.", code="dependency_unavailable")
        return await real_revoke(record, source=source)

    monkeypatch.setattr(clients.revocation, "revoke", revoke)
    event = graph_user_event("UserUpdated", claims["tid"], claims["oid"])
    assert (await deliver(event)).status_code == 503  # Event Grid will redeliver
    assert emulator.verify(identities[failed][1])["valid"]
    assert emulator.verify(identities[done][1]) == {"valid": False, "reason": "revoked"}

    # Signed in again since: the redelivery must not revoke the token issued meanwhile.
    # A new sign-in: its bearer is newer than the event, which ended the older ones' sessions.
    caller = dataclasses.replace(
        identities[done][0], issued_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    )
    reissued = await clients.tokens.issue(caller, TokenRequest(scopes=("chat",), minutes=60))
    assert reissued.communication_user_id == done
    assert (await deliver(event)).status_code == 200
    assert emulator.verify(identities[failed][1]) == {"valid": False, "reason": "revoked"}
    assert emulator.verify(reissued.token.token)["valid"]


async def test_cleanup_files_a_lost_graph_row_again_for_a_user_still_active(service, emulator, monkeypatch):
    # A race lost the row (see Lookups.forget_graph_row); moving the retention row restores it.
    clients = services()
    token = service.token("graph-row-lost")
    claims = jwt.decode(token, options={"verify_signature": False})
    with monkeypatch.context() as patch:
        patch.setattr(clients.tokens, "clock", lambda: dt.datetime.now(dt.UTC) - dt.timedelta(days=120))
        issued = body_of(await function_app.issue_token(request("POST", "token", token=token)))
    again = body_of(await function_app.issue_token(request("POST", "token", token=token)))  # used today
    [row] = await graph_rows(clients.store.table.client, claims["tid"], claims["oid"])
    await clients.store.table.client.delete_entity(row["PartitionKey"], row["RowKey"])

    report = await clients.cleanup.run(ignore_backoff=True)
    assert report["retention_refiled"] >= 1, report
    assert [
        r["RowKey"] for r in await graph_rows(clients.store.table.client, claims["tid"], claims["oid"])
    ] == [row["RowKey"]]
    assert (await deliver(graph_user_event("UserDeleted", claims["tid"], claims["oid"]))).status_code == 200
    assert emulator.verify(again["token"]) == {"valid": False, "reason": "identity deleted"}
    assert again["communicationUserId"] == issued["communicationUserId"]


async def test_a_redelivery_does_not_act_again_on_an_identity_done_though_the_other_is_gone(
    service, emulator, monkeypatch
):
    # First delivery: one identity revoked, the other fails; that one is deleted before Event Grid
    # redelivers, so the redelivery finds a single identity, the one already done.
    claims, identities = await _two_app_keys(service, "two-apps-one-gone")
    clients = services()
    records = await clients.store.lookups.graph_users(claims["tid"], claims["oid"])
    failed, done = records
    real_revoke = clients.revocation.revoke

    async def revoke(record, *, source):
        if record.communication_user_id == failed.communication_user_id:
            raise Unavailable("Table Storage is not answering.", code="dependency_unavailable")
        return await real_revoke(record, source=source)

    monkeypatch.setattr(clients.revocation, "revoke", revoke)
    event = graph_user_event("UserUpdated", claims["tid"], claims["oid"])
    assert (await deliver(event)).status_code == 503
    assert (await clients.revocation.delete(failed, source="test")).status == "deleted"
    caller = dataclasses.replace(
        identities[done.communication_user_id][0], issued_at=dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)
    )
    reissued = await clients.tokens.issue(caller, TokenRequest(scopes=("chat",), minutes=60))

    redelivered = await deliver(event)
    assert redelivered.status_code == 200, redelivered.get_body()
    assert body_of(redelivered)["results"] == {"duplicate": 1, "ignored": 0}
    assert emulator.verify(reissued.token.token)["valid"]


async def test_an_event_whose_first_delivery_is_still_failing_is_acted_on_by_the_retry(
    service, emulator, monkeypatch
):
    # Event Grid retries a delivery that has not answered in 30 s. The first one is stuck on a slow
    # ACS and fails after the retry came: the retry must have acted, not answered "duplicate".
    token = service.token("slow-first-delivery")
    claims = jwt.decode(token, options={"verify_signature": False})
    issued = body_of(await function_app.issue_token(request("POST", "token", token=token)))
    clients = services()
    real_delete = clients.revocation.delete
    stuck, calls = asyncio.Event(), []

    async def delete(record, *, source):
        calls.append(record.communication_user_id)
        if len(calls) == 1:
            await stuck.wait()
            raise Unavailable("ACS did not answer in time.", code="acs_unavailable")
        return await real_delete(record, source=source)

    monkeypatch.setattr(clients.revocation, "delete", delete)
    event = graph_user_event("UserDeleted", claims["tid"], claims["oid"])
    first = asyncio.create_task(deliver(event))
    await asyncio.sleep(0.05)
    retry = await deliver(event)
    stuck.set()
    assert (await first).status_code == 503
    assert retry.status_code == 200 and body_of(retry)["results"]["deleted"] == 1, retry.get_body()
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}
    again = await deliver(event)  # a later redelivery: done, nothing to do
    assert body_of(again)["results"] == {"duplicate": 1, "ignored": 0}
