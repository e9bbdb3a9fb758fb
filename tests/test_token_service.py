"""The token routes, called as the Functions worker calls them, against Azurite and the emulator."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest

import function_app
from devstack.signing import SigningKey
from shared.compose import reset_services, services
from shared.settings import reset_settings
from tests.service_fixtures import configure as _configure
from tests.service_helpers import Users, body_of, request, retention_rows


def _acs_claims(token: str) -> dict:
    return json.loads(base64.b64decode(token.split(".")[1] + "=="))


async def _post_token(users: Users, user: str, body: object = None, route: str = "token"):
    handler = function_app.issue_token if route == "token" else function_app.refresh_token
    return await handler(request("POST", route, token=users.token(user), body=body))


async def test_seed_flow_from_a_clients_point_of_view(service, emulator):
    first = await _post_token(service, "alice")
    assert first.status_code == 200 and first.mimetype == "application/json"
    first_body = body_of(first)
    assert first_body["identityCreated"] is True
    assert first_body["communicationUserId"].startswith("8:acs:")
    assert first_body["scopes"] == ["chat", "voip"]
    assert first_body["expiresOn"].endswith("Z")

    second = body_of(await _post_token(service, "alice"))
    assert second["identityCreated"] is False
    assert second["communicationUserId"] == first_body["communicationUserId"]

    # The seed's refresh: a new token from ACS (another lifetime than the fresh one, which
    # POST /api/token/refresh would answer again: README, "Token storms").
    refreshed = await _post_token(service, "alice", {"expiresInMinutes": 61}, route="token/refresh")
    assert refreshed.status_code == 200
    refreshed_body = body_of(refreshed)
    assert refreshed_body["communicationUserId"] == first_body["communicationUserId"]
    assert refreshed_body["token"] != second["token"]
    assert emulator.verify(refreshed_body["token"])["valid"]
    assert _acs_claims(refreshed_body["token"])["skypeid"] == first_body["communicationUserId"].removeprefix(
        "8:"
    )

    bob = body_of(await _post_token(service, "bob"))
    assert bob["identityCreated"] is True and bob["communicationUserId"] != first_body["communicationUserId"]

    identity = await function_app.get_identity(request("GET", "identity", token=service.token("alice")))
    assert identity.status_code == 200
    assert body_of(identity)["communicationUserId"] == first_body["communicationUserId"]
    assert set(body_of(identity)) == {"communicationUserId", "createdAt", "lastIssuedAt"}


async def test_requested_scopes_and_lifetime_are_in_the_acs_token(service, emulator):
    response = await _post_token(
        service, "carol", {"scopes": ["voip.join", "chat.join"], "expiresInMinutes": 90}
    )
    body = body_of(response)
    claims = _acs_claims(body["token"])
    assert claims["acsScope"] == "voip.join,chat.join" and body["scopes"] == ["voip.join", "chat.join"]
    assert 90 * 60 - 30 <= claims["exp"] - time.time() <= 90 * 60


async def test_the_same_sub_from_another_issuer_is_another_user(service, emulator):
    from shared.auth import Caller
    from shared.policy import TokenRequest

    tokens = services().tokens
    ask = TokenRequest(("chat",), 60)
    a = await tokens.issue(Caller(issuer="https://idp-a.example", subject="same"), ask)
    b = await tokens.issue(Caller(issuer="https://idp-b.example", subject="same"), ask)
    assert a.communication_user_id != b.communication_user_id


async def test_oid_and_tid_are_recorded(service):
    await _post_token(service, "dave")
    from shared.store.keys import user_key

    record = await services().store.identities.get(user_key(service.stack["issuer"], "dave"))
    assert record.object_id and record.tenant_id == service.stack["tenant_id"]


async def test_twenty_concurrent_first_requests_make_one_identity(stack, service, emulator, monkeypatch):
    # As twenty workers' requests would: one worker's wait for each other (tests/test_storm.py).
    await _configure(monkeypatch, stack, managed_identity=False, STORM_PROTECTION="off")
    before = emulator.stats()["liveIdentities"]
    created_before = emulator.stats()["calls"].get("createIdentity", 0)
    responses = await asyncio.gather(*(_post_token(service, "erin") for _ in range(20)))
    # A race took place: several requests created an identity before one mapping won.
    assert emulator.stats()["calls"]["createIdentity"] - created_before >= 2
    assert {r.status_code for r in responses} == {200}
    bodies = [body_of(r) for r in responses]
    assert len({b["communicationUserId"] for b in bodies}) == 1
    assert sum(b["identityCreated"] for b in bodies) == 1
    assert emulator.stats()["liveIdentities"] == before + 1
    assert all(emulator.verify(b["token"])["valid"] for b in bodies)

    # The reverse lookup names the winner only: the losers removed their owner rows.
    from shared.store.keys import user_key

    key = user_key(service.stack["issuer"], "erin")
    store = services().store
    owners = [
        e
        async for e in store.table.client.query_entities(
            "PartitionKey eq 'index' and RowKey ge 'c-' and RowKey lt 'c.' and userKey eq @k",
            parameters={"k": key},
        )
    ]
    assert [o["communicationUserId"] for o in owners] == [bodies[0]["communicationUserId"]]
    assert await store.lookups.owner_of(bodies[0]["communicationUserId"]) == key
    # Losers removed their retention rows too; the Graph row they wrote is the winner's.
    retention = [e["communicationUserId"] for e in await retention_rows(store.table.client, key)]
    assert retention == [bodies[0]["communicationUserId"]]
    record = await store.identities.get(key)
    assert [r.user_key for r in await store.lookups.graph_users(record.tenant_id, record.object_id)] == [key]


async def test_managed_identity_path_issues_tokens_with_no_key_in_settings(keyless_service, emulator):
    import os

    assert not os.environ.get("ACS_CONNECTION_STRING") and not os.environ.get("TABLES_CONNECTION_STRING")
    response = await _post_token(keyless_service, "frank")
    assert response.status_code == 200, response.get_body()
    assert emulator.verify(body_of(response)["token"])["valid"]
    # Signed with a managed identity's token: the emulator has no key to check an HMAC against here.
    assert not services().settings.acs_connection_string and not services().settings.tables_connection_string


# ---- caller authentication ------------------------------------------------------------------------


def _alg_none(users: Users) -> str:
    enc = lambda d: base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()  # noqa: E731
    return f"{enc({'alg': 'none', 'typ': 'JWT', 'kid': users.key.kid})}.{enc(users.base_claims())}."


@pytest.mark.parametrize(
    "forge",
    [
        pytest.param(lambda u: None, id="missing"),
        pytest.param(lambda u: u.token("x", now=time.time() - 7200), id="expired"),
        pytest.param(lambda u: u.token("x", audience="api://someone-else"), id="wrong-audience"),
        pytest.param(lambda u: u.token("x", issuer="http://127.0.0.1:1"), id="wrong-issuer"),
        pytest.param(
            lambda u: u.claims_token(u.base_claims(), key=SigningKey.generate()), id="bad-signature"
        ),
        pytest.param(_alg_none, id="alg-none"),
        pytest.param(
            lambda u: u.claims_token({**u.base_claims(), "nbf": int(time.time()) + 3600}), id="not-yet"
        ),
        pytest.param(
            lambda u: u.claims_token({k: v for k, v in u.base_claims().items() if k != "sub"}),
            id="no-subject",
        ),
        pytest.param(lambda u: "not-a-jwt", id="garbage"),
    ],
)
async def test_bad_bearer_tokens_get_401_with_a_challenge(service, emulator, forge):
    before = emulator.stats()["calls"]
    token = forge(service)
    response = await function_app.issue_token(request("POST", "token", token=token))
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    assert response.mimetype == "application/problem+json"
    assert body_of(response)["code"] == "unauthenticated"
    assert emulator.stats()["calls"] == before  # rejected before any ACS call


async def test_wrong_scheme_gets_401(service):
    response = await function_app.issue_token(
        request("POST", "token", headers={"Authorization": "Basic abc"})
    )
    assert response.status_code == 401 and 'error="invalid_request"' in response.headers["WWW-Authenticate"]


# ---- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"{not json", "invalid_json"),
        (b"[1]", "invalid_body"),
        (b'{"scopes": ["email"]}', "unknown_scope"),
        (b'{"scopes": []}', "invalid_scopes"),
        (b'{"scopes": "chat"}', "invalid_scopes"),
        (b'{"expiresInMinutes": 59}', "invalid_expiry"),
        (b'{"expiresInMinutes": 1441}', "invalid_expiry"),
        (b'{"expiresInMinutes": "x"}', "invalid_expiry"),
        (b'{"expiresInMinutes": 60.5}', "invalid_expiry"),
        (b'{"scope": ["chat"]}', "unknown_field"),
        (b"\xff\xfe", "invalid_json"),
    ],
)
async def test_bad_bodies_get_400_problem(service, emulator, raw, code):
    before = emulator.stats()["calls"]
    response = await function_app.issue_token(request("POST", "token", token=service.token("gina"), raw=raw))
    assert response.status_code == 400
    body = body_of(response)
    assert body["code"] == code and body["status"] == 400 and body["title"] and body["detail"]
    assert emulator.stats()["calls"] == before


async def test_scope_outside_the_allow_list(stack, emulator, monkeypatch):
    await _configure(
        monkeypatch, stack, managed_identity=False, TOKEN_ALLOWED_SCOPES="chat", TOKEN_DEFAULT_SCOPES="chat"
    )
    users = Users(stack)
    try:
        refused = await function_app.issue_token(
            request("POST", "token", token=users.token("hank"), body={"scopes": ["voip"]})
        )
        assert refused.status_code == 400 and body_of(refused)["code"] == "scope_not_allowed"
        allowed = await function_app.issue_token(request("POST", "token", token=users.token("hank")))
        assert body_of(allowed)["scopes"] == ["chat"]
    finally:
        await reset_services()
        reset_settings()


async def test_refresh_without_identity_is_404_and_creates_nothing(service, emulator):
    before = emulator.stats()
    response = await _post_token(service, "ivan", route="token/refresh")
    assert response.status_code == 404 and body_of(response)["code"] == "identity_not_found"
    identity = await function_app.get_identity(request("GET", "identity", token=service.token("ivan")))
    assert identity.status_code == 404
    assert emulator.stats() == before


async def test_refresh_after_a_deletion_says_who_deleted_it_and_when(service, emulator):
    """Issue #14: "You have no ACS identity yet" is wrong for a user whose identity was deleted."""
    import datetime as dt

    today = dt.datetime.now(dt.UTC).date().isoformat()
    created = body_of(await _post_token(service, "dora"))
    deleted = await function_app.delete_identity(request("DELETE", "identity", token=service.token("dora")))
    assert deleted.status_code == 200
    for route in ("token/refresh", "identity"):
        if route == "identity":
            response = await function_app.get_identity(request("GET", route, token=service.token("dora")))
        else:
            response = await _post_token(service, "dora", route=route)
        problem = body_of(response)
        assert response.status_code == 404 and problem["code"] == "identity_deleted", problem
        expected = f"You deleted your ACS identity on {today}: POST /api/token creates a new one."
        assert problem["detail"] == expected
    again = body_of(await _post_token(service, "dora"))  # starting over is what the message says
    assert again["identityCreated"] is True and again["communicationUserId"] != created["communicationUserId"]
    assert (await _post_token(service, "dora", route="token/refresh")).status_code == 200

    admin = service.token("dora-admin", roles=("TokenService.Admin",))
    route_params = {"communicationUserId": again["communicationUserId"]}
    by_admin = await function_app.manage_delete_identity(
        request("DELETE", "manage/identities/x", token=admin, route_params=route_params)
    )
    assert by_admin.status_code == 200
    problem = body_of(await _post_token(service, "dora", route="token/refresh"))
    assert problem["code"] == "identity_deleted" and problem["detail"].startswith("An administrator deleted")


