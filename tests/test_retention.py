"""Retention never deletes an identity that is in use (issue 16), replayed step by step.

Each race is replayed in a fixed order: `Pause` holds one real call (a Table write, an ACS call)
of one side until the other side has done its part, so every interleaving the reliability review
found is run deterministically against Azurite and the ACS emulator. The four sequences:

1. retention races a returning user (whose refresh is slow in ACS);
2. a retention delete that ACS throttled, and the user returning before ACS recovers;
3. a mapping insert whose answer was lost, committing after the service looked (tests/table_faults.py);
4. a Graph UserDeleted event arriving during that user's first POST /api/token.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
from collections import Counter
from contextlib import contextmanager

import pytest
from azure.core.exceptions import ServiceResponseError

import function_app
from shared import cleanup as cleanup_module
from shared.compose import services
from shared.store.keys import user_key
from tests.service_helpers import body_of, drain_cleanup, request, retention_runs
from tests.table_faults import faulty_service_fixture, table_faults_fixture  # noqa: F401


class Pause:
    """Holds the first call of `owner.name` (before it runs, or after, with `after`) until
    `release()`: one side of a race stopped exactly where the other side must overtake it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, owner: object, name: str, *, after: bool = False):
        self.reached = asyncio.Event()
        self._go = asyncio.Event()
        self.calls = 0
        real = getattr(owner, name)

        async def paused(*args, **kwargs):
            self.calls += 1
            first = self.calls == 1
            if first and not after:
                await self._hold()
            result = await real(*args, **kwargs)
            if first and after:
                await self._hold()
            return result

        monkeypatch.setattr(owner, name, paused)

    async def _hold(self) -> None:
        self.reached.set()
        await self._go.wait()

    async def wait(self) -> None:
        await asyncio.wait_for(self.reached.wait(), 30)

    def release(self) -> None:
        self._go.set()


@contextmanager
def _tokens_clock(at: dt.datetime):
    tokens = services().tokens
    real, tokens.clock = tokens.clock, lambda: at
    try:
        yield
    finally:
        tokens.clock = real


def _stale_day() -> dt.datetime:
    """A day just past the retention period: what was used then is retention's to take."""
    return dt.datetime.now(dt.UTC) - dt.timedelta(days=services().settings.retention_days + 1)


async def _post(service, route: str, user: str, *, bearer: str | None = None):
    handler = {"token": function_app.issue_token, "token/refresh": function_app.refresh_token}[route]
    return await handler(request("POST", route, token=bearer or service.token(user)))


async def _stale_user(service, user: str) -> dict:
    """A user who last used the service just over the retention period ago."""
    with _tokens_clock(_stale_day()):
        response = await _post(service, "token", user)
    assert response.status_code == 200, response
    return body_of(response)


async def _mapping(service, user: str):
    return await services().store.identities.get(user_key(service.stack["issuer"], user))


async def _run_at(offset: dt.timedelta) -> dict:
    """One cleanup run, its clock `offset` ahead (a later timer run)."""
    cleanup = services().cleanup
    real = cleanup.clock
    cleanup.clock = lambda: real() + offset
    try:
        return await cleanup.run(ignore_backoff=True)
    finally:
        cleanup.clock = real


LATER = cleanup_module.RETIRE_GRACE + dt.timedelta(minutes=1)


# ---- 1: retention races a returning user ------------------------------------------------------------


