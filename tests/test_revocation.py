"""Revocation, deletion and the cleanup timer, against Azurite and the emulator."""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from contextlib import contextmanager

import pytest

import function_app
from devstack.layout import HOST_LOG_FILE
from shared.compose import services
from shared.store.keys import retention_row, user_key
from tests.service_helpers import body_of, drain_cleanup, request, retention_rows, retention_runs

ADMIN = ("TokenService.Admin",)


async def _token(users, user: str) -> dict:
    response = await function_app.issue_token(request("POST", "token", token=users.token(user)))
    assert response.status_code == 200, response.get_body()
    return body_of(response)


async def _call(handler, users, user: str, method: str, route: str, *, roles=(), route_params=None):
    return await handler(
        request(method, route, token=users.token(user, roles=roles), route_params=route_params)
    )


async def _cleanup() -> dict:
    return await services().cleanup.run(ignore_backoff=True)


@contextmanager
def _days_ago(days: int):
    """The token service's clock set back: what it creates now looks unused since then."""
    tokens = services().tokens
    real_clock, then = tokens.clock, dt.datetime.now(dt.UTC) - dt.timedelta(days=days)
    tokens.clock = lambda: then
    try:
        yield then
    finally:
        tokens.clock = real_clock


async def test_revoke_invalidates_every_earlier_token_and_new_ones_work(service, emulator):
    emulator.faults(revocationDelaySeconds=0)  # this test checks that ACS was told, not propagation
    tokens = [(await _token(service, "rev-alice"))["token"] for _ in range(3)]
    response = await _call(function_app.revoke_tokens, service, "rev-alice", "POST", "token/revoke")
    assert response.status_code == 200 and body_of(response)["status"] == "revoked"
    assert [emulator.verify(t)["valid"] for t in tokens] == [False] * 3
    fresh = await _token(service, "rev-alice")
    assert emulator.verify(fresh["token"])["valid"] and fresh["identityCreated"] is False


async def test_revoked_means_acs_accepted_it_not_that_old_tokens_already_fail(service, emulator):
    """ACS: revocation "isn't immediate. It can take up to 15 minutes to propagate." (Microsoft
    Learn, Communication Services identity model, "Revoke or update access token")."""
    emulator.faults(revocationDelaySeconds=0.5)
    old = (await _token(service, "rev-eve"))["token"]
    response = await _call(function_app.revoke_tokens, service, "rev-eve", "POST", "token/revoke")
    assert response.status_code == 200 and body_of(response)["status"] == "revoked"
    assert emulator.verify(old) == {"valid": True, "reason": "valid: revocation not yet propagated"}
    fresh = await _token(service, "rev-eve")  # the user is not blocked while ACS propagates
    assert fresh["identityCreated"] is False and emulator.verify(fresh["token"])["valid"]
    await asyncio.sleep(0.55)
    assert emulator.verify(old) == {"valid": False, "reason": "revoked"}
    assert emulator.verify(fresh["token"]) == {"valid": True, "reason": "valid"}


async def test_delete_removes_the_acs_identity_and_the_mapping(service, emulator):
    issued = await _token(service, "del-bob")
    live = emulator.stats()["liveIdentities"]
    response = await _call(function_app.delete_identity, service, "del-bob", "DELETE", "identity")
    assert response.status_code == 200 and body_of(response)["status"] == "deleted"
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}
    assert emulator.stats()["liveIdentities"] == live - 1
    store = services().store
    assert await store.identities.get(user_key(service.stack["issuer"], "del-bob")) is None
    assert await store.lookups.owner_of(issued["communicationUserId"]) is None
    refresh = await _call(function_app.refresh_token, service, "del-bob", "POST", "token/refresh")
    assert refresh.status_code == 404
    assert (await _call(function_app.get_identity, service, "del-bob", "GET", "identity")).status_code == 404
    assert emulator.stats()["liveIdentities"] == live - 1  # refresh recreated nothing


@pytest.mark.parametrize(
    ("handler", "method", "route"),
    [("revoke_tokens", "POST", "token/revoke"), ("delete_identity", "DELETE", "identity")],
)
async def test_no_identity_is_404(service, handler, method, route):
    response = await _call(getattr(function_app, handler), service, "nobody-here", method, route)
    assert response.status_code == 404 and body_of(response)["code"] == "identity_not_found"