async def test_oversized_body_is_413(service):
    response = await function_app.issue_token(
        request(
            "POST",
            "token",
            token=service.token("judy"),
            raw=b'{"scopes": [' + b'"chat",' * 5000 + b'"chat"]}',
        )
    )
    assert response.status_code == 413


# ---- settings and dependencies --------------------------------------------------------------------


async def test_missing_setting_gives_503_naming_it_and_health_reports_it(stack, monkeypatch):
    await _configure(monkeypatch, stack, managed_identity=False)
    monkeypatch.delenv("AUTH_AUDIENCE")
    reset_settings()
    await reset_services()
    users = Users(stack)
    try:
        response = await function_app.issue_token(request("POST", "token", token=users.token("kim")))
        assert response.status_code == 503 and "Retry-After" in response.headers
        assert (
            body_of(response)["code"] == "configuration_error"
            and "AUTH_AUDIENCE" in body_of(response)["detail"]
        )
        health = await function_app.health(request("GET", "health"))
        assert health.status_code == 503
        assert body_of(health) == {
            "status": "degraded",
            "checks": {"settings": "missing or invalid: AUTH_AUDIENCE"},
        }
    finally:
        reset_settings()


async def test_health_is_ok_and_shows_no_secret(service, stack):
    response = await function_app.health(request("GET", "health"))
    assert response.status_code == 200
    assert body_of(response) == {
        "status": "ok",
        "checks": {"settings": "ok", "storage": "ok", "issuer": "ok"},
    }