async def test_a_user_returning_while_retention_runs_keeps_their_identity(
    service, acs_calls, emulator, monkeypatch
):
    """The review's sequence: a user 91 days stale refreshes, ACS slow (800 ms), while cleanup runs
    both of retention's steps. Before: 200 with a token, then the identity and mapping deleted.
    Now the refresh writes its use before it asks ACS, so retention, running while the refresh is
    in ACS, finds the identity used (the other orders: the tests below)."""
    await drain_cleanup()
    stale = await _stale_user(service, "back-in-acs")
    emulator.faults(latencyMs=800)
    in_acs = Pause(monkeypatch, acs_calls, "get_token")  # the refresh's token
    refresh = asyncio.create_task(_post(service, "token/refresh", "back-in-acs"))
    await in_acs.wait()  # the refresh is in ACS; retention runs now, claim and commit
    report = await retention_runs()
    in_acs.release()
    response = await refresh
    emulator.faults(latencyMs=0)

    assert response.status_code == 200, response
    assert report.get("retention_deleted", 0) == 0, report
    assert emulator.verify(body_of(response)["token"])["valid"]
    assert emulator.verify(stale["token"])["valid"]  # the same identity: nothing was deleted
    kept = await _mapping(service, "back-in-acs")
    assert kept.communication_user_id == stale["communicationUserId"] and kept.pending == ""
    assert kept.last_used_on == dt.datetime.now(dt.UTC).date().isoformat()
    assert (await retention_runs()).get("retention_deleted", 0) == 0


async def test_a_claim_made_between_a_users_read_and_their_use_is_cancelled_by_the_use(
    service, emulator, monkeypatch
):
    """Retention claims the identity after the refresh read the mapping and before it wrote its
    use: the use's etag-guarded write fails, looks again, and clears the claim; the commit, a run
    later, finds the claim gone."""
    await drain_cleanup()
    stale = await _stale_user(service, "claimed-mid-read")
    store = services().store
    before_use = Pause(monkeypatch, store.retention, "keep_in_use")
    refresh = asyncio.create_task(_post(service, "token/refresh", "claimed-mid-read"))
    await before_use.wait()
    claimed = await services().cleanup.run(ignore_backoff=True)
    assert claimed["retention_claimed"] == 1, claimed
    assert (await _mapping(service, "claimed-mid-read")).pending == "retire"
    before_use.release()
    response = await refresh
    assert response.status_code == 200, response

    committed = await _run_at(LATER)
    assert committed["retention_cancelled"] == 1 and committed.get("retention_deleted", 0) == 0, committed
    assert emulator.verify(body_of(response)["token"])["valid"]
    assert emulator.verify(stale["token"])["valid"]
    assert (await _mapping(service, "claimed-mid-read")).pending == ""


async def test_a_claimed_identity_is_not_a_blocked_one(service, emulator):
    """A claim never blocks: the user gets a token at once, and the claim is gone."""
    await drain_cleanup()
    stale = await _stale_user(service, "claimed-then-back")
    claimed = await services().cleanup.run(ignore_backoff=True)
    assert claimed["retention_claimed"] == 1, claimed
    for route in ("token/refresh", "token"):
        response = await _post(service, route, "claimed-then-back")
        assert response.status_code == 200, response
        assert body_of(response)["communicationUserId"] == stale["communicationUserId"]
    report = await _run_at(LATER)
    assert report["retention_cancelled"] == 1 and report.get("retention_deleted", 0) == 0, report


async def test_a_user_arriving_after_retention_committed_gets_no_token_for_the_doomed_identity(
    service, acs_calls, emulator, monkeypatch
):
    """The commit is the point of no return: a request after it is refused (409), never handed a
    token for an identity about to be deleted, and then told it was retired, and starts over."""
    await drain_cleanup()
    stale = await _stale_user(service, "too-late")
    await services().cleanup.run(ignore_backoff=True)  # the claim
    in_delete = Pause(monkeypatch, acs_calls, "delete_user")
    run = asyncio.create_task(_run_at(LATER))
    await in_delete.wait()  # committed, ACS not yet asked
    refused = await _post(service, "token/refresh", "too-late")
    assert refused.status_code == 409 and body_of(refused)["code"] == "delete_pending", refused
    in_delete.release()
    assert (await run)["retention_deleted"] == 1
    assert emulator.verify(stale["token"])["reason"] == "identity deleted"
    told = await _post(service, "token/refresh", "too-late")
    assert told.status_code == 404 and "retired" in body_of(told)["detail"], told
    again = await _post(service, "token", "too-late")
    assert again.status_code == 200 and body_of(again)["identityCreated"] is True, again


