"""A token storm gets answers, not errors (issue 18): fresh tokens answered again, identical requests
in flight sharing one ACS call, first issues of one user creating one identity. Each mechanism's
behaviour, counted in ACS calls the emulator saw; its speed is `make bench`'s (bench/storm.py)."""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

import function_app
from shared.compose import compose, install, services
from shared.errors import SettingError
from shared.settings import get_settings, load
from shared.storm import FRESH_SHARE
from tests.service_fixtures import configure
from tests.service_helpers import body_of, request


def _calls(emulator, operation: str) -> int:
    return emulator.stats()["calls"].get(operation, 0)


async def _post(service, route: str, user: str):
    handler = {
        "token": function_app.issue_token,
        "token/refresh": function_app.refresh_token,
        "token/revoke": function_app.revoke_tokens,
    }[route]
    return await handler(request("POST", route, token=service.token(user)))


async def _token(service, route: str, user: str) -> dict:
    response = await _post(service, route, user)
    assert response.status_code == 200, response.get_body()
    return body_of(response)


async def test_a_fresh_token_is_answered_again_with_its_real_expiry(service, emulator):
    first = await _token(service, "token", "storm-fresh")
    issues = _calls(emulator, "issueAccessToken")
    again = [await _token(service, "token/refresh", "storm-fresh") for _ in range(3)]
    assert _calls(emulator, "issueAccessToken") == issues  # no ACS call at all
    assert {a["token"] for a in again} == {first["token"]}
    assert {a["expiresOn"] for a in again} == {first["expiresOn"]}
    assert emulator.verify(first["token"])["valid"]


async def test_a_token_past_its_fresh_share_is_not_answered_again(service, emulator):
    first = await _token(service, "token", "storm-stale")
    tokens = services().tokens
    lifetime = dt.datetime.fromisoformat(first["expiresOn"]) - dt.datetime.now(dt.UTC)
    real = tokens.clock
    tokens.clock = lambda: real() + lifetime * (1 - FRESH_SHARE) + dt.timedelta(seconds=5)
    try:
        issues = _calls(emulator, "issueAccessToken")
        later = await _token(service, "token/refresh", "storm-stale")
    finally:
        tokens.clock = real
    assert _calls(emulator, "issueAccessToken") == issues + 1
    assert later["token"] != first["token"]


async def test_reuse_never_crosses_a_revocation(service, emulator):
    first = await _token(service, "token", "storm-revoked")
    assert (await _post(service, "token/revoke", "storm-revoked")).status_code == 200
    after = await _token(service, "token/refresh", "storm-revoked")
    assert after["token"] != first["token"]
    assert emulator.verify(first["token"])["reason"] == "revoked"
    assert emulator.verify(after["token"])["valid"]


async def test_reuse_never_crosses_a_revocation_made_by_another_worker(service, emulator):
    """Worker A holds a fresh token; worker B revokes (the request landed there). A reads the
    mapping on every refresh: the revocation's mark there stops it answering the old token."""
    first = await _token(service, "token", "storm-elsewhere")
    worker_a = services()
    worker_b = compose(get_settings())
    try:
        install(worker_b)
        assert (await _post(service, "token/revoke", "storm-elsewhere")).status_code == 200
    finally:
        install(worker_a)
        await worker_b.close()
    after = await _token(service, "token/refresh", "storm-elsewhere")
    assert after["token"] != first["token"] and emulator.verify(after["token"])["valid"]


async def test_identical_requests_in_flight_share_one_acs_call(service, emulator):
    await _token(service, "token", "storm-flight")
    services().tokens.issuer.fresh.forget_all()  # nothing fresh: every request must ask
    emulator.faults(latencyMs=300)  # they overlap
    try:
        issues = _calls(emulator, "issueAccessToken")
        answers = await asyncio.gather(*(_token(service, "token/refresh", "storm-flight") for _ in range(8)))
    finally:
        emulator.faults(latencyMs=0)
    assert _calls(emulator, "issueAccessToken") == issues + 1
    assert len({a["token"] for a in answers}) == 1


async def test_requests_for_other_scopes_or_lifetimes_do_not_share(service, emulator):
    await _token(service, "token", "storm-shapes")
    issues = _calls(emulator, "issueAccessToken")
    bodies = [
        b'{"scopes": ["chat"]}',
        b'{"scopes": ["voip"]}',
        b'{"scopes": ["chat"], "expiresInMinutes": 120}',
    ]
    for raw in bodies:
        response = await function_app.refresh_token(
            request("POST", "token/refresh", token=service.token("storm-shapes"), raw=raw)
        )
        assert response.status_code == 200, response.get_body()
    assert _calls(emulator, "issueAccessToken") == issues + len(bodies)