async def test_a_429_without_retry_after_is_retried_until_acs_answers(service, emulator):
    token = service.token("liam")
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    before = emulator.stats()["calls"]["createIdentity"]

    async def lift_throttle():
        await asyncio.sleep(0.5)
        await asyncio.to_thread(emulator.faults, throttleRate=0.0)

    response, _ = await asyncio.gather(
        function_app.issue_token(request("POST", "token", token=token)), lift_throttle()
    )
    assert response.status_code == 200
    assert emulator.stats()["calls"]["createIdentity"] >= before + 2


async def test_acs_throttling_that_persists_is_429_with_retry_after(service, emulator, monkeypatch):
    import shared.acs

    # The same six retries, without waiting out the production backoff (7.75 s) they are not about.
    monkeypatch.setattr(shared.acs, "RETRY_BACKOFF_SECONDS", (0.01,) * len(shared.acs.RETRY_BACKOFF_SECONDS))
    await reset_services()
    emulator.faults(throttleRate=1.0, retryAfterSeconds=0)  # "0": azure-core would retry at once
    before = emulator.stats()["calls"]["createIdentity"]
    response = await _post_token(service, "mia")
    assert emulator.stats()["calls"]["createIdentity"] - before == 1 + len(shared.acs.RETRY_BACKOFF_SECONDS)
    assert response.status_code == 429
    assert body_of(response)["code"] == "acs_throttled" and int(response.headers["Retry-After"]) >= 1