async def test_two_retention_passes_at_once_claim_and_delete_each_identity_once(
    service, emulator, monkeypatch
):
    """One pass judged a row and is held before its claim; another pass claims everything; the
    first's claim then fails on the changed mapping. Before: both acted on every stale row."""
    await drain_cleanup()
    users = [f"two-passes-{i}" for i in range(4)]
    for user in users:
        await _stale_user(service, user)
    cleanup = services().cleanup
    held = Pause(monkeypatch, services().store.retention, "claim_retirement")
    first = asyncio.create_task(cleanup.run(ignore_backoff=True))
    await held.wait()
    second = await cleanup.run(ignore_backoff=True)
    held.release()
    first_report = await first
    assert second["retention_claimed"] == len(users), second
    assert first_report.get("retention_claimed", 0) == 0, first_report
    assert first_report["retention_used_meanwhile"] == 1, first_report  # the row it was holding

    deletes_before = emulator.stats()["calls"]["deleteIdentity"]
    done = Counter()
    for report in await asyncio.gather(*(_run_at(LATER) for _ in range(2))):
        done.update(report)
    assert done["retention_deleted"] == len(users), done
    assert emulator.stats()["calls"]["deleteIdentity"] - deletes_before == len(users)


def test_the_claims_grace_outlasts_any_request():
    """A request that read the mapping before the claim must have written its use before the
    commit: the Functions host ends an invocation at host.json's functionTimeout."""
    from pathlib import Path

    timeout = json.loads((Path(__file__).parent.parent / "host.json").read_text())["functionTimeout"]
    hours, minutes, seconds = (int(part) for part in timeout.split(":"))
    limit = dt.timedelta(hours=hours, minutes=minutes, seconds=seconds)
    assert cleanup_module.RETIRE_GRACE > limit
    assert cleanup_module.LATE_WRITE_GRACE > dt.timedelta(seconds=30)  # the Table service's limit


# ---- 2: a retention delete that ACS throttled --------------------------------------------------------


async def test_a_throttled_retention_delete_gives_way_to_the_returning_user(service, emulator):
    """Before: queued as a pending delete, the user blocked (409), and deleted once ACS recovered
    although the user came back meanwhile."""
    await drain_cleanup()
    stale = await _stale_user(service, "throttled-retire")
    await services().cleanup.run(ignore_backoff=True)  # the claim
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    try:
        report = await _run_at(LATER)
    finally:
        emulator.faults(throttleRate=0.0, retryAfterSeconds=1)
    assert report["retry_retire"] == 1 and report.get("retention_deleted", 0) == 0, report
    assert (await _mapping(service, "throttled-retire")).pending == "retire"  # not a block

    response = await _post(service, "token/refresh", "throttled-retire")
    assert response.status_code == 200, response
    assert body_of(response)["communicationUserId"] == stale["communicationUserId"]
    report = await _run_at(LATER + cleanup_module.MAX_BACKOFF)
    assert report["retention_cancelled"] == 1 and report.get("retention_deleted", 0) == 0, report
    assert emulator.verify(body_of(response)["token"])["valid"]
    kept = await _mapping(service, "throttled-retire")
    assert kept.pending == "" and kept.last_used_on == dt.datetime.now(dt.UTC).date().isoformat()


async def test_a_user_returning_to_a_claim_while_acs_is_down_keeps_their_identity(service, emulator):
    """ "Even while ACS is failing": the refresh fails (ACS is down), but its use was written
    before ACS was asked, so the commit, a run later, finds the claim gone."""
    await drain_cleanup()
    stale = await _stale_user(service, "back-during-outage")
    await services().cleanup.run(ignore_backoff=True)  # the claim
    emulator.faults(down=True)
    try:
        failed = await _post(service, "token/refresh", "back-during-outage")
        assert failed.status_code == 503, failed
        report = await _run_at(LATER)
    finally:
        emulator.faults(down=False)
    assert report["retention_cancelled"] == 1 and report.get("retention_deleted", 0) == 0, report
    again = await _post(service, "token/refresh", "back-during-outage")
    assert again.status_code == 200 and body_of(again)["communicationUserId"] == stale["communicationUserId"]


