"""Attacks on the token storm's promises (shared/storm.py), found by a review of the first version
and replayed here: no token issued before a revocation is answered after it, on any worker, and
first issues that wait on another's creation neither pile on ACS nor wait twice."""

from __future__ import annotations

import asyncio

from azure.core.exceptions import ServiceRequestError

from shared.compose import services
from tests.service_helpers import body_of, post_as
from tests.test_retention import Pause


async def _token(service, route: str, user: str, body: dict | None = None) -> dict:
    response = await post_as(service, route, user, body)
    assert response.status_code == 200, response.get_body()
    return body_of(response)


def _calls(emulator, operation: str) -> int:
    return emulator.stats()["calls"].get(operation, 0)


async def test_a_refresh_begun_after_a_revoke_was_answered_never_joins_a_flight_begun_before_it(
    service, emulator, acs_calls, monkeypatch
):
    """A refresh that starts after `POST /api/token/revoke` answered 200 must not share the ACS call
    an earlier refresh began before the revoke (the first version let it join that call, and so
    handed it a token ACS issued before the revocation)."""
    user = "r18-join"
    await _token(service, "token", user)
    services().tokens.issuer.fresh.forget_all()  # the leader must ask ACS
    held = Pause(monkeypatch, acs_calls, "get_token", after=True)  # ACS issued it; answer held
    leader = asyncio.create_task(post_as(service, "token/refresh", user))
    await held.wait()

    revoked = await post_as(service, "token/revoke", user)
    assert revoked.status_code == 200 and body_of(revoked)["status"] == "revoked"

    follower = asyncio.create_task(post_as(service, "token/refresh", user))  # after the revoke's 200
    await asyncio.sleep(0.5)  # it has read the mapping and is asking for its token
    held.release()
    await leader
    answered = await follower
    assert answered.status_code == 200, answered.get_body()
    token = body_of(answered)["token"]
    assert emulator.verify(token)["valid"], (
        "a refresh begun after the revoke was answered got a pre-revoke token",
        emulator.verify(token),
    )


async def test_a_late_older_revocation_mark_does_not_undo_a_newer_one(service, emulator, monkeypatch):
    """Two revocations of one user (user and admin, two devices, an event and the user): the first's
    mark lands late (Table retries), after the second's. Marks only move forward: the older one
    does not replace the newer, which would make a token the second revocation revoked (issued
    between the two) current again."""
    user = "r18-late-mark"
    await _token(service, "token", user)
    services().tokens.issuer.fresh.forget_all()
    late = Pause(monkeypatch, services().store.identities, "note_revoked")  # first mark held
    first_revoke = asyncio.create_task(post_as(service, "token/revoke", user))
    await late.wait()  # the mark (its time already taken) is on its way; ACS not asked yet

    between = await _token(service, "token/refresh", user)  # asks ACS: valid, remembered fresh
    assert emulator.verify(between["token"])["valid"]

    second = await post_as(service, "token/revoke", user)  # revokes `between`; marks a newer time
    assert second.status_code == 200 and body_of(second)["status"] == "revoked"
    assert emulator.verify(between["token"])["reason"] == "revoked"
    late.release()
    assert (await first_revoke).status_code == 200

    after = await _token(service, "token/refresh", user)
    assert after["token"] != between["token"], "the token revoked by the second revoke was answered again"
    assert emulator.verify(after["token"])["valid"]