async def test_acs_down_is_503_with_retry_after_never_500(service, emulator):
    await _post_token(service, "noah")  # an existing identity: the refresh path
    emulator.faults(down=True)
    for route in ("token", "token/refresh"):
        response = await _post_token(service, "noah", {"expiresInMinutes": 61}, route=route)  # ACS asked
        assert response.status_code == 503, response.get_body()
        assert body_of(response)["code"] == "acs_unavailable" and int(response.headers["Retry-After"]) >= 1
    first = await _post_token(service, "olivia")
    assert first.status_code == 503
    emulator.faults(down=False)
    assert (await _post_token(service, "olivia")).status_code == 200


async def test_clients_are_created_once_per_worker(service):
    await _post_token(service, "pat")
    clients = services()
    for _ in range(5):
        await _post_token(service, "pat")
    assert services() is clients
    assert clients.jwks.fetches == 1


async def test_unreachable_issuer_is_503_not_401_or_500(stack, emulator, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed_port = s.getsockname()[1]
    issuer = f"http://127.0.0.1:{closed_port}"
    await _configure(monkeypatch, stack, managed_identity=False, AUTH_ISSUER=issuer)
    users = Users(stack)
    try:
        response = await function_app.issue_token(
            request("POST", "token", token=users.token("quinn", issuer=issuer))
        )
        assert response.status_code == 503 and body_of(response)["code"] == "issuer_unavailable"
        health = body_of(await function_app.health(request("GET", "health")))
        assert (
            health["status"] == "degraded"
            and health["checks"]["issuer"] == "unavailable (issuer_unavailable)"
        )
    finally:
        await reset_services()
        reset_settings()


async def test_unknown_kid_refetches_keys_at_most_once_a_minute(service, emulator):
    await _post_token(service, "rita")
    jwks = services().jwks
    fetched = jwks.fetches
    forged = service.claims_token(service.base_claims("rita"), headers={"kid": "unknown-kid"})
    for _ in range(5):
        response = await function_app.issue_token(request("POST", "token", token=forged))
        assert response.status_code == 401
    assert jwks.fetches == fetched  # the last fetch was moments ago: no refetch storm


async def test_last_use_is_written_at_most_once_a_day(service, emulator):
    import datetime as dt

    from shared.store.keys import user_key

    await _post_token(service, "sam")
    clients = services()
    key = user_key(service.stack["issuer"], "sam")
    created = await clients.store.identities.get(key)
    for route in ("token", "token/refresh"):
        await _post_token(service, "sam", route=route)
    assert await clients.store.identities.get(key) == created  # same day: no write

    tomorrow = dt.datetime.now(dt.UTC) + dt.timedelta(days=1)
    clients.tokens.clock = lambda: tomorrow
    await _post_token(service, "sam", route="token/refresh")
    touched = await clients.store.identities.get(key)
    assert touched.last_used_on == tomorrow.date().isoformat()
    assert touched.last_issued_at == tomorrow and touched.created_at == created.created_at