async def test_a_delete_acs_did_not_answer_blocks_until_acs_says_whether_it_happened(service, emulator):
    """No answer (the connection dropped) may still mean deleted: the user is refused (409) rather
    than handed a token that may die, and the use is noted. Once ACS answers again, the timer
    asks it whether the identity is still there: it is, and it was used, so it stays."""
    await drain_cleanup()
    stale = await _stale_user(service, "no-answer")
    await services().cleanup.run(ignore_backoff=True)  # the claim
    emulator.faults(down=True)
    try:
        report = await _run_at(LATER)  # the commit; ACS hangs up
        assert report["retry_retire"] == 1, report
        blocked = await _post(service, "token/refresh", "no-answer")
    finally:
        emulator.faults(down=False)
    assert blocked.status_code == 409 and body_of(blocked)["code"] == "delete_pending", blocked
    assert (await _mapping(service, "no-answer")).last_used_on == dt.datetime.now(dt.UTC).date().isoformat()
    report = await _run_at(LATER + cleanup_module.MAX_BACKOFF)
    assert report["retention_cancelled"] == 1 and report.get("retention_deleted", 0) == 0, report
    again = await _post(service, "token/refresh", "no-answer")
    assert again.status_code == 200 and body_of(again)["communicationUserId"] == stale["communicationUserId"]


async def test_a_delete_acs_carried_out_without_answering_is_finished_by_the_timer(
    service, acs_calls, emulator
):
    """The other outcome: ACS deleted it, and the answer was lost. The timer's question finds it
    gone and forgets it; nobody was handed a token meanwhile."""
    await drain_cleanup()
    stale = await _stale_user(service, "deleted-no-answer")
    await services().cleanup.run(ignore_backoff=True)
    real_delete = acs_calls.real.delete_user

    async def deleted_then_lost(*args, **kwargs):
        await real_delete(*args, **kwargs)
        raise ServiceResponseError(message="the connection dropped before ACS answered")

    with acs_calls.replacing(delete_user=deleted_then_lost):
        report = await _run_at(LATER)
    assert report["retry_retire"] == 1, report
    blocked = await _post(service, "token/refresh", "deleted-no-answer")
    assert blocked.status_code == 409, blocked
    report = await _run_at(LATER + cleanup_module.MAX_BACKOFF)
    assert report["retention_deleted"] == 1, report
    assert emulator.verify(stale["token"])["reason"] == "identity deleted"
    assert await _mapping(service, "deleted-no-answer") is None


async def test_a_run_that_lost_its_lease_never_asks_acs_to_delete(service, emulator, monkeypatch):
    """A slow run (its Table calls outlasting the lease) and a second run that took the work over
    and gave the identity back to its returning user: the first must not delete it after all."""
    await drain_cleanup()
    stale = await _stale_user(service, "slow-commit")
    await services().cleanup.run(ignore_backoff=True)  # the claim
    store = services().store
    slow = Pause(monkeypatch, store.retention, "lease_entries")
    first = asyncio.create_task(_run_at(LATER))
    await slow.wait()  # committed; about to take ACS's turn
    blocked = await _post(service, "token/refresh", "slow-commit")
    assert blocked.status_code == 409, blocked  # noted as a use
    second = await _run_at(LATER + cleanup_module.LEASE + dt.timedelta(minutes=1))
    assert second["retention_cancelled"] == 1, second
    served = await _post(service, "token/refresh", "slow-commit")
    assert served.status_code == 200, served
    deletes = emulator.stats()["calls"]["deleteIdentity"]
    slow.release()
    assert (await first).get("retention_deleted", 0) == 0
    assert emulator.stats()["calls"]["deleteIdentity"] == deletes
    assert emulator.verify(body_of(served)["token"])["valid"] and emulator.verify(stale["token"])["valid"]