async def test_a_revoke_whose_mark_cannot_be_written_does_not_reach_acs(service, emulator, table_calls):
    """The mark is written before ACS is asked: when it cannot be (Storage hiccup), the revoke
    answers 503 and ACS revokes nothing, so no worker can answer a revoked token unmarked (the
    first version revoked, then failed to mark, and kept answering the revoked token)."""
    user = "r18-mark-failed"
    first = await _token(service, "token", user)
    revokes = _calls(emulator, "revokeAccessTokens")
    real_update = table_calls.real.update_entity

    async def update_entity(entity, *args, **kwargs):
        if "tokensRevokedAt" in entity:
            raise ServiceRequestError("connection reset")
        return await real_update(entity, *args, **kwargs)

    with table_calls.replacing(update_entity=update_entity):
        revoke = await post_as(service, "token/revoke", user)
    assert revoke.status_code == 503 and body_of(revoke)["code"] == "dependency_unavailable"
    assert _calls(emulator, "revokeAccessTokens") == revokes and emulator.verify(first["token"])["valid"]

    assert (await post_as(service, "token/revoke", user)).status_code == 200  # the client's retry
    assert emulator.verify(first["token"])["reason"] == "revoked"
    after = await _token(service, "token/refresh", user)
    assert after["token"] != first["token"] and emulator.verify(after["token"])["valid"]


async def test_followers_of_a_failed_first_issue_share_its_answer_and_create_nothing(
    service, emulator, acs_calls
):
    """Concurrent first requests of one user on one worker create one identity. When the leader's
    creation fails because ACS could not be reached, that is every waiter's answer too (503 with
    Retry-After): none starts a creation of its own (the first version made N-2 extra identities,
    deleted again, in the storm this is meant to soften)."""
    user = "r18-first-fails"
    real_create = acs_calls.real.create_user_and_token
    failed = False

    async def create_user_and_token(*args, **kwargs):
        nonlocal failed
        if not failed:
            failed = True
            await asyncio.sleep(0.3)  # the followers arrive and wait on it
            raise ServiceRequestError("connection reset")
        return await real_create(*args, **kwargs)

    acs_calls.replace(create_user_and_token=create_user_and_token)
    emulator.faults(latencyMs=300)
    try:
        created, deleted = _calls(emulator, "createIdentity"), _calls(emulator, "deleteIdentity")
        answers = await asyncio.gather(*(post_as(service, "token", user) for _ in range(6)))
    finally:
        emulator.faults(latencyMs=0)
    assert {a.status_code for a in answers} == {503}
    assert {body_of(a)["code"] for a in answers} == {"acs_unavailable"}
    assert _calls(emulator, "deleteIdentity") == deleted, "identities created only to be deleted again"
    assert _calls(emulator, "createIdentity") == created  # the one attempt never reached ACS
    assert (await post_as(service, "token", user)).status_code == 200  # ACS back: the retry works


async def test_followers_of_a_throttled_first_issue_are_not_made_to_wait_twice(
    service, emulator, monkeypatch
):
    """README: a throttled request backs off at most RETRY_BACKOFF_SECONDS in all, then 429
    `acs_throttled`. A first issue that waited on another's throttled creation gets that answer,
    instead of a whole backoff of its own (twice the documented bound, in the first version)."""
    import time

    import shared.acs

    monkeypatch.setattr(shared.acs, "RETRY_BACKOFF_SECONDS", (0.2, 0.2))
    monkeypatch.setattr(shared.acs.random, "uniform", lambda low, high: high)  # no jitter: 0.4 s in all
    await services().close()
    from shared.compose import reset_services

    await reset_services()  # a gateway built with the patched backoff
    await _token(service, "token", "r18-warm-up")  # keys fetched, tables opened: only ACS is timed
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    try:
        before = _calls(emulator, "createIdentity")
        started = time.monotonic()

        async def timed():
            response = await post_as(service, "token", "r18-throttled-first")
            return response, time.monotonic() - started

        answers = await asyncio.gather(*(timed() for _ in range(4)))  # within CREATIONS_IN_FLIGHT
    finally:
        emulator.faults(throttleRate=0.0)
    assert {r.status_code for r, _ in answers} == {429}
    assert {body_of(r)["code"] for r, _ in answers} == {"acs_throttled"}
    slowest = max(elapsed for _, elapsed in answers)
    assert slowest < 0.4 + 0.3, f"a follower answered after {slowest:.2f} s: it backed off twice"
    assert _calls(emulator, "createIdentity") - before == 3, "one creation's calls (1 + 2 backoff attempts)"
