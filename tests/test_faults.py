"""Fault injection against the running stack: throttling, errors, an ACS outage, a Storage restart."""

from __future__ import annotations

import concurrent.futures
import time

import requests


def _post(stack, route: str, token: str) -> requests.Response:
    return requests.post(f"{stack['api']}/{route}", headers={"Authorization": f"Bearer {token}"}, timeout=90)


def test_flaky_acs_still_serves_99_percent_of_500_requests(stack, emulator):
    users = [f"flaky-{i}" for i in range(25)]
    tokens = {u: stack.token(u).strip() for u in users}
    for user in users:  # identities exist: the load is refreshes and repeated issues
        assert _post(stack, "token", tokens[user]).status_code == 200
    emulator.faults(throttleRate=0.3, retryAfterSeconds=1, errorRate=0.1)
    before = emulator.stats()["calls"]["issueAccessToken"]

    def one(i: int) -> int:
        return _post(stack, "token/refresh" if i % 2 else "token", tokens[users[i % len(users)]]).status_code

    with concurrent.futures.ThreadPoolExecutor(max_workers=32) as pool:
        codes = list(pool.map(one, range(500)))
    emulator.faults(throttleRate=0, errorRate=0)
    ok = codes.count(200)
    assert ok >= 495, {c: codes.count(c) for c in set(codes)}
    assert set(codes) <= {200, 503}  # a request that still fails is a clean 503, never a 500
    assert emulator.stats()["calls"]["issueAccessToken"] - before > 500  # the faults really struck


def test_acs_down_answers_503_with_retry_after_within_the_request_timeout(stack, emulator):
    token = stack.token("down-user").strip()
    assert _post(stack, "token", token).status_code == 200
    emulator.faults(down=True)
    started = time.monotonic()
    response = _post(stack, "token/refresh", token)
    elapsed = time.monotonic() - started
    assert response.status_code == 503 and int(response.headers["Retry-After"]) >= 1
    assert response.json()["code"] == "acs_unavailable"
    assert elapsed < 30  # Functions' HTTP timeout is 230 s; clients give up far sooner


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


async def test_storage_restart_mid_run_gives_503_then_recovers_with_nothing_lost(
    stack, emulator, monkeypatch, tmp_path
):
    """Azurite (with on-disk data) stopped and started again while the service keeps running."""
    import asyncio

    import function_app
    from devstack import azurite
    from devstack.children import stop
    from shared.clients import reset_clients
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
        await reset_clients()