async def test_an_admin_delete_during_a_committed_retirement_keeps_its_strength(
    service, acs_calls, emulator, monkeypatch
):
    """Retention committed, ACS throttled: an admin's delete (202) replaces retention's, so ACS's
    refusal of retention's delete no longer gives the identity back; the admin's completes."""
    await drain_cleanup()
    stale = await _stale_user(service, "admin-during-retire")
    await services().cleanup.run(ignore_backoff=True)
    in_delete = Pause(monkeypatch, acs_calls, "delete_user")
    run = asyncio.create_task(_run_at(LATER))
    await in_delete.wait()
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    try:
        response = await function_app.manage_delete_identity(
            request(
                "DELETE",
                f"manage/identities/{stale['communicationUserId']}",
                token=service.token("retention-admin", roles=("TokenService.Admin",)),
                route_params={"communicationUserId": stale["communicationUserId"]},
            )
        )
        assert response.status_code == 202, response
        in_delete.release()
        assert (await run)["retry_retire"] == 1
        refused = await _post(service, "token/refresh", "admin-during-retire")
        assert refused.status_code == 409 and body_of(refused)["code"] == "delete_pending", refused
    finally:
        emulator.faults(throttleRate=0.0, retryAfterSeconds=1)
    report = await _run_at(LATER + cleanup_module.MAX_BACKOFF)
    assert report["deleted"] == 1 and report["retention_cancelled"] == 1, report
    assert emulator.verify(stale["token"])["reason"] == "identity deleted"
    assert await _mapping(service, "admin-during-retire") is None


async def test_a_throttled_commit_keeps_the_identity_on_file(service, emulator):
    """Its retention row stays through a refused delete: the identity a user takes back is
    judged again one day, never forgotten by retention."""
    from tests.service_helpers import retention_rows

    await drain_cleanup()
    await _stale_user(service, "kept-on-file")
    key = user_key(service.stack["issuer"], "kept-on-file")
    await services().cleanup.run(ignore_backoff=True)
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    try:
        assert (await _run_at(LATER))["retry_retire"] == 1
    finally:
        emulator.faults(throttleRate=0.0, retryAfterSeconds=1)
    assert len(await retention_rows(services().store.table.client, key)) == 1
    assert (await _post(service, "token/refresh", "kept-on-file")).status_code == 200
    await _run_at(LATER + cleanup_module.MAX_BACKOFF)
    assert len(await retention_rows(services().store.table.client, key)) == 1


async def test_a_users_own_delete_overrides_a_retention_claim(service, emulator):
    """Deletes a user, an admin or an event asked for keep their strength: a claim gives way."""
    await drain_cleanup()
    stale = await _stale_user(service, "claimed-then-deleted")
    await services().cleanup.run(ignore_backoff=True)
    response = await function_app.delete_identity(
        request("DELETE", "identity", token=service.token("claimed-then-deleted"))
    )
    assert response.status_code == 200 and body_of(response)["status"] == "deleted", response
    assert emulator.verify(stale["token"])["reason"] == "identity deleted"
    report = await _run_at(LATER)
    assert report["retention_cancelled"] == 1 and report.get("retention_deleted", 0) == 0, report


async def test_a_revoke_of_a_claimed_identity_reaches_acs(service, emulator):
    """A claim is not a pending revocation: revoking still revokes."""
    emulator.faults(revocationDelaySeconds=0)
    stale = await _stale_user(service, "claimed-then-revoked")
    await services().cleanup.run(ignore_backoff=True)
    response = await function_app.revoke_tokens(
        request("POST", "token/revoke", token=service.token("claimed-then-revoked"))
    )
    assert response.status_code == 200 and body_of(response)["status"] == "revoked", response
    assert emulator.verify(stale["token"])["valid"] is False