async def test_concurrent_first_requests_of_one_user_create_one_identity(service, emulator):
    """Before, each created an identity and the losers deleted theirs: creates and deletes spent."""
    emulator.faults(latencyMs=200)
    try:
        created, deleted = _calls(emulator, "createIdentity"), _calls(emulator, "deleteIdentity")
        answers = await asyncio.gather(*(_token(service, "token", "storm-first") for _ in range(6)))
    finally:
        emulator.faults(latencyMs=0)
    assert _calls(emulator, "createIdentity") == created + 1
    assert _calls(emulator, "deleteIdentity") == deleted
    assert len({a["communicationUserId"] for a in answers}) == 1
    assert [a["identityCreated"] for a in answers].count(True) == 1


async def test_storm_protection_off_makes_every_request_its_own_call(stack, emulator, monkeypatch):
    await configure(monkeypatch, stack, managed_identity=False, STORM_PROTECTION="off")
    from tests.service_helpers import Users

    users = Users(stack)
    await _token(users, "token", "storm-off")
    issues = _calls(emulator, "issueAccessToken")
    for _ in range(3):
        await _token(users, "token/refresh", "storm-off")
    assert _calls(emulator, "issueAccessToken") == issues + 3


@pytest.mark.parametrize("value", ["maybe", "true", ""])
def test_storm_protection_takes_on_or_off(value):
    env = {
        "AUTH_ISSUER": "https://idp.example",
        "AUTH_AUDIENCE": "api",
        "ACS_ENDPOINT": "https://a.example",
        "TABLES_ENDPOINT": "https://t.example",
        "STORM_PROTECTION": value,
    }
    if value == "":
        assert load(env).storm_protection is True  # unset: on
        return
    with pytest.raises(SettingError) as refused:
        load(env)
    assert refused.value.setting == "STORM_PROTECTION"


async def test_a_failed_call_fails_everyone_waiting_on_it_and_the_next_call_is_made_afresh():
    from shared.storm import SingleFlight

    flights: SingleFlight[str, int] = SingleFlight()
    started, release = asyncio.Event(), asyncio.Event()
    calls = 0

    async def failing() -> int:
        nonlocal calls
        calls += 1
        started.set()
        await release.wait()
        raise RuntimeError("ACS said no")

    leader = asyncio.create_task(flights.run("k", failing))
    await started.wait()
    follower = asyncio.create_task(flights.run("k", failing))
    release.set()
    for task in (leader, follower):
        with pytest.raises(RuntimeError):
            await task
    assert calls == 1 and not flights.in_flight("k")

    async def working() -> int:
        return 7

    assert await flights.run("k", working) == 7


def test_a_token_is_fresh_for_its_first_tenth():
    from shared.acs import IssuedToken
    from shared.storm import FreshTokens

    at = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
    token = IssuedToken("t", at + dt.timedelta(minutes=60))
    fresh = FreshTokens()
    fresh.put("k", token, at)
    assert fresh.get("k", at + dt.timedelta(minutes=6)) is token
    assert fresh.get("k", at + dt.timedelta(minutes=6, seconds=1)) is None


def test_a_token_is_still_good_while_ACS_refuses_for_its_first_half_then_forgotten():
    """While ACS refuses issues, a token with half its life left is answered again (storm.Issuer)."""
    from shared.acs import IssuedToken
    from shared.storm import STILL_GOOD_SHARE, FreshTokens

    at = dt.datetime(2026, 12, 2, 12, 0, tzinfo=dt.UTC)
    token = IssuedToken("t", at + dt.timedelta(minutes=60))
    fresh = FreshTokens()
    fresh.put("k", token, at)
    assert fresh.get("k", at + dt.timedelta(minutes=30), share=STILL_GOOD_SHARE) is token
    assert fresh.get("k", at + dt.timedelta(minutes=30)) is None  # not fresh: no reuse otherwise
    assert fresh.get("k", at + dt.timedelta(minutes=30, seconds=1), share=STILL_GOOD_SHARE) is None
    assert fresh.get("k", at + dt.timedelta(minutes=1)) is None  # and forgotten
