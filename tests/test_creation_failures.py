"""Failures around a first issue and around acting on an identity the user has since replaced.

Against Azurite and the emulator; a Table or ACS failure is injected by wrapping one SDK call,
the way a retried or cut-off request looks to the service.
"""

from __future__ import annotations

import datetime as dt

import jwt
import pytest
from azure.core.exceptions import ResourceExistsError, ServiceRequestError, ServiceResponseError
from azure.data.tables import TableTransactionError

import function_app
from shared.auth import Caller
from shared.compose import services
from shared.policy import TokenRequest
from shared.store import keys
from shared.store.record import IdentityRecord
from tests.service_helpers import body_of, graph_rows, request, retention_rows, retention_runs


async def _post_token(users, user: str):
    return await function_app.issue_token(request("POST", "token", token=users.token(user)))


def _live(emulator) -> int:
    return emulator.stats()["liveIdentities"]


@pytest.mark.parametrize(
    "answer",
    [
        ResourceExistsError(message="the retried insert finds its first try"),
        ServiceResponseError(message="connection reset after the insert landed"),
    ],
    ids=["retried-409", "answer-lost"],
)
async def test_a_mapping_insert_that_landed_but_failed_to_say_so_keeps_its_identity(
    service, table_calls, emulator, answer
):
    real_insert = table_calls.real.create_entity

    async def landed_then_failed(entity, **kwargs):
        await real_insert(entity, **kwargs)
        raise answer

    table_calls.replace(create_entity=landed_then_failed)
    live = _live(emulator)
    user = f"landed-{type(answer).__name__}"
    response = await _post_token(service, user)
    assert response.status_code == 200, response.get_body()
    issued = body_of(response)
    assert issued["identityCreated"] is True and emulator.verify(issued["token"])["valid"]
    assert _live(emulator) == live + 1
    store = services().store
    assert await store.lookups.owner_of(issued["communicationUserId"]) == keys.user_key(
        service.stack["issuer"], user
    )


async def test_a_mapping_insert_without_an_answer_leaves_the_identity_for_the_timer(
    service, table_calls, emulator, monkeypatch
):
    """A connection lost mid-insert may have committed it (issue 16, item 3): the identity is kept
    until no late write can land, then the timer deletes it if nothing maps it."""
    clients, table = services(), table_calls

    async def refused(_entity, **_kwargs):
        raise ServiceResponseError(message="storage went away")

    live = _live(emulator)
    then = dt.datetime.now(dt.UTC) - dt.timedelta(days=120)
    with monkeypatch.context() as patch, table.replacing(create_entity=refused):
        patch.setattr(clients.tokens, "clock", lambda: then)
        response = await _post_token(service, "insert-failed")
    assert response.status_code == 503 and body_of(response)["code"] == "dependency_unavailable"
    assert _live(emulator) == live + 1  # kept: the insert may still land
    key = keys.user_key(service.stack["issuer"], "insert-failed")
    [filed] = await retention_rows(table, key)
    assert await clients.store.lookups.owner_of(filed["communicationUserId"]) == key
    [settle] = [w async for w in clients.store.pending.pending_work() if w.user_key == key]
    assert settle.op == "settle" and settle.communication_user_id == filed["communicationUserId"]
    claims = jwt.decode(service.token("insert-failed"), options={"verify_signature": False})
    assert len(await graph_rows(table, claims["tid"], claims["oid"])) == 1

    with monkeypatch.context() as patch:  # a run right then, within the grace: not yet
        patch.setattr(clients.cleanup, "clock", lambda: then + dt.timedelta(minutes=5))
        report = await clients.cleanup.run(ignore_backoff=True)
    assert report.get("settled_discarded", 0) == 0 and _live(emulator) == live + 1, report
    report = await retention_runs()
    assert report["settled_discarded"] == 1, report
    assert await clients.store.lookups.owner_of(filed["communicationUserId"]) is None
    # The retention row, past the retention period here, is swept with the Graph row it names.
    assert report["retention_unmapped_deleted"] >= 1, report
    assert await retention_rows(table, key) == []
    assert await graph_rows(table, claims["tid"], claims["oid"]) == []
    assert _live(emulator) == live


