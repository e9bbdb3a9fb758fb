"""Attacks on the token storm's promises that it withstands: revocations finished by the timer or
another worker, a deletion, an IdP event, a leader that goes away, first issues with other scopes."""

from __future__ import annotations

import asyncio
import time

import jwt

import function_app
from shared.compose import compose, install, services
from shared.settings import get_settings
from tests.service_helpers import body_of, post_as, request
from tests.test_events_webhook import _batch, _deliver, _graph_event
from tests.test_retention import Pause
from tests.test_storm_attacks import _token


async def _cleanup() -> dict:
    return await services().cleanup.run(ignore_backoff=True)


async def test_pending_revoke_completed_by_the_timer_then_reuse(service, emulator):
    user = "r18p-pending"
    first = await _token(service, "token", user)
    emulator.faults(down=True)
    try:
        pending = await post_as(service, "token/revoke", user)
    finally:
        emulator.faults(down=False)
    assert pending.status_code == 202
    blocked = await post_as(service, "token/refresh", user)
    assert blocked.status_code == 409
    assert (await _cleanup()).get("revoked") == 1
    after = await _token(service, "token/refresh", user)
    assert after["token"] != first["token"] and emulator.verify(after["token"])["valid"]


async def test_pending_revoke_completed_by_another_workers_timer_then_reuse(service, emulator):
    user = "r18p-pending-b"
    first = await _token(service, "token", user)
    emulator.faults(down=True)
    try:
        assert (await post_as(service, "token/revoke", user)).status_code == 202
    finally:
        emulator.faults(down=False)
    worker_a = services()
    worker_b = compose(get_settings())
    try:
        install(worker_b)
        assert (await worker_b.cleanup.run(ignore_backoff=True)).get("revoked") == 1
    finally:
        install(worker_a)
        await worker_b.close()
    after = await _token(service, "token/refresh", user)
    assert after["token"] != first["token"] and emulator.verify(after["token"])["valid"]


async def test_identity_deleted_and_recreated(service, emulator):
    user = "r18p-recreate"
    first = await _token(service, "token", user)
    deleted = await function_app.delete_identity(request("DELETE", "identity", token=service.token(user)))
    assert deleted.status_code == 200
    gone = await post_as(service, "token/refresh", user)
    assert gone.status_code == 404
    again = await _token(service, "token", user)
    assert again["communicationUserId"] != first["communicationUserId"]
    assert again["token"] != first["token"] and emulator.verify(again["token"])["valid"]


async def test_credentials_changed_event_between_cache_fill_and_reuse(service, emulator, stack):
    user = "r18p-event"
    old_bearer = service.token(user, now=time.time() - 60)
    first = body_of(await function_app.issue_token(request("POST", "token", token=old_bearer)))
    claims = jwt.decode(old_bearer, options={"verify_signature": False})
    delivered = await _deliver(_batch([_graph_event("UserUpdated", claims)]))
    assert delivered.status_code == 200, delivered.get_body()
    assert body_of(delivered)["results"].get("revoked") == 1, delivered.get_body()
    old = await function_app.refresh_token(request("POST", "token/refresh", token=old_bearer))
    assert old.status_code == 401 and body_of(old)["code"] == "session_ended"
    new = await _token(service, "token/refresh", user)  # a bearer after the event
    assert new["token"] != first["token"] and emulator.verify(new["token"])["valid"]


async def test_leader_cancelled_followers_still_answered(service, emulator, acs_calls, monkeypatch):
    user = "r18p-cancel"
    await _token(service, "token", user)
    services().tokens.issuer.fresh.forget_all()
    held = Pause(monkeypatch, acs_calls, "get_token")
    leader = asyncio.create_task(post_as(service, "token/refresh", user))
    await held.wait()
    follower = asyncio.create_task(post_as(service, "token/refresh", user))
    await asyncio.sleep(0.5)
    leader.cancel()
    held.release()
    answered = await follower
    assert answered.status_code == 200 and emulator.verify(body_of(answered)["token"])["valid"]
    assert leader.cancelled()


async def test_leader_of_a_first_issue_cancelled_followers_still_answered(
    service, emulator, acs_calls, monkeypatch
):
    user = "r18p-cancel-first"
    held = Pause(monkeypatch, acs_calls, "create_user_and_token")
    leader = asyncio.create_task(post_as(service, "token", user))
    await held.wait()
    followers = [asyncio.create_task(post_as(service, "token", user)) for _ in range(3)]
    await asyncio.sleep(0.5)
    leader.cancel()
    held.release()
    answers = await asyncio.gather(*followers)
    assert {a.status_code for a in answers} == {200}
    assert len({body_of(a)["communicationUserId"] for a in answers}) == 1
    assert all(emulator.verify(body_of(a)["token"])["valid"] for a in answers)


async def test_first_issue_coalescing_keeps_each_callers_shape(service, emulator):
    user = "r18p-shapes"
    bodies = [None, {"scopes": ["voip"]}, {"scopes": ["chat"], "expiresInMinutes": 120}, None]
    emulator.faults(latencyMs=300)
    try:
        answers = await asyncio.gather(*(_token(service, "token", user, b) for b in bodies))
    finally:
        emulator.faults(latencyMs=0)
    assert len({a["communicationUserId"] for a in answers}) == 1
    assert answers[1]["scopes"] == ["voip"] and answers[0]["scopes"] != ["voip"]
    exp = [jwt.decode(a["token"], options={"verify_signature": False})["exp"] for a in answers]
    assert exp[2] - exp[0] > 50 * 60
    assert answers[1]["token"] != answers[0]["token"] != answers[2]["token"]


async def test_first_issue_coalescing_does_not_cross_users(service, emulator):
    emulator.faults(latencyMs=300)
    try:
        answers = await asyncio.gather(*(_token(service, "token", f"r18p-x{i % 2}") for i in range(6)))
    finally:
        emulator.faults(latencyMs=0)
    by_user: dict[int, set] = {0: set(), 1: set()}
    for i, a in enumerate(answers):
        by_user[i % 2].add(a["communicationUserId"])
    assert len(by_user[0]) == len(by_user[1]) == 1 and by_user[0] != by_user[1]


async def test_first_issue_follower_with_an_ended_bearer_gets_401(
    service, emulator, stack, acs_calls, monkeypatch
):
    """Leader with a newer bearer, follower with one older than an event that arrives while the
    creation is under way: the follower must get session_ended, never the leader's token."""
    user = "r18p-ended-follower"
    old_bearer = service.token(user, now=time.time() - 60)
    held = Pause(monkeypatch, acs_calls, "create_user_and_token")
    follower_first = asyncio.create_task(function_app.issue_token(request("POST", "token", token=old_bearer)))
    await held.wait()  # the old bearer leads here; make a newer one follow
    claims = jwt.decode(old_bearer, options={"verify_signature": False})
    delivered = await _deliver(_batch([_graph_event("UserUpdated", claims)]))
    assert delivered.status_code == 200, delivered.get_body()
    assert body_of(delivered)["results"].get("ignored", 0) == 0, delivered.get_body()
    newer = asyncio.create_task(post_as(service, "token", user))
    await asyncio.sleep(0.3)
    held.release()
    old_answer, new_answer = await follower_first, await newer
    assert old_answer.status_code == 401, old_answer.get_body()
    assert new_answer.status_code == 200, new_answer.get_body()
    assert emulator.verify(body_of(new_answer)["token"])["valid"]