async def test_a_claim_whose_queued_work_was_lost_is_queued_again(service, emulator):
    """A crash between the claim's mark and its queue row: the next pass queues it again."""
    await drain_cleanup()
    stale = await _stale_user(service, "claim-lost")
    store = services().store
    key = user_key(service.stack["issuer"], "claim-lost")
    await services().cleanup.run(ignore_backoff=True)
    [work] = [w async for w in store.pending.pending_work() if w.user_key == key]
    await store.pending.finish(work)  # as if the queue row never landed
    report = await services().cleanup.run(ignore_backoff=True)
    assert report["retention_requeued"] == 1, report
    assert (await retention_runs())["retention_deleted"] >= 1
    assert emulator.verify(stale["token"])["reason"] == "identity deleted"
    assert await store.identities.get(key) is None


# ---- 3: a mapping insert that commits late -------------------------------------------------------------


async def test_a_mapping_insert_committing_after_the_service_looked_leaves_a_working_identity(
    faulty_service, table_faults, emulator
):
    """The review's sequence: the insert answers 500 OperationTimedOut and lands after the service
    looked. Before: the identity deleted, the mapping naming it, 404 identity_gone forever."""
    await drain_cleanup()
    fault = table_faults.arm("late", "insert mapping", retries="fail")
    first = await _post(faulty_service, "token", "late-insert")
    assert first.status_code == 503, first
    assert await fault.commit() == 201  # the mapping lands now, after the service looked
    store = services().store
    key = user_key(faulty_service.stack["issuer"], "late-insert")
    mapped = await store.identities.get(key)
    assert await store.lookups.owner_of(mapped.communication_user_id) == key  # admins can find it

    again = await _post(faulty_service, "token", "late-insert")
    assert again.status_code == 200, again
    assert body_of(again)["communicationUserId"] == mapped.communication_user_id
    assert emulator.verify(body_of(again)["token"])["valid"]
    report = await _run_at(cleanup_module.LATE_WRITE_GRACE + dt.timedelta(minutes=1))
    assert report["settled_mapped"] == 1 and report.get("settled_discarded", 0) == 0, report
    assert emulator.verify(body_of(again)["token"])["valid"]


async def test_a_late_insert_that_loses_to_the_users_retry_is_settled_by_the_timer(
    faulty_service, table_faults, emulator
):
    await drain_cleanup()
    fault = table_faults.arm("late", "insert mapping", retries="fail")
    live = emulator.stats()["liveIdentities"]
    assert (await _post(faulty_service, "token", "late-loser")).status_code == 503
    retry = await _post(faulty_service, "token", "late-loser")  # before the late write lands
    assert retry.status_code == 200 and body_of(retry)["identityCreated"] is True, retry
    assert await fault.commit() == 409  # too late: the retry's mapping stands
    assert emulator.stats()["liveIdentities"] == live + 2

    report = await _run_at(cleanup_module.LATE_WRITE_GRACE + dt.timedelta(minutes=1))
    assert report["settled_discarded"] == 1, report
    assert emulator.stats()["liveIdentities"] == live + 1
    assert emulator.verify(body_of(retry)["token"])["valid"]


async def test_a_user_without_entra_ids_whose_identity_acs_lost_gets_a_fresh_one(service, emulator):
    """No Graph event can ever name such a user: the mapping heals on their next POST /api/token."""
    from azure.communication.identity import CommunicationIdentityClient, CommunicationUserIdentifier

    bearer = service.token("plain-oidc", entra_ids=False)
    first = body_of(await _post(service, "token", "plain-oidc", bearer=bearer))
    acs = CommunicationIdentityClient.from_connection_string(service.stack["acs_connection_string"])
    acs.delete_user(CommunicationUserIdentifier(first["communicationUserId"]))
    healed = await _post(service, "token", "plain-oidc", bearer=bearer)
    assert healed.status_code == 200 and body_of(healed)["identityCreated"] is True, healed
    assert emulator.verify(body_of(healed)["token"])["valid"]