async def test_a_mapping_insert_the_service_refused_deletes_the_new_identity(service, table_calls, emulator):
    """A 4xx answer is a clear no: nothing can land later, so the identity goes at once."""
    from azure.core.exceptions import HttpResponseError

    clients = services()

    async def refused(_entity, **_kwargs):
        err = HttpResponseError(message="The property value exceeds the maximum allowed size.")
        err.status_code = 400
        raise err

    live = _live(emulator)
    with table_calls.replacing(create_entity=refused):
        response = await _post_token(service, "insert-refused")
    assert response.status_code == 503 and body_of(response)["code"] == "dependency_failed"
    assert _live(emulator) == live
    key = keys.user_key(service.stack["issuer"], "insert-refused")
    assert [w async for w in clients.store.pending.pending_work() if w.user_key == key] == []


def _none_first(get):
    """The mapping read of a request that came just before the winner's insert: nothing yet."""
    calls = 0

    async def read(key: str):
        nonlocal calls
        calls += 1
        return None if calls == 1 else await get(key)

    return read


async def test_a_lost_race_whose_discard_failed_stays_on_file_and_is_swept(
    service, acs_calls, emulator, monkeypatch
):
    winner = body_of(await _post_token(service, "race-sweep"))
    clients = services()
    tokens, store = clients.tokens, clients.store

    async def acs_down(*_args, **_kwargs):
        raise ServiceRequestError(message="ACS cannot be reached")

    async def table_down(*_args, **_kwargs):
        raise ServiceResponseError(message="storage went away")

    caller = Caller(issuer=service.stack["issuer"], subject="race-sweep")
    key = keys.user_key(caller.issuer, caller.subject)
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=120)
    live = _live(emulator)
    with monkeypatch.context() as patch, acs_calls.replacing(delete_user=acs_down):
        patch.setattr(tokens, "clock", lambda: long_ago)  # files the loser's row long ago
        patch.setattr(store.pending, "queue_discard", table_down)
        # The loser of a race that read no mapping, then found the winner's on insert.
        patch.setattr(store.identities, "get", _none_first(store.identities.get))
        served = await tokens.issue(caller, TokenRequest(scopes=("chat",), minutes=60))
    assert served.communication_user_id == winner["communicationUserId"]
    assert _live(emulator) == live + 1  # the loser's identity could not be deleted
    filed = [e["communicationUserId"] for e in await retention_rows(store.table.client, key)]
    [lost] = [i for i in filed if i != winner["communicationUserId"]]

    report = await clients.cleanup.run(ignore_backoff=True)
    assert report["retention_unmapped_deleted"] == 1, report
    assert _live(emulator) == live
    assert await store.lookups.owner_of(lost) is None
    assert emulator.verify(winner["token"])["valid"]


async def test_acting_on_a_replaced_identity_leaves_the_new_mapping_alone(service, emulator):
    store = services().store
    key = keys.user_key(service.stack["issuer"], "replaced")
    await _post_token(service, "replaced")
    old = await store.identities.get(key)
    deleted = await function_app.delete_identity(
        request("DELETE", "identity", token=service.token("replaced"))
    )
    assert deleted.status_code == 200
    new = body_of(await _post_token(service, "replaced"))
    assert new["communicationUserId"] != old.communication_user_id

    # A cleanup or revocation that read the old mapping acts late:
    await store.identities.remove(old)
    await store.identities.mark_pending(old, "revoke", dt.datetime.now(dt.UTC), dt.timedelta(seconds=30))
    current = await store.identities.get(key)
    assert current.communication_user_id == new["communicationUserId"] and current.pending == ""
    assert await store.lookups.owner_of(new["communicationUserId"]) == key
    again = await _post_token(service, "replaced")
    assert again.status_code == 200 and body_of(again)["communicationUserId"] == new["communicationUserId"]
    report = await services().cleanup.run(ignore_backoff=True)
    assert report.get("dropped_stale", 0) >= 1  # the late revocation's queue row
    assert emulator.verify(body_of(again)["token"])["valid"]


