"""Fault injection against the running stack: throttling, errors, an ACS outage, a Storage restart."""

from __future__ import annotations

import concurrent.futures
import time

import pytest
import requests


def _post(stack, route: str, token: str, body: dict | None = None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"}
    return requests.post(f"{stack['api']}/{route}", headers=headers, json=body, timeout=90)


@pytest.mark.slow
def test_flaky_acs_still_serves_99_percent_of_500_requests(stack, emulator):
    from tests.service_helpers import Users

    users = [f"flaky-{i}" for i in range(25)]
    minted = Users(stack)
    tokens = {u: minted.token(u) for u in users}
    for user in users:  # identities exist: the load is refreshes and repeated issues
        response = _post(stack, "token", tokens[user])
        assert response.status_code == 200, response.text
    # Random 429s without a wait (Retry-After: 0, retried after the gateway's own backoff): one with
    # a Retry-After of 1 s would have the worker answer every issue itself for that second, as ACS
    # asked (shared/throttle.py), which is not the random fault this test is about.
    emulator.faults(throttleRate=0.3, retryAfterSeconds=0, errorRate=0.1)
    before = emulator.stats()["calls"]["issueAccessToken"]

    def one(i: int) -> int:
        # Each request a lifetime of its own: no two share a token (shared/storm.py), so each asks ACS.
        body = {"expiresInMinutes": 60 + i // len(users)}
        route = "token/refresh" if i % 2 else "token"
        return _post(stack, route, tokens[users[i % len(users)]], body).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        codes = list(pool.map(one, range(500)))
    emulator.faults(throttleRate=0, errorRate=0)
    ok = codes.count(200)
    assert ok >= 495, {c: codes.count(c) for c in set(codes)}
    assert set(codes) <= {200, 429, 503}  # a request that still fails is a clean 429 or 503, never a 500
    assert emulator.stats()["calls"]["issueAccessToken"] - before > 500  # the faults really struck


def test_acs_down_answers_503_with_retry_after_within_the_request_timeout(stack, emulator):
    token = stack.token("down-user").strip()
    first = _post(stack, "token", token)
    assert first.status_code == 200, first.text  # once seen as a 503 here: the body says which
    emulator.faults(down=True)
    started = time.monotonic()
    response = _post(stack, "token/refresh", token, {"expiresInMinutes": 61})  # ACS must be asked
    elapsed = time.monotonic() - started
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert response.json()["code"] == "acs_unavailable"
    assert elapsed < 30  # Functions' HTTP timeout is 230 s; clients give up far sooner


# ---- 429 without Retry-After ------------------------------------------------------------------------
# azure-core retries a 429 on a POST only when it carries Retry-After (azure/core/pipeline/policies/
# _retry.py, RetryPolicyBase.is_retry), and ACS's docs promise no Retry-After on Identity 429s. The
# gateway retries ACS's answers itself (shared.acs.RETRY_BACKOFF_SECONDS, from the worker's retry
# budget), then answers 429 acs_throttled: overload is never a 5xx.


def test_throttling_without_retry_after_over_http_is_429_within_seconds(stack, emulator):
    from shared.acs import RETRY_BACKOFF_SECONDS

    token = stack.token("no-retry-after-user").strip()
    assert _post(stack, "token", token).status_code == 200
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    before = emulator.stats()["calls"]["issueAccessToken"]
    started = time.monotonic()
    response = _post(stack, "token/refresh", token, {"expiresInMinutes": 61})  # not the fresh one again
    elapsed = time.monotonic() - started
    assert response.status_code == 429, response.text
    assert response.json()["code"] == "acs_throttled" and int(response.headers["Retry-After"]) >= 1
    assert emulator.stats()["calls"]["issueAccessToken"] - before == 1 + len(RETRY_BACKOFF_SECONDS)
    assert sum(RETRY_BACKOFF_SECONDS) / 2 <= elapsed < sum(RETRY_BACKOFF_SECONDS) + 2


async def test_the_service_waits_out_a_429_without_retry_after(service, emulator):
    """One throttled answer, then ACS recovers during the service's own backoff: the caller gets 200."""
    import asyncio

    import function_app
    from tests.service_helpers import request

    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    before = emulator.stats()["calls"]["createIdentity"]
    call = asyncio.create_task(
        function_app.issue_token(request("POST", "token", token=service.token("wait-wendy")))
    )
    for _ in range(2000):  # until the first attempt has reached the emulator
        if (await asyncio.to_thread(emulator.stats))["calls"]["createIdentity"] > before:
            break
        await asyncio.sleep(0.005)
    await asyncio.to_thread(emulator.faults, throttleRate=0.0)  # before its first wait (>= 0.125 s) ends
    response = await call
    assert response.status_code == 200, response.get_body()
    assert emulator.stats()["calls"]["createIdentity"] == before + 2  # one 429, one success


async def test_persistent_429s_without_retry_after_are_429_on_every_token_route(
    service, emulator, monkeypatch
):
    import function_app
    from devstack.acs_state import TEAMS_AUDIENCE
    from tests.service_helpers import body_of, request

    monkeypatch.setattr("shared.acs.RETRY_BACKOFF_SECONDS", (0.01, 0.02, 0.04))  # keep the test fast
    bearer = service.token("throttled-tess")
    assert (await function_app.issue_token(request("POST", "token", token=bearer))).status_code == 200
    teams = service.token("throttled-tess", audience=TEAMS_AUDIENCE, app_id=service.stack["teams_app_id"])
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    for handler, route, operation, body in (
        (function_app.issue_token, "token", "createIdentity", None),
        (function_app.refresh_token, "token/refresh", "issueAccessToken", None),
        (function_app.teams_token, "teams/token", "exchangeTeamsToken", {"teamsAccessToken": teams}),
    ):
        token = service.token("throttled-new-tom") if route == "token" else bearer
        if route == "token/refresh":
            body = {"expiresInMinutes": 61}  # not the fresh token answered again: ACS is asked
        before = emulator.stats()["calls"][operation]
        response = await handler(request("POST", route, token=token, body=body))
        assert response.status_code == 429, (route, response.get_body())
        assert body_of(response)["code"] == "acs_throttled" and int(response.headers["Retry-After"]) >= 1
        assert emulator.stats()["calls"][operation] - before == 4, route  # 1 + 3 backoff attempts


async def test_a_revoke_throttled_without_retry_after_is_kept_pending(service, emulator):
    """Revocation tries once more (QUEUED_RETRIES), then queues the work for the timer (202)."""
    import function_app
    from shared.compose import services
    from tests.service_helpers import body_of, request

    bearer = service.token("throttled-rita")
    issued = await function_app.issue_token(request("POST", "token", token=bearer))
    assert issued.status_code == 200
    issued = body_of(issued)
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    before = emulator.stats()["calls"]["revokeAccessTokens"]
    response = await function_app.revoke_tokens(request("POST", "token/revoke", token=bearer))
    assert response.status_code == 202 and body_of(response)["status"] == "pending"
    assert emulator.stats()["calls"]["revokeAccessTokens"] == before + 2  # one retry, then queued
    emulator.faults(throttleRate=0.0)
    report = await services().cleanup.run(ignore_backoff=True)  # the timer completes it
    assert report["revoked"] >= 1 and emulator.verify(issued["token"])["reason"] == "revoked"


def _free_ports(n: int) -> list[int]:
    import socket

    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _wait_for_port(port: int, timeout: float = 30) -> None:
    import socket

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.1)
    raise AssertionError(f"port {port} never opened")


@pytest.mark.slow
async def test_storage_restart_mid_run_gives_503_then_recovers_with_nothing_lost(
    stack, emulator, monkeypatch, tmp_path
):
    """Azurite (with on-disk data) stopped and started again while the service keeps running."""
    import asyncio

    import function_app
    from devstack import azurite
    from devstack.children import stop
    from shared.compose import reset_services
    from tests.conftest import TLS
    from tests.service_fixtures import configure
    from tests.service_helpers import Users, body_of, request

    ports = azurite.AzuritePorts(*_free_ports(3))

    def start():
        process = azurite.start(ports, TLS, tmp_path / "azurite", tmp_path / "azurite.log", persist=True)
        _wait_for_port(ports.table)
        return process

    process = start()
    try:
        await configure(
            monkeypatch,
            stack,
            managed_identity=False,
            TABLES_CONNECTION_STRING=azurite.connection_string(ports, services=("Table",)),
        )
        users = Users(stack)
        names = [f"restart-{i}" for i in range(10)]

        async def issue(name: str):
            return await function_app.issue_token(request("POST", "token", token=users.token(name)))

        first = {
            n: body_of(r)["communicationUserId"]
            for n, r in zip(names, await asyncio.gather(*map(issue, names)), strict=True)
        }
        live = emulator.stats()["liveIdentities"]

        stop(process)
        during = await asyncio.gather(*map(issue, names[:3]))
        assert {r.status_code for r in during} == {503}
        assert all("Retry-After" in r.headers for r in during)

        process = start()
        after = await asyncio.gather(*map(issue, names))
        assert {r.status_code for r in after} == {200}
        assert {
            n: body_of(r)["communicationUserId"] for n, r in zip(names, after, strict=True)
        } == first  # none lost
        assert all(body_of(r)["identityCreated"] is False for r in after)
        assert emulator.stats()["liveIdentities"] == live  # none duplicated
    finally:
        stop(process)
        await reset_services()