# ---- 4: an event during a first issue --------------------------------------------------------------------


def _user_deleted(claims: dict) -> bytes:
    import uuid

    event = {
        "specversion": "1.0",
        "id": str(uuid.uuid4()),
        "source": f"/tenants/{claims['tid']}/applications/00000000-0000-0000-0000-000000000000",
        "type": "Microsoft.Graph.UserDeleted",
        "subject": f"Users/{claims['oid']}",
        "data": {
            "changeType": "deleted",
            "resource": f"Users/{claims['oid']}",
            "resourceData": {"id": claims["oid"], "organizationId": claims["tid"]},
        },
    }
    return json.dumps([event]).encode()


async def _deliver(body: bytes):
    headers = {"Content-Type": "application/cloudevents-batch+json"}
    return await function_app.events(request("POST", "events", raw=body, headers=headers))


async def test_a_user_deleted_event_during_the_first_issue_undoes_the_new_identity(
    service, emulator, monkeypatch
):
    """Before: the event answered "unknown user" and the first issue completed, its identity alive."""
    import time

    import jwt

    bearer = service.token("deleted-mid-create", now=time.time() - 60)
    claims = jwt.decode(bearer, options={"verify_signature": False})
    live = emulator.stats()["liveIdentities"]
    before_insert = Pause(monkeypatch, services().store.table, "insert")  # the mapping insert
    first = asyncio.create_task(_post(service, "token", "deleted-mid-create", bearer=bearer))
    await before_insert.wait()  # created in ACS, on file, the mapping not yet inserted
    delivered = await _deliver(_user_deleted(claims))
    assert delivered.status_code == 200 and body_of(delivered)["results"] == {"unknown_user": 1, "ignored": 0}
    before_insert.release()
    response = await first

    assert response.status_code == 401 and body_of(response)["code"] == "session_ended", response
    assert emulator.stats()["liveIdentities"] == live  # the identity it created is deleted
    assert await _mapping(service, "deleted-mid-create") is None
    again = await _post(service, "token", "deleted-mid-create", bearer=bearer)
    assert again.status_code == 401 and body_of(again)["code"] == "session_ended", again


async def test_an_event_during_a_first_issue_whose_second_look_failed_is_caught_next_time(
    service, emulator, monkeypatch
):
    """The first issue's look after the insert fails (a Table blip, or a crash): the mapping stays
    marked unchecked, so the next request with the old bearer looks, and is refused."""
    import time

    import jwt
    from azure.core.exceptions import ServiceResponseError

    bearer = service.token("recheck-failed", now=time.time() - 60)
    claims = jwt.decode(bearer, options={"verify_signature": False})
    live = emulator.stats()["liveIdentities"]
    store = services().store
    before_insert = Pause(monkeypatch, store.table, "insert")  # the mapping insert
    first = asyncio.create_task(_post(service, "token", "recheck-failed", bearer=bearer))
    await before_insert.wait()
    assert (await _deliver(_user_deleted(claims))).status_code == 200
    real_query = store.lookups.sessions_ended

    async def blip(*_args, **_kwargs):
        raise ServiceResponseError(message="storage went away")

    monkeypatch.setattr(store.lookups, "sessions_ended", blip)
    before_insert.release()
    failed = await first
    assert failed.status_code == 503, failed
    assert (await _mapping(service, "recheck-failed")).sessions_checked is False
    monkeypatch.setattr(store.lookups, "sessions_ended", real_query)

    refused = await _post(service, "token/refresh", "recheck-failed", bearer=bearer)
    assert refused.status_code == 401 and body_of(refused)["code"] == "session_ended", refused
    assert emulator.stats()["liveIdentities"] == live
    assert await _mapping(service, "recheck-failed") is None