async def test_a_user_acts_only_on_their_own_identity(service, emulator):
    alice = await _token(service, "own-alice")
    await _token(service, "own-mallory")
    await _call(function_app.revoke_tokens, service, "own-mallory", "POST", "token/revoke")
    await _call(function_app.delete_identity, service, "own-mallory", "DELETE", "identity")
    assert emulator.verify(alice["token"])["valid"]
    # The manage/ routes name any identity, but need the admin role.
    params = {"communicationUserId": alice["communicationUserId"]}
    for handler, method, route in (
        (function_app.manage_revoke_tokens, "POST", "manage/identities/x/revoke"),
        (function_app.manage_delete_identity, "DELETE", "manage/identities/x"),
    ):
        response = await _call(handler, service, "own-mallory", method, route, route_params=params)
        assert response.status_code == 403 and body_of(response)["code"] == "forbidden"
    assert emulator.verify(alice["token"])["valid"]


async def _manage(users, handler, method: str, communication_user_id: str):
    params = {"communicationUserId": communication_user_id}
    route = "manage/identities/x" + ("/revoke" if method == "POST" else "")
    return await _call(handler, users, "adm-root", method, route, roles=ADMIN, route_params=params)


async def test_admin_revokes_and_deletes_any_identity(service, emulator):
    carol = await _token(service, "adm-carol")
    revoked = await _manage(service, function_app.manage_revoke_tokens, "POST", carol["communicationUserId"])
    assert revoked.status_code == 200 and body_of(revoked)["status"] == "revoked"
    assert not emulator.verify(carol["token"])["valid"]
    deleted = await _manage(
        service, function_app.manage_delete_identity, "DELETE", carol["communicationUserId"]
    )
    assert deleted.status_code == 200 and body_of(deleted)["status"] == "deleted"
    again = await _manage(
        service, function_app.manage_delete_identity, "DELETE", carol["communicationUserId"]
    )
    assert again.status_code == 404


async def test_admin_unknown_identity_is_404(service):
    response = await _manage(service, function_app.manage_revoke_tokens, "POST", "8:acs:unknown_1")
    assert response.status_code == 404


@pytest.mark.slow
async def test_revocations_during_an_outage_are_kept_and_applied_once(service, emulator):
    users = [f"outage-{i}" for i in range(100)]
    issued = await asyncio.gather(*(_token(service, u) for u in users))
    emulator.faults(down=True)
    responses = await asyncio.gather(
        *(_call(function_app.revoke_tokens, service, u, "POST", "token/revoke") for u in users)
    )
    assert {r.status_code for r in responses} == {202}
    assert {body_of(r)["status"] for r in responses} == {"pending"}
    blocked = await _call(function_app.issue_token, service, users[0], "POST", "token")
    assert blocked.status_code == 409 and body_of(blocked)["code"] == "revoke_pending"
    assert "Retry-After" in blocked.headers
    assert all(emulator.verify(t["token"])["valid"] for t in issued)  # not applied yet

    emulator.faults(down=False)
    before = emulator.stats()["calls"]["revokeAccessTokens"]
    report = await _cleanup()
    assert report["revoked"] == 100
    assert emulator.stats()["calls"]["revokeAccessTokens"] - before == 100
    assert not any(emulator.verify(t["token"])["valid"] for t in issued)
    assert (await _cleanup()).get("revoked", 0) == 0  # nothing applied twice
    assert emulator.stats()["calls"]["revokeAccessTokens"] - before == 100
    fresh = await _token(service, users[0])
    assert emulator.verify(fresh["token"])["valid"]


async def test_two_cleanup_runs_at_once_apply_each_revocation_once(service, emulator):
    users = [f"twice-{i}" for i in range(30)]
    await asyncio.gather(*(_token(service, u) for u in users))
    emulator.faults(down=True)
    await asyncio.gather(
        *(_call(function_app.revoke_tokens, service, u, "POST", "token/revoke") for u in users)
    )
    emulator.faults(down=False)
    before = emulator.stats()["calls"]["revokeAccessTokens"]
    first, second = await asyncio.gather(_cleanup(), _cleanup())
    assert first.get("revoked", 0) + second.get("revoked", 0) == 30
    assert emulator.stats()["calls"]["revokeAccessTokens"] - before == 30


