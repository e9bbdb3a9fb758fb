"""The fault-injecting Table proxy (tests/table_faults.py) against the stack's Azurite, through the
real azure-data-tables aio TableClient: writes whose outcome looks unknown and that land late."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
    ResourceExistsError,
    ResourceNotFoundError,
    ServiceResponseError,
)
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient, TableServiceClient

import function_app
from tests.service_helpers import body_of
from tests.service_helpers import request as http_request
from tests.table_faults import (  # noqa: F401 - the fixtures: table_faults, faulty_service
    OPERATION_TIMED_OUT,
    OPERATION_TIMED_OUT_MESSAGE,
    TABLE_ERROR_CONTENT_TYPE,
    FaultyTableProxy,
    faulty_service_fixture,
    row,
    table_faults_fixture,
)

FAST_RETRIES = {"retry_backoff_factor": 0.01, "retry_backoff_max": 0.05}
# Azurite's answer to an insert (create_entity sends no `Prefer: return-no-content`; Azure answers 201 too).
INSERTED = 201


def _entity(pk: str = "p") -> dict:
    return {"PartitionKey": pk, "RowKey": uuid.uuid4().hex, "value": "v1"}


@pytest.fixture
async def table_name(stack) -> str:
    """A fresh table, made directly in Azurite (not through the proxy)."""
    name = "faults" + uuid.uuid4().hex[:12]
    async with TableServiceClient.from_connection_string(stack["tables_connection_string"]) as service:
        await service.create_table(name)
    return name


def _through(proxy: FaultyTableProxy, stack, table_name: str, **options) -> TableClient:
    return TableClient.from_connection_string(proxy.connection_string(stack), table_name, **options)


def _direct(stack, table_name: str) -> TableClient:
    return TableClient.from_connection_string(stack["tables_connection_string"], table_name)


async def _exists(stack, table_name: str, entity: dict) -> bool:
    async with _direct(stack, table_name) as table:
        try:
            await table.get_entity(entity["PartitionKey"], entity["RowKey"])
        except ResourceNotFoundError:
            return False
        return True


def _assert_operation_timed_out(error: HttpResponseError) -> None:
    # create_entity re-raises the SDK's undecoded error: no `error_code` attribute, the code is in
    # the answer (what the SDK would decode: the x-ms-error-code header, else the body).
    assert error.status_code == 500
    response = error.response
    assert response.headers["x-ms-error-code"] == OPERATION_TIMED_OUT
    assert response.headers["Content-Type"] == TABLE_ERROR_CONTENT_TYPE
    assert response.headers["x-ms-request-id"]
    body = response.json()["odata.error"]
    assert body["code"] == OPERATION_TIMED_OUT and body["message"]["lang"] == "en-US"
    message, request_id, at = body["message"]["value"].split("\n")
    assert message == OPERATION_TIMED_OUT_MESSAGE
    assert request_id == "RequestId:" + response.headers["x-ms-request-id"]
    assert at.startswith("Time:") and at.endswith("Z")


async def _record(table: TableClient) -> list:
    """A run of calls that covers each kind of Table request and answer, reduced to what a
    caller sees (status or error code, and the entities' own properties)."""
    out: list = []

    def props(entity) -> dict:
        return {k: v for k, v in entity.items() if k not in ("Timestamp",)}

    async def step(name, call):
        try:
            result = await call()
        except HttpResponseError as error:
            code = error.response.headers.get("x-ms-error-code") if error.response else None
            out.append((name, type(error).__name__, error.status_code, code))
            return None
        out.append((name, "ok"))
        return result

    first, second = {"PartitionKey": "p", "RowKey": "a", "n": 1}, {"PartitionKey": "p", "RowKey": "b", "n": 2}
    await step("insert", lambda: table.create_entity(first))
    await step("insert again", lambda: table.create_entity(first))
    got = await step("read", lambda: table.get_entity("p", "a"))
    out.append(("read value", props(got)))
    await step("read missing", lambda: table.get_entity("p", "zz"))
    await step("upsert", lambda: table.upsert_entity({**second, "n": 3}, mode=UpdateMode.REPLACE))
    await step("merge", lambda: table.upsert_entity({"PartitionKey": "p", "RowKey": "b", "m": 4}))
    stale = got.metadata["etag"]
    await step("touch", lambda: table.upsert_entity({**first, "n": 9}))
    await step(
        "guarded update",
        lambda: table.update_entity(
            {**first, "n": 5}, etag=stale, match_condition=MatchConditions.IfNotModified
        ),
    )
    await step(
        "transaction",
        lambda: table.submit_transaction(
            [
                ("upsert", {"PartitionKey": "p", "RowKey": "c", "n": 6}),
                ("delete", {"PartitionKey": "p", "RowKey": "a"}),
            ]
        ),
    )
    await step("failed transaction", lambda: table.submit_transaction([("create", {**second})]))
    rows = [props(e) async for e in table.query_entities("PartitionKey eq @p", parameters={"p": "p"})]
    out.append(("query", rows))
    await step("delete", lambda: table.delete_entity("p", "b"))
    out.append(("after", [props(e) async for e in table.list_entities()]))
    return out


@pytest.mark.parametrize("auth", ["key", "managed_identity"])
async def test_an_unarmed_proxy_forwards_everything_untouched(stack, table_faults, request, auth):
    names = []
    async with TableServiceClient.from_connection_string(stack["tables_connection_string"]) as service:
        for _ in range(2):
            names.append("untouched" + uuid.uuid4().hex[:12])
            await service.create_table(names[-1])
    direct = _direct(stack, names[0])
    credential = None
    if auth == "key":
        proxied = _through(table_faults, stack, names[1], retry_total=0)
    else:
        from azure.identity.aio import ManagedIdentityCredential

        request.getfixturevalue("managed_identity_env")
        credential = ManagedIdentityCredential()
        proxied = TableClient(table_faults.endpoint, names[1], credential=credential, retry_total=0)
    async with direct, proxied:
        expected, seen = await _record(direct), await _record(proxied)
    if credential:
        await credential.close()
    assert seen == expected
    assert ("insert again", "ResourceExistsError", 409, "EntityAlreadyExists") in seen  # errors too
    assert ("guarded update", "ResourceModifiedError", 412, "UpdateConditionNotSatisfied") in seen
    assert table_faults.calls["insert other"] == 2 and table_faults.calls["read other"] == 2
    assert sum(table_faults.calls.values()) == sum(table_faults.statuses.values()) == len(seen) - 1
    assert not table_faults.injected and not table_faults.retried()


async def test_a_late_insert_fails_for_the_client_and_lands_on_commit(stack, table_faults, table_name):
    entity = _entity()
    fault = table_faults.arm("late", row(entity["PartitionKey"], entity["RowKey"], "POST"))
    async with _through(table_faults, stack, table_name, retry_total=0) as table:
        with pytest.raises(HttpResponseError) as failed:
            await table.create_entity(entity)
        _assert_operation_timed_out(failed.value)
        assert fault.hit and fault.request.call == "insert other"
        # The service looks: nothing there, through the proxy and in Azurite itself.
        with pytest.raises(ResourceNotFoundError):
            await table.get_entity(entity["PartitionKey"], entity["RowKey"])
        assert not await _exists(stack, table_name, entity)
        assert await fault.commit() == INSERTED  # the insert lands now
        got = await table.get_entity(entity["PartitionKey"], entity["RowKey"])
    assert got["value"] == "v1"
    assert fault.attempts == 1 and fault.landed_status == INSERTED
    assert table_faults.injected == {f"insert other 500 {OPERATION_TIMED_OUT}": 1}
    assert table_faults.statuses[f"insert other {INSERTED}"] == 1  # the late commit, Azurite's answer


async def test_a_late_insert_lands_by_itself_after_a_delay(stack, table_faults, table_name):
    entity = _entity()
    fault = table_faults.arm("late", "insert other", delay=0.3)
    async with _through(table_faults, stack, table_name, retry_total=0) as table:
        with pytest.raises(HttpResponseError):
            await table.create_entity(entity)
        assert not await _exists(stack, table_name, entity)
        assert await fault.landed() == INSERTED
    assert await _exists(stack, table_name, entity)


async def test_a_retry_of_a_late_insert_is_forwarded_by_default(stack, table_faults, table_name):
    """azure-core retries a POST that got 500 at once (no backoff before the second try): the retry
    lands first, the client sees success, and the late commit then gets 409."""
    entity = _entity()
    fault = table_faults.arm("late", "insert other")
    async with _through(table_faults, stack, table_name, retry_total=3, **FAST_RETRIES) as table:
        await table.create_entity(entity)  # no error: the retry did it
        assert await _exists(stack, table_name, entity)
        assert await fault.commit() == 409  # EntityAlreadyExists
    assert fault.attempts == 2 and fault.retry_answers == [INSERTED]
    assert list(table_faults.retried().values()) == [2]


async def test_a_late_insert_whose_retries_fail_until_released(stack, table_faults, table_name):
    """retries="fail": every attempt the SDK makes gets 500 and none is forwarded, so the SDK gives up
    with 500, the row is absent when looked for, and only the commit writes it."""
    entity = _entity()
    fault = table_faults.arm("late", "insert other", retries="fail")
    async with _through(table_faults, stack, table_name, retry_total=3, **FAST_RETRIES) as table:
        with pytest.raises(HttpResponseError) as failed:
            await table.create_entity(entity)
        _assert_operation_timed_out(failed.value)
        assert fault.attempts == 4 and fault.retry_answers == [500, 500, 500]
        assert not await _exists(stack, table_name, entity)
        assert await fault.commit() == INSERTED
        assert await _exists(stack, table_name, entity)
        # Released, a new call of the same insert reaches Azurite: it finds the late row.
        fault.release()
        with pytest.raises(ResourceExistsError):
            await table.create_entity(entity)
    assert table_faults.statuses == {f"insert other {INSERTED}": 1, "insert other 409": 1}


async def test_a_late_commit_that_lands_before_a_retry(stack, table_faults, table_name):
    """The other order: the late write lands between two retries; the next retry, released, reaches
    Azurite and gets 409, so the client sees ResourceExistsError for its own insert."""
    entity = _entity()
    fault = table_faults.arm("late", "insert other", retries="fail")
    # Backoff: the first retry at once, the second 0.5 * 2 = 1 s later.
    async with _through(table_faults, stack, table_name, retry_total=3, retry_backoff_factor=0.5) as table:
        insert = asyncio.create_task(table.create_entity(entity))
        await fault.wait_attempts(2)  # the first attempt and the immediate retry: both 500
        assert await fault.commit() == INSERTED
        fault.release()
        with pytest.raises(ResourceExistsError) as failed:
            await insert
    assert failed.value.response.headers["x-ms-error-code"] == "EntityAlreadyExists"
    assert fault.attempts == 3 and fault.retry_answers == [500, 409]
    assert await _exists(stack, table_name, entity)


@pytest.mark.parametrize(("retry_total", "client_sees"), [(0, HttpResponseError), (3, ResourceExistsError)])
async def test_a_lost_answer_insert_committed_although_the_client_saw_500(
    stack, table_faults, table_name, retry_total, client_sees
):
    """Without retries the client sees 500 OperationTimedOut; with them, its retry finds its own
    first attempt (409 EntityAlreadyExists). Either way the row is there."""
    entity = _entity()
    fault = table_faults.arm("lost_answer", row(entity["PartitionKey"], entity["RowKey"]))
    async with _through(table_faults, stack, table_name, retry_total=retry_total, **FAST_RETRIES) as table:
        with pytest.raises(client_sees) as failed:
            await table.create_entity(entity)
        got = await table.get_entity(entity["PartitionKey"], entity["RowKey"])
    assert got["value"] == "v1"
    assert fault.landed_status == INSERTED and await fault.commit() == INSERTED  # commit: already landed
    if retry_total == 0:
        _assert_operation_timed_out(failed.value)
        assert fault.attempts == 1
    else:
        assert failed.value.response.headers["x-ms-error-code"] == "EntityAlreadyExists"
        assert fault.attempts == 2 and fault.retry_answers == [409]


async def test_a_timed_out_insert_that_committed_before_the_client_gave_up(stack, table_faults, table_name):
    entity = _entity()
    fault = table_faults.arm("timeout", "insert other")  # forward="before"
    async with _through(table_faults, stack, table_name, retry_total=3, read_timeout=1) as table:
        started = time.monotonic()
        with pytest.raises(ServiceResponseError):
            await table.create_entity(entity)
        assert 0.9 < time.monotonic() - started < 30  # its read timeout, not the 60 s hold
    assert fault.attempts == 1  # azure-core does not retry a POST that got no answer
    assert await _exists(stack, table_name, entity)
    await fault.wait_client_gave_up(2)  # the proxy notices the closed connection within 50 ms


async def test_a_timed_out_insert_that_lands_after_the_client_looked(stack, table_faults, table_name):
    entity = _entity()
    fault = table_faults.arm("timeout", "insert other", forward="after")
    async with _through(table_faults, stack, table_name, read_timeout=1) as table:
        with pytest.raises(ServiceResponseError):
            await table.create_entity(entity)
        with pytest.raises(ResourceNotFoundError):
            await table.get_entity(entity["PartitionKey"], entity["RowKey"])
        assert await fault.commit() == INSERTED
        assert (await table.get_entity(entity["PartitionKey"], entity["RowKey"]))["value"] == "v1"


async def test_a_held_answer_can_be_released(stack, table_faults, table_name):
    """A timeout's answer held until the test lets it go: the client then gets 500."""
    fault = table_faults.arm("timeout", "insert other", retries="fail")
    async with _through(table_faults, stack, table_name, retry_total=0) as table:
        call = asyncio.create_task(table.create_entity(_entity()))
        await fault.wait_hit()
        await asyncio.sleep(0.2)
        assert not call.done()
        fault.release()
        with pytest.raises(HttpResponseError) as failed:
            await call
    _assert_operation_timed_out(failed.value)
    assert not fault.client_gave_up


async def test_an_uncommitted_late_write_is_dropped_when_the_proxy_closes(stack, table_name):
    from tests.table_faults import FaultDropped

    entity = _entity()
    async with FaultyTableProxy.for_stack(stack) as proxy:
        fault = proxy.arm("late", "insert other")
        async with _through(proxy, stack, table_name, retry_total=0) as table:
            with pytest.raises(HttpResponseError):
                await table.create_entity(entity)
    with pytest.raises(FaultDropped):
        await fault.landed()
    assert not await _exists(stack, table_name, entity)


async def test_the_service_reaches_its_table_through_the_proxy(faulty_service, table_faults):
    """`faulty_service`: the in-process service, managed identity, Table requests via the proxy."""
    user = "faults-" + uuid.uuid4().hex[:8]
    response = await function_app.issue_token(http_request("POST", "token", token=faulty_service.token(user)))
    assert response.status_code == 200, response
    assert body_of(response)["identityCreated"] is True
    assert table_faults.calls["insert mapping"] == 1
    assert table_faults.statuses[f"insert mapping {INSERTED}"] == 1


async def test_the_services_own_retries_meet_a_late_mapping_insert(faulty_service, table_faults):
    """How a service test arms a fault: the service's Table client (TABLE_CLIENT_OPTIONS, retry_total
    3) makes 4 attempts of its mapping insert, all answered 500 and none forwarded; the insert lands
    only when the test commits it, after whatever the service did meanwhile (not asserted here)."""
    fault = table_faults.arm("late", "insert mapping", retries="fail")
    user = "faults-late-" + uuid.uuid4().hex[:8]
    await function_app.issue_token(http_request("POST", "token", token=faulty_service.token(user)))
    await fault.wait_attempts(4, within=1)
    assert fault.retry_answers == [500, 500, 500]
    assert table_faults.injected == {f"insert mapping 500 {OPERATION_TIMED_OUT}": 4}
    assert "insert mapping" not in {call.rsplit(" ", 1)[0] for call in table_faults.statuses}
    assert await fault.commit() in (INSERTED, 409)  # 409 if the service wrote the row itself