async def test_a_first_issue_marks_its_mapping_checked(service):
    assert (await _post(service, "token", "checked-once")).status_code == 200
    assert (await _mapping(service, "checked-once")).sessions_checked is True


async def test_an_event_ends_sessions_before_it_looks_for_identities(service, emulator, monkeypatch):
    """The other half of the handshake: a first issue whose recheck ran before the event's rows
    landed had inserted its mapping before, so the event, which looks only after writing them,
    finds it. Held at its lookup, the event has already ended the user's sessions."""
    import time

    import jwt

    bearer = service.token("ended-before-lookup", now=time.time() - 60)
    claims = jwt.decode(bearer, options={"verify_signature": False})
    store = services().store
    lookup = Pause(monkeypatch, store.lookups, "graph_users")
    delivery = asyncio.create_task(_deliver(_user_deleted(claims)))
    await lookup.wait()
    key = user_key(service.stack["issuer"], "ended-before-lookup")
    assert await store.lookups.sessions_ended(key, claims["tid"], claims["oid"]) is not None
    lookup.release()
    assert (await delivery).status_code == 200
    refused = await _post(service, "token", "ended-before-lookup", bearer=bearer)
    assert refused.status_code == 401 and body_of(refused)["code"] == "session_ended", refused


# ---- what retention would delete next ----------------------------------------------------------------------


async def _preview(service, *, user: str = "retention-admin", roles=("TokenService.Admin",), limit=None):
    params = {} if limit is None else {"limit": limit}
    return await function_app.manage_retention(
        request("GET", "manage/retention", token=service.token(user, roles=roles), params=params)
    )


async def test_the_dry_run_lists_what_retention_would_delete_and_changes_nothing(service, emulator):
    await drain_cleanup()
    stale = await _stale_user(service, "preview-stale")
    claimed = await _stale_user(service, "preview-claimed")
    store = services().store
    await services().cleanup.run(ignore_backoff=True)  # claims both
    fresh_claim = await store.identities.get(user_key(service.stack["issuer"], "preview-stale"))
    await store.retention.keep_in_use(fresh_claim, _stale_day())  # unclaimed again, still stale
    response = await _preview(service)
    assert response.status_code == 200, response
    preview = body_of(response)
    states = {item["communicationUserId"]: item for item in preview["identities"]}
    assert states[stale["communicationUserId"]]["state"] == "stale"
    assert states[claimed["communicationUserId"]]["state"] == "claimed"
    assert states[claimed["communicationUserId"]]["lastUsedOn"] == _stale_day().date().isoformat()
    assert preview["retentionDays"] == services().settings.retention_days
    assert preview["graceMinutes"] == cleanup_module.RETIRE_GRACE.total_seconds() // 60

    assert (await store.identities.get(user_key(service.stack["issuer"], "preview-stale"))).pending == ""
    assert emulator.verify(stale["token"])["valid"] and emulator.verify(claimed["token"])["valid"]
    one = body_of(await _preview(service, limit="1"))
    assert len(one["identities"]) == 1 and one["truncated"] is True


@pytest.mark.parametrize("limit", ["0", "1001", "ten", "-1", "", "\u00b2", "\u0661\u0660", "1e3", " 5"])
async def test_the_dry_run_refuses_a_bad_limit(service, limit):
    response = await _preview(service, limit=limit)
    assert response.status_code == 400 and body_of(response)["code"] == "invalid_limit", response


async def test_the_dry_run_needs_the_admin_role(service):
    response = await _preview(service, user="not-an-admin", roles=())
    assert response.status_code == 403 and body_of(response)["code"] == "forbidden", response


def test_devstack_timer_cleanup_dry_run_prints_what_it_would_delete(stack):
    said = stack.timer("cleanup", "--dry-run")
    assert said.startswith("retention dry run: identities unused since before "), said
    report = json.loads(stack.timer("cleanup", "--dry-run", "--json"))
    assert set(report) == {"retentionDays", "cutoff", "graceMinutes", "identities", "truncated"}
