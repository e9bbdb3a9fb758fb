"""The dev host: the Functions host's routing, keys, CORS and timers, over real HTTP.

Most tests serve tests/devhost_sample_app.py in-process; a few run `python -m devstack host` and
`python -m devstack up` as the developer does, for what only a process shows (the ready line,
the 503 fallback, children that die with the stack).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests
from aiohttp.test_utils import TestClient, TestServer

from devstack import devhost
from devstack.cors import CorsPolicy
from devstack.ncrontab import CronSchedule, resolve_settings
from devstack.routes import RouteTemplate
from tests import devhost_sample_app as sample
from tests.conftest import REPO_ROOT, start_stack, wait_for_env

KEY = "sample-function-key-0123456789"
ALLOWED = "http://localhost:3000"
UP = [sys.executable, "-m", "devstack", "up", "--free-ports"]


@pytest.fixture
async def client() -> AsyncIterator[TestClient]:
    app = devhost.create_app(
        sample.app,
        function_key=KEY,
        cors=CorsPolicy.parse(f"{ALLOWED}, https://app.example"),
        run_timers=False,
    )
    server = TestServer(app)
    await server.start_server(access_log=None)  # as `devhost.serve` runs it: access logs hold `code=`
    async with TestClient(server) as test_client:
        yield test_client


# --- HTTP triggers ---------------------------------------------------------------------------------


async def test_route_params_query_headers_and_body_reach_the_function(client):
    response = await client.put(
        "/api/items/8%3Aacs%3Aabc%2Fdef?x=1&x=2&y=3",
        data=b"payload",
        headers={"x-functions-key": KEY, "X-Sample": "hello"},
    )
    assert response.status == 200
    assert response.headers["Content-Type"] == "application/json"
    seen = await response.json()
    assert seen["method"] == "PUT"
    assert seen["route"] == {"itemId": "8:acs:abc/def"}
    assert seen["params"] == {"x": "1,2", "y": "3"}
    assert seen["body"] == "payload" and seen["header"] == "hello"
    assert seen["url"].startswith(str(client.make_url("/api/items/")))
    assert seen["url"].endswith("abc%2Fdef?x=1&x=2&y=3")


async def test_template_with_a_parameter_in_the_middle(client):
    response = await client.post("/api/admin/identities/8:acs:r_1/revoke", params={"code": KEY})
    assert response.status == 200
    assert (await response.json())["route"] == {"communicationUserId": "8:acs:r_1"}


async def test_literal_route_beats_a_parameter_and_sync_functions_work(client):
    response = await client.get("/api/ITEMS/special")  # routes match case-insensitively
    assert response.status == 200
    assert await response.text() == "special"
    assert response.headers["X-Kind"] == "literal"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


async def test_response_status_headers_and_bytes_are_kept(client):
    response = await client.post("/api/echo", data=b"\x00\x01binary")
    assert response.status == 201
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["X-Echo"] == "yes"
    assert await response.read() == b"\x00\x01binary"


async def test_str_return_and_no_methods_means_every_method(client):
    for method in ("GET", "DELETE", "PATCH"):
        response = await client.request(method, "/api/text/")
        assert response.status == 200 and await response.text() == f"plain {method}"


async def test_context_parameter_is_passed(client):
    response = await client.get("/api/context")
    assert await response.text() == "with_context"


async def test_wrong_method_is_405_and_unknown_route_404(client):
    response = await client.delete("/api/items/1", headers={"x-functions-key": KEY})
    assert response.status == 405
    assert set(response.headers["Allow"].split(", ")) == {"GET", "PUT"}
    for path in ("/api/nothing/here", "/api", "/items/1", "/"):
        response = await client.get(path, headers={"x-functions-key": KEY})
        assert response.status == 404, path
        assert await response.read() == b""


@pytest.mark.parametrize(
    ("headers", "params"),
    [({}, {}), ({"x-functions-key": "wrong"}, {}), ({}, {"code": "wrong"}), ({"x-functions-key": ""}, {})],
)
async def test_function_and_admin_levels_need_the_key(client, headers, params):
    for method, path in (("GET", "/api/items/1"), ("POST", "/api/admin/identities/x/revoke")):
        response = await client.request(method, path, headers=headers, params=params)
        assert response.status == 401
        assert await response.read() == b""


async def test_anonymous_routes_need_no_key(client):
    assert (await client.get("/api/items/special")).status == 200
    assert (await client.get("/api/items/special", params={"code": "whatever"})).status == 200


async def test_a_raising_function_is_500_with_nothing_leaked(client, caplog):
    caplog.set_level(logging.INFO, logger="devstack.devhost")
    response = await client.get("/api/boom", headers={"Authorization": "Bearer eyJ-user-jwt"})
    assert response.status == 500
    assert await response.read() == b""
    assert "RuntimeError" in caplog.text
    assert sample.SECRET_IN_ERROR not in caplog.text and "eyJ-user-jwt" not in caplog.text
    assert (await client.get("/api/items/special")).status == 200  # still serving


async def test_nothing_secret_reaches_the_log(client, caplog):
    caplog.set_level(logging.DEBUG)
    await client.post("/api/admin/identities/x/revoke", params={"code": KEY}, data=b"body-secret")
    await client.get("/api/items/1", headers={"x-functions-key": KEY, "Authorization": "Bearer eyJ-t"})
    assert "Executed 'Functions.admin_revoke' (Succeeded, 200" in caplog.text
    for secret in (KEY, "body-secret", "eyJ-t"):
        assert secret not in caplog.text


# --- CORS ------------------------------------------------------------------------------------------


async def test_preflight_from_an_allowed_origin(client):
    response = await client.options(
        "/api/items/1",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert response.status == 204  # answered by the host itself: no key needed, no function called
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Access-Control-Allow-Methods"] == "PUT"
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "Access-Control-Allow-Credentials" not in response.headers


async def test_preflight_from_another_origin_gets_no_cors_headers(client):
    response = await client.options(
        "/api/items/1", headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"}
    )
    assert response.status == 204
    assert not any(h.lower().startswith("access-control-") for h in response.headers)


async def test_actual_requests_carry_cors_headers_for_allowed_origins_only(client):
    allowed = await client.get("/api/items/special", headers={"Origin": "https://APP.example/"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://APP.example/"
    assert "Origin" in allowed.headers["Vary"]
    denied = await client.get("/api/items/special", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in denied.headers
    unauthorized = await client.get("/api/items/1", headers={"Origin": ALLOWED})
    assert unauthorized.status == 401 and unauthorized.headers["Access-Control-Allow-Origin"] == ALLOWED


async def test_non_preflight_options_reaches_the_function(client):
    handshake = {"WebHook-Request-Origin": "eventgrid.azure.net", "x-functions-key": KEY}
    response = await client.options("/api/events", headers=handshake)
    assert response.status == 200
    assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    assert (await client.options("/api/events", headers={"WebHook-Request-Origin": "x"})).status == 401
    assert (await client.options("/api/items/special")).status == 405  # route without OPTIONS


def test_cors_policy_parsing():
    assert CorsPolicy.parse("") is None and CorsPolicy.parse(None) is None
    wildcard = CorsPolicy.from_local_settings({"Host": {"CORS": "*"}})
    assert wildcard is not None and wildcard.headers("https://any.example") == {
        "Access-Control-Allow-Origin": "*"
    }
    creds = CorsPolicy.from_local_settings({"Host": {"CORS": "http://a.example", "CORSCredentials": True}})
    assert (
        creds is not None and creds.headers("http://a.example")["Access-Control-Allow-Credentials"] == "true"
    )
    with pytest.raises(ValueError, match="cannot be combined"):
        CorsPolicy.parse("*", "true")


# --- timers ----------------------------------------------------------------------------------------


async def test_timers_fire_on_schedule_and_survive_exceptions(caplog):
    caplog.set_level(logging.INFO, logger="devstack.devhost")
    sample.timer_calls.clear()
    sample.timer_requests.clear()
    app = devhost.create_app(
        sample.app, function_key=KEY, environ={"DEVHOST_SAMPLE_SCHEDULE": "*/1 * * * * *"}
    )
    assert {t.name for t in app[devhost.FUNCTIONS].timers} == {
        "every_second",
        "failing_every_second",
        "from_setting",
    }
    async with TestClient(TestServer(app)):
        for _ in range(45):  # each fires every second: twice takes at most 2 s, give it 4.5
            if len(sample.timer_calls) == 3 and min(sample.timer_calls.values()) >= 2:
                break
            await asyncio.sleep(0.1)
        fired = dict(sample.timer_calls)
    assert len(fired) == 3 and min(fired.values()) >= 2, fired
    request = sample.timer_requests[0]
    assert request.past_due is False and request.schedule_status["Next"]
    assert "ValueError" in caplog.text and sample.SECRET_IN_ERROR not in caplog.text
    await asyncio.sleep(1.2)
    assert sample.timer_calls == fired, "timers must stop with the app"


def test_a_schedule_naming_a_missing_setting_is_left_out_and_logged(caplog):
    functions = devhost.discover(sample.app, environ={})
    assert "from_setting" not in {t.name for t in functions.timers}
    assert "DEVHOST_SAMPLE_SCHEDULE" in caplog.text


def test_resolve_settings():
    env = {"CLEANUP_SCHEDULE": "0 */5 * * * *"}
    assert resolve_settings("%CLEANUP_SCHEDULE%", env) == "0 */5 * * * *"
    assert resolve_settings("0 0 * * * *", env) == "0 0 * * * *"
    with pytest.raises(LookupError, match="MISSING"):
        resolve_settings("%MISSING%", env)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text).replace(tzinfo=UTC)


@pytest.mark.parametrize(
    ("expression", "after", "expected"),
    [
        ("0 */5 * * * *", "2026-03-10T12:03:10", "2026-03-10T12:05:00"),
        ("0 */5 * * * *", "2026-03-10T12:05:00", "2026-03-10T12:10:00"),  # strictly after
        ("*/15 * * * * *", "2026-03-10T12:00:59.900", "2026-03-10T12:01:00"),
        ("5/15 * * * * *", "2026-03-10T12:00:21", "2026-03-10T12:00:35"),
        ("0 30 9 * * 1-5", "2026-03-14T10:00:00", "2026-03-16T09:30:00"),  # Saturday -> Monday
        ("0 30 9 * * Mon-Fri", "2026-03-14T10:00:00", "2026-03-16T09:30:00"),
        ("0 0 0 13 * 5", "2026-01-01T00:00:00", "2026-02-13T00:00:00"),  # day AND weekday: Friday 13th
        ("0 0 12 1 Jan,Jul *", "2026-02-01T00:00:00", "2026-07-01T12:00:00"),
        ("0 0 0 31 * *", "2026-04-01T00:00:00", "2026-05-31T00:00:00"),
        ("0 0 0 1 1 *", "2026-06-01T00:00:00", "2027-01-01T00:00:00"),
        ("0 0 0 29 2 *", "2026-03-01T00:00:00", "2028-02-29T00:00:00"),
        ("15 10 * * *", "2026-03-10T12:00:00", "2026-03-11T10:15:00"),  # five fields: second 0
        ("0,30 1-2 4 * * *", "2026-03-10T04:02:00", "2026-03-10T04:02:30"),
        ("0,30 1-2 4 * * *", "2026-03-10T04:02:30", "2026-03-11T04:01:00"),
    ],
)
def test_ncrontab_next_occurrence(expression, after, expected):
    assert CronSchedule.parse(expression).next_after(_at(after)) == _at(expected)


def test_ncrontab_never_and_field_sets():
    assert CronSchedule.parse("0 0 0 30 2 *").next_after(_at("2026-01-01T00:00:00")) is None
    schedule = CronSchedule.parse("*/20 0-10/5 * * * Sun,sat")
    assert schedule.seconds == {0, 20, 40} and schedule.minutes == {0, 5, 10} and schedule.weekdays == {0, 6}


@pytest.mark.parametrize(
    "expression",
    ["* * * *", "* * * * * * *", "60 * * * * *", "* * 24 * * *", "* * * 0 * *", "* * * * 13 *",
     "* * * * * 7", "*/0 * * * * *", "a * * * * *", "5-1 * * * * *", "1,,2 * * * * *", "* * * * Janu *"],
)  # fmt: skip
def test_ncrontab_rejects(expression):
    with pytest.raises(ValueError):
        CronSchedule.parse(expression)


# --- route templates -------------------------------------------------------------------------------


def test_route_templates():
    assert RouteTemplate.parse("items/{id:int}").match("/items/42") == {"id": "42"}
    assert RouteTemplate.parse("items/{id:int}").match("/items/x") is None
    optional = RouteTemplate.parse("files/{name?}")
    assert optional.match("/files") == {} and optional.match("/files/a") == {"name": "a"}
    assert RouteTemplate.parse("blob/{*path}").match("/blob/a/b%20c") == {"path": "a/b c"}
    assert RouteTemplate.parse("f/{name}.{ext}").match("/f/report.pdf") == {"name": "report", "ext": "pdf"}
    assert RouteTemplate.parse("page/{n=1}").match("/page") == {"n": "1"}
    assert RouteTemplate.parse("a/{x}").match("/a/b/c") is None
    assert RouteTemplate.parse("u/{user-id}").match("/u/7") == {"user-id": "7"}
    ranked = sorted(
        ["token/{action}", "token/refresh", "{*all}"], key=lambda t: RouteTemplate.parse(t).precedence
    )
    assert ranked == ["token/refresh", "token/{action}", "{*all}"]


# --- the `python -m devstack host` process ---------------------------------------------------------


def _start_host(tmp_path: Path, app: str, **env: str) -> tuple[subprocess.Popen, str, Path]:
    log = tmp_path / "host.log"
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack", "host", "--app", app, "--port", "0", "--no-settings"],
            cwd=REPO_ROOT,
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    ready, _, _ = select.select([process.stdout], [], [], 20)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("devhost: listening on http://127.0.0.1:"):
        process.kill()
        pytest.fail(f"no ready line: {line!r}\n{log.read_text()}")
    return process, line.split()[3], log


def _stop(process: subprocess.Popen) -> str:
    process.send_signal(signal.SIGTERM)
    out, _ = process.communicate(timeout=10)
    assert process.returncode == 0
    return out


def test_host_command_serves_an_app_with_key_and_cors_from_the_environment(tmp_path):
    process, api, log = _start_host(
        tmp_path, "tests.devhost_sample_app:app", DEVHOST_FUNCTION_KEY=KEY, DEVHOST_CORS=ALLOWED
    )
    try:
        assert requests.get(f"{api}/items/7", timeout=10).status_code == 401
        response = requests.get(
            f"{api}/items/7", headers={"x-functions-key": KEY, "Origin": ALLOWED}, timeout=10
        )
        assert response.status_code == 200 and response.json()["route"] == {"itemId": "7"}
        assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
        requests.get(f"{api}/items/7", params={"code": KEY}, timeout=10)
    finally:
        out = _stop(process)
    logged = out + log.read_text()
    assert "Executed 'Functions.get_item' (Succeeded, 200" in logged
    assert KEY not in logged


def test_host_command_without_an_importable_app_answers_503_problem_json(tmp_path):
    process, api, log = _start_host(tmp_path, "tests.no_such_function_app:app")
    try:
        for method in ("GET", "POST", "OPTIONS"):
            response = requests.request(method, f"{api}/token", timeout=10)
            assert response.status_code == 503
            assert response.headers["Content-Type"].startswith("application/problem+json")
            problem = response.json()
            assert set(problem) == {"type", "title", "status", "detail", "code"}
            assert problem["status"] == 503 and problem["code"] == "host_import_failed"
            assert "ModuleNotFoundError" in problem["detail"]
        assert requests.get(api.removesuffix("/api") + "/elsewhere", timeout=10).status_code == 404
    finally:
        _stop(process)
    assert "Traceback" in log.read_text() and "tests.no_such_function_app" in log.read_text()


# --- as part of `python -m devstack up` ------------------------------------------------------------


def test_up_runs_the_host_and_writes_api_and_key(stack):
    assert stack["api"] == f"http://127.0.0.1:{stack['ports']['host']}/api"
    assert len(stack["function_key"]) >= 32
    response = requests.get(f"{stack['api']}/no-such-route-{time.time_ns()}", timeout=10)
    if response.status_code == 503:  # function_app.py is missing or broken: the fallback answers
        assert response.json()["code"] == "host_import_failed"
    else:
        assert response.status_code == 404
    host_log = (stack.state_dir / "host.log").read_text()
    assert "devhost: listening on" in host_log and stack["function_key"] not in host_log


def _port_closes(port: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.2)
    return False


def test_up_with_a_broken_app_still_comes_up_and_its_host_dies_with_it(tmp_path):
    state = tmp_path / "s"
    process = subprocess.Popen(
        [*UP, "--state-dir", str(state), "--host-app", "tests.no_such_function_app:app"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    env = wait_for_env(process, state)
    response = requests.post(f"{env['api']}/token", timeout=10)
    assert response.status_code == 503 and response.json()["code"] == "host_import_failed"
    assert "ModuleNotFoundError" in (state / "host.log").read_text()
    process.kill()  # no chance to clean up: the parent-death signal must stop the host
    out, err = process.communicate(timeout=10)
    assert _port_closes(env["ports"]["host"]), "the dev host outlived its parent"
    printed = (out + err).decode()
    assert env["api"] in printed and "503" in printed
    assert (
        f'curl -s -X POST {env["api"]}/token -H "Authorization: Bearer $(make -s token USER=alice)"'
        in printed
    )
    assert env["function_key"] not in printed


def test_up_no_host_leaves_the_host_port_alone(tmp_path):
    process = start_stack(tmp_path / "s", "--no-host")
    try:
        env = wait_for_env(process, tmp_path / "s")
        assert "api" not in env and "function_key" not in env and "host" not in env["ports"]
        assert not (tmp_path / "s" / "host.log").exists()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    assert process.returncode == 0