async def test_pending_delete_completes_later(service, emulator):
    issued = await _token(service, "pend-dan")
    emulator.faults(errorRate=1.0)
    response = await _call(function_app.delete_identity, service, "pend-dan", "DELETE", "identity")
    assert response.status_code == 202 and body_of(response)["status"] == "pending"
    refresh = await _call(function_app.refresh_token, service, "pend-dan", "POST", "token/refresh")
    assert refresh.status_code == 409 and body_of(refresh)["code"] == "delete_pending"
    emulator.faults(errorRate=0.0)
    report = await _cleanup()
    assert report["deleted"] >= 1
    assert emulator.verify(issued["token"]) == {"valid": False, "reason": "identity deleted"}
    assert await services().store.identities.get(user_key(service.stack["issuer"], "pend-dan")) is None


async def test_failed_attempts_back_off(service, emulator):
    await _token(service, "slow-erin")
    emulator.faults(down=True)
    await _call(function_app.revoke_tokens, service, "slow-erin", "POST", "token/revoke")
    report = await _cleanup()  # still down: retried later, not lost
    assert report.get("retry_revoke", 0) >= 1
    emulator.faults(down=False)
    assert (await services().cleanup.run()).get("revoked", 0) == 0  # backoff respected
    assert (await _cleanup())["revoked"] >= 1


async def test_retention_deletes_exactly_the_stale_identities(service, emulator):
    await drain_cleanup()
    clients = services()
    with _days_ago(120):
        stale = [await _token(service, f"stale-{i}") for i in range(3)]
        revived = await _token(service, "stale-but-back")
    fresh = await _token(service, "fresh-one")
    await _token(service, "stale-but-back")  # used today: the daily touch moves it forward
    live = emulator.stats()["liveIdentities"]

    report = await retention_runs()
    assert report["retention_claimed"] == 3 and report["retention_refiled"] == 1, report
    assert report["retention_deleted"] == 3, report
    assert emulator.stats()["liveIdentities"] == live - 3
    for issued in stale:
        assert emulator.verify(issued["token"])["reason"] == "identity deleted"
        assert await clients.store.lookups.owner_of(issued["communicationUserId"]) is None
    for issued in (revived, fresh):
        assert await clients.store.lookups.owner_of(issued["communicationUserId"]) is not None
    assert (await retention_runs()).get("retention_deleted", 0) == 0


async def test_retention_retires_an_identity_filed_twice_once_and_drops_both_rows(service, emulator):
    await drain_cleanup()
    # Two rows for one identity: a move forward that wrote the new row and crashed before dropping the old.
    clients = services()
    with _days_ago(120) as old:
        issued = await _token(service, "filed-twice")
    key = user_key(service.stack["issuer"], "filed-twice")
    [row] = await retention_rows(clients.store.table.client, key)
    older = (old - dt.timedelta(days=3)).date().isoformat()
    record = await clients.store.identities.get(key)
    moved = retention_row(older, key, record.communication_user_id)
    await clients.store.table.client.upsert_entity({**row, "RowKey": moved})

    report = await retention_runs()
    assert report["retention_deleted"] == 1 and report.get("retention_failed", 0) == 0, report
    assert emulator.verify(issued["token"])["reason"] == "identity deleted"
    assert await retention_rows(clients.store.table.client, key) == []


async def test_retention_deletes_an_identity_a_crash_left_unmapped(service, table_calls, emulator):
    await drain_cleanup()
    from azure.communication.identity import CommunicationIdentityClient

    from shared.store.record import IdentityRecord

    acs = CommunicationIdentityClient.from_connection_string(service.stack["acs_connection_string"])
    created, token = acs.create_user_and_token(["chat"])
    old = dt.datetime.now(dt.UTC) - dt.timedelta(days=120)
    record = IdentityRecord(
        user_key=user_key(service.stack["issuer"], "crashed-mid-create"),
        communication_user_id=created.properties["id"],
        issuer=service.stack["issuer"],
        subject="crashed-mid-create",
        created_at=old,
        last_used_on=old.date().isoformat(),
        last_issued_at=old,
    )
    store = services().store

    class Crash(BaseException):  # the process dies: nothing after it runs
        pass

    async def crash(*_args, **_kwargs):
        raise Crash  # before the mapping insert lands

    async def discard(_communication_user_id):
        raise AssertionError("a crash discards nothing")

    with table_calls.replacing(create_entity=crash):
        with pytest.raises(Crash):
            await store.identities.create(record, discard=discard)
    kept = await _token(service, "kept-while-sweeping")
    assert await store.lookups.owner_of(record.communication_user_id) == record.user_key
    assert emulator.verify(token.token)["valid"]

    report = await _cleanup()
    assert report["retention_unmapped_deleted"] == 1, report
    assert emulator.verify(token.token)["reason"] == "identity deleted"
    assert await store.lookups.owner_of(record.communication_user_id) is None
    assert emulator.verify(kept["token"])["valid"]
    assert (await _cleanup()).get("retention_unmapped_deleted", 0) == 0