async def test_rows_that_cannot_be_written_delete_the_new_identity(service, table_calls, emulator):
    # Storage goes away between the first read (no mapping yet) and the new identity's rows.
    real_read = table_calls.real.get_entity
    down = False

    async def write(*_args, **_kwargs):
        nonlocal down
        down = True
        raise ServiceResponseError(message="storage went away")

    async def read(*args, **kwargs):
        if down:  # no read tells what landed either
            raise ServiceResponseError(message="storage went away")
        return await real_read(*args, **kwargs)

    table_calls.replace(submit_transaction=write, get_entity=read)
    live, created = _live(emulator), emulator.stats()["calls"].get("createIdentity", 0)
    response = await _post_token(service, "rows-refused")
    assert response.status_code == 503 and body_of(response)["code"] == "dependency_unavailable"
    assert emulator.stats()["calls"]["createIdentity"] == created + 1
    assert _live(emulator) == live  # no mapping could name it, so it was deleted at once


async def test_two_revokes_that_cross_their_pending_ids_still_complete(service, emulator):
    # Both queue and block at once; the queue row keeps one request's id, the mapping the other's.
    store = services().store
    key = keys.user_key(service.stack["issuer"], "crossed")
    issued = body_of(await _post_token(service, "crossed"))
    record = await store.identities.get(key)
    await store.identities.mark_pending(record, "revoke", dt.datetime.now(dt.UTC), dt.timedelta(seconds=0))
    row = keys.pending_row(key, record.communication_user_id, "revoke")
    queued = await store.table.client.get_entity("pending", row)
    await store.table.client.upsert_entity({**queued, "pendingId": "the-other-request"})

    report = await services().cleanup.run(ignore_backoff=True)
    assert report.get("revoked", 0) >= 1, report
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "revoked"}
    current = await store.identities.get(key)
    assert current.communication_user_id == record.communication_user_id and current.pending == ""


@pytest.mark.parametrize("order", [("delete", "revoke"), ("revoke", "delete")])
async def test_a_revoke_racing_a_delete_never_loses_the_delete(service, emulator, order):
    # Both requests read the unblocked mapping, then ACS is down for both, in either order.
    store = services().store
    user = f"race-{'-'.join(order)}"
    key = keys.user_key(service.stack["issuer"], user)
    issued = body_of(await _post_token(service, user))
    read_by_both = await store.identities.get(key)
    for op in order:
        await store.identities.mark_pending(
            read_by_both, op, dt.datetime.now(dt.UTC), dt.timedelta(seconds=0)
        )
    assert (await store.identities.get(key)).pending == "delete"  # a revoke never downgrades the block

    report = await services().cleanup.run(ignore_backoff=True)
    assert report.get("deleted", 0) >= 1, report
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}
    assert await store.identities.get(key) is None


async def test_a_revoke_queued_before_its_block_lands_is_kept_until_it_does(service, emulator, monkeypatch):
    # The request wrote its queue row, then stalled before blocking the mapping; a timer ran between.
    store = services().store
    key = keys.user_key(service.stack["issuer"], "slow-block")
    issued = body_of(await _post_token(service, "slow-block"))
    record = await store.identities.get(key)

    async def stalled(*_args, **_kwargs):
        return "etag"  # the block's write never reaches the table

    with monkeypatch.context() as patch:
        patch.setattr(store.table, "merge", stalled)
        await store.identities.mark_pending(
            record, "revoke", dt.datetime.now(dt.UTC), dt.timedelta(seconds=0)
        )
    first = await services().cleanup.run(ignore_backoff=True)
    assert first.get("waiting_for_block", 0) >= 1, first
    assert emulator.verify(issued["token"])["valid"]  # not dropped: nothing was revoked yet

    block = {"PartitionKey": key, "RowKey": keys.IDENTITY_ROW, "pending": "revoke", "pendingId": "late"}
    await store.table.client.update_entity(block)  # the stalled request's block lands
    second = await services().cleanup.run(ignore_backoff=True)
    assert second.get("revoked", 0) >= 1, second
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "revoked"}
    assert (await store.identities.get(key)).pending == ""