def test_devstack_timer_cleanup_runs_once_now_and_says_what_it_did(stack):
    said = stack.timer("cleanup")
    assert said.startswith("cleanup: ") and "pending revocations and deletions due" in said
    assert "identities unused for IDENTITY_RETENTION_DAYS retired" in said
    report = json.loads(stack.timer("cleanup", "--json"))
    assert isinstance(report, dict) and "pending_due" in report


async def test_an_identity_lost_in_a_race_is_deleted_later_when_acs_is_down_now(service, emulator):
    from azure.communication.identity import CommunicationIdentityClient

    acs = CommunicationIdentityClient.from_connection_string(service.stack["acs_connection_string"])
    orphan, token = acs.create_user_and_token(["chat"])
    live = emulator.stats()["liveIdentities"]
    emulator.faults(down=True)
    await services().tokens.discard(orphan.properties["id"])  # what a race loser does
    emulator.faults(down=False)
    assert emulator.stats()["liveIdentities"] == live  # still there: ACS was down
    report = await _cleanup()
    assert report["discarded"] == 1
    assert emulator.stats()["liveIdentities"] == live - 1
    assert emulator.verify(token.token)["reason"] == "identity deleted"


def test_the_dev_host_schedules_the_cleanup_timer_from_settings_and_runs_it_in_its_worker(stack):
    import time

    import requests

    import function_app as app_module
    from devstack.host_functions import index
    from devstack.service_settings import REPO_ROOT, settings_for_host
    from devstack.worker import metadata_of

    metadata = metadata_of(app_module.app, str(REPO_ROOT))  # what the worker tells the host
    timers = {t.name: t for t in index(metadata, settings_for_host(stack.env)).timers}
    assert timers["cleanup"].schedule.expression == "0 */5 * * * *"
    custom = index(metadata, {"CLEANUP_SCHEDULE": "30 * * * * *"}).timers
    assert [t.schedule.expression for t in custom] == ["30 * * * * *"]
    # The host's admin API runs a timer now (master key only), through the worker like a scheduled run.
    run_now = f"{stack['api'].removesuffix('/api')}/admin/functions/cleanup"
    assert (
        requests.post(
            run_now, json={}, headers={"x-functions-key": stack["function_key"]}, timeout=10
        ).status_code
        == 401
    )
    response = requests.post(run_now, json={}, headers={"x-functions-key": stack["master_key"]}, timeout=10)
    assert response.status_code == 202
    log = stack.state_dir / HOST_LOG_FILE
    deadline = time.monotonic() + 30
    while "Executed 'Functions.cleanup' (Succeeded" not in log.read_text() and time.monotonic() < deadline:
        time.sleep(0.1)
    logged = log.read_text()
    assert "Executed 'Functions.cleanup' (Succeeded" in logged
    assert "Function.cleanup.User: cleanup run done" in logged  # the service's own record, via the worker


async def test_event_ids_are_remembered_for_a_week_then_forgotten(service):
    store = services().store
    now = dt.datetime.now(dt.UTC)
    await store.marks.mark_done("evt-old", now - dt.timedelta(days=8))
    await store.marks.mark_done("evt-recent", now - dt.timedelta(days=2))
    assert await store.marks.seen("evt-old") and await store.marks.seen("evt-recent")
    report = await _cleanup()
    assert report["event_ids_forgotten"] >= 1
    assert not await store.marks.seen("evt-old")  # forgotten: a new delivery would act
    assert await store.marks.seen("evt-recent")  # still deduplicated


async def test_deleting_an_identity_used_since_its_first_day_drops_its_retention_row(service, emulator):
    # Filed under its first day, last used today: the row is still under the first day.
    with _days_ago(30):
        await _token(service, "used-since")
    await _token(service, "used-since")  # today's use moves only the mapping's last use
    key = user_key(service.stack["issuer"], "used-since")
    response = await _call(function_app.delete_identity, service, "used-since", "DELETE", "identity")
    assert response.status_code == 200
    # Nothing left for a later sweep to spend an ACS call on.
    assert await retention_rows(services().store.table.client, key) == []