def test_an_acs_delete_counts_a_404_as_gone_only_in_acs_error_format():
    from azure.core.exceptions import HttpResponseError

    from shared.acs import _acs_not_found

    class Error:
        code = "IdentityNotFound"

    from_acs, from_elsewhere = HttpResponseError(message="gone"), HttpResponseError(message="no route")
    for err in (from_acs, from_elsewhere):
        err.status_code = 404
    from_acs.error = Error()
    assert _acs_not_found(from_acs) and not _acs_not_found(from_elsewhere)
    from_acs.status_code = 400
    assert not _acs_not_found(from_acs)


async def test_an_identity_filed_by_a_worker_that_died_before_its_mapping_is_swept_with_its_rows(
    service, emulator
):
    # The index transaction landed (owner, retention, Graph rows); the worker died before the insert.
    clients = services()
    long_ago = dt.datetime.now(dt.UTC) - dt.timedelta(days=120)
    communication_user_id, _token = await clients.tokens.acs.create_with_token(("chat",), 60)
    key = keys.user_key(service.stack["issuer"], "died-filing")
    tenant_id, object_id = "0f3c8f5e-5a7b-4b0e-9d0a-2d7d6c1b9a11", "6b1d7c9e-3f24-4e55-8c1a-9e0f2b3d4c5a"
    record = IdentityRecord(
        user_key=key,
        communication_user_id=communication_user_id,
        issuer=service.stack["issuer"],
        subject="died-filing",
        created_at=long_ago,
        last_used_on=long_ago.date().isoformat(),
        last_issued_at=long_ago,
        object_id=object_id,
        tenant_id=tenant_id,
    )
    await clients.store.table.upsert_together(clients.store.identities.index_rows(record))  # then it died
    assert len(await graph_rows(clients.store.table.client, tenant_id, object_id)) == 1
    live = _live(emulator)

    report = await clients.cleanup.run(ignore_backoff=True)
    assert report["retention_unmapped_deleted"] >= 1, report
    assert _live(emulator) == live - 1
    assert await clients.store.lookups.owner_of(communication_user_id) is None
    assert await retention_rows(clients.store.table.client, key) == []
    assert await graph_rows(clients.store.table.client, tenant_id, object_id) == []


async def test_an_index_transaction_the_table_refuses_files_nothing_and_deletes_the_identity(
    service, table_calls, emulator, monkeypatch
):
    # A real entity-group transaction that Table Storage refuses whole (a row over the size limit):
    # TableTransactionError, not a network error. None of its rows lands.
    store = services().store
    entry_rows = store.retention.entry_rows

    def refused(record):
        entry, *graph = entry_rows(record)
        return [{**entry, "padding": "x" * 70_000}, *graph]  # over the 64 KiB property limit

    raised = []
    real_submit = table_calls.real.submit_transaction

    async def submit(operations, **kwargs):
        try:
            return await real_submit(operations, **kwargs)
        except Exception as err:
            raised.append(err)
            raise

    monkeypatch.setattr(store.retention, "entry_rows", refused)
    table_calls.replace(submit_transaction=submit)
    live = _live(emulator)
    token = service.token("refused-whole")
    response = await function_app.issue_token(request("POST", "token", token=token))
    assert response.status_code in (502, 503) and body_of(response)["code"].startswith("dependency_")
    assert [type(err) for err in raised] == [TableTransactionError]
    assert _live(emulator) == live
    key = keys.user_key(service.stack["issuer"], "refused-whole")
    claims = jwt.decode(token, options={"verify_signature": False})
    assert await retention_rows(store.table.client, key) == []
    assert await graph_rows(store.table.client, claims["tid"], claims["oid"]) == []
    query = "PartitionKey eq 'index' and RowKey ge 'c-' and RowKey lt 'c.' and userKey eq @k"
    owners = store.table.client.query_entities(query, parameters={"k": key})
    assert [e async for e in owners] == []
    assert await store.identities.get(key) is None
