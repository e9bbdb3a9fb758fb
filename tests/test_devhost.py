"""The dev host: the Functions host's rules, over real HTTP, with Azure's Python worker runtime behind it.

Every test drives `python -m devstack host` as a developer does, serving tests/devhost_app through
a worker process that runs azure-functions-runtime: what a test sees is what the real host's
conversions and the real runtime produce. Each rule cites where the Functions host states it
(Azure/azure-functions-host unless named otherwise).
"""

from __future__ import annotations

import concurrent.futures
import functools
import http.client
import importlib.metadata
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import pytest
import requests

from devstack.cors import CorsPolicy
from devstack.host_config import parse_timespan
from devstack.layout import HOST_LOG_FILE
from devstack.ncrontab import CronSchedule, resolve_settings
from devstack.routes import RouteTemplate, compare, kestrel_decoded_path
from tests.conftest import REPO_ROOT, start_stack, wait_for_env

FUNCTION_KEY = "sample-function-key-0123456789"
HOST_KEY = "sample-host-key-0123456789"
MASTER_KEY = "sample-master-key-0123456789"
ALLOWED = "http://localhost:3000"
SAMPLE_APP = "tests/devhost_app/function_app.py"
SECRET_IN_ERROR = "eyJ-secret-token-in-an-exception-message"  # as in tests/devhost_app
UP = [sys.executable, "-m", "devstack", "up", "--free-ports"]


@dataclass
class Host:
    process: subprocess.Popen
    api: str
    log: Path

    @property
    def base(self) -> str:
        return self.api.removesuffix("/api")

    def logged(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_logged(self, text: str, seconds: float = 10) -> str:
        deadline = time.monotonic() + seconds
        while text not in (logged := self.logged()):
            if time.monotonic() > deadline:
                pytest.fail(f"{text!r} never logged:\n{logged[-3000:]}")
            time.sleep(0.05)
        return logged


def start_host(tmp_path: Path, app: str = SAMPLE_APP, **env: str) -> Host:
    log = tmp_path / f"host-{time.monotonic_ns()}.log"
    environment = {
        **os.environ,
        "DEVHOST_FUNCTION_KEY": FUNCTION_KEY,
        "DEVHOST_HOST_KEY": HOST_KEY,
        "DEVHOST_MASTER_KEY": MASTER_KEY,
        "DEVHOST_CORS": f"{ALLOWED}, https://app.example",
        **env,
    }
    with log.open("wb") as err:
        process = subprocess.Popen(
            [sys.executable, "-m", "devstack", "host", "--app", app, "--port", "0", "--no-settings"],
            cwd=REPO_ROOT,
            env=environment,
            stdout=subprocess.PIPE,
            stderr=err,
            text=True,
        )
    ready, _, _ = select.select([process.stdout], [], [], 60)
    line = process.stdout.readline() if ready else ""
    if not line.startswith("devhost: listening on http://127.0.0.1:"):
        process.kill()
        pytest.fail(f"no ready line: {line!r}\n{log.read_text()}")
    return Host(process, line.split()[3], log)


def stop_host(host: Host) -> str:
    host.process.send_signal(signal.SIGTERM)
    out, _ = host.process.communicate(timeout=20)
    assert host.process.returncode == 0
    return out


@pytest.fixture(scope="module")
def host(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Host]:
    """One host for the module's read-only checks; its timers fire every second meanwhile."""
    running = start_host(tmp_path_factory.mktemp("devhost"), DEVHOST_SAMPLE_SCHEDULE="*/2 * * * * *")
    try:
        yield running
    finally:
        stop_host(running)


def get(host: Host, path: str, **kwargs) -> requests.Response:
    return requests.get(f"{host.api}{path}", timeout=30, **kwargs)


# --- the worker ------------------------------------------------------------------------------------


def test_functions_run_in_a_worker_process_on_the_pinned_runtime(host):
    """The host's first lines name the worker package and version; the function runs in the worker."""
    pinned = next(
        line.split("==")[1].strip()
        for line in (REPO_ROOT / "requirements.txt").read_text().splitlines()
        if line.startswith("azure-functions-runtime==")
    )
    assert importlib.metadata.version("azure-functions-runtime") == pinned
    logged = host.wait_logged("Functions:")
    first_lines = logged[: logged.index("Functions:")]
    assert f"azure-functions-runtime {pinned} on Python 3.13" in first_lines
    assert f"Using library: azure_functions_runtime, library version: {pinned}" in first_lines
    worker_pid = int(get(host, "/pid").text)
    assert worker_pid != host.process.pid
    status = requests.get(
        f"{host.base}/admin/host/status", headers={"x-functions-key": MASTER_KEY}, timeout=10
    )
    assert status.json()["worker"] == {
        "package": "azure-functions-runtime",
        "version": pinned,
        "python": "3.13",
        "pid": worker_pid,
    }


def test_the_request_reaches_the_function_as_the_host_converts_it(host):
    """GrpcMessageConversionExtensions.ToRpcHttp: url from the decoded path, header names lower-cased,
    repeated values joined with ",", query values joined with "," and empty ones left out."""
    connection = http.client.HTTPConnection(host.api.split("/")[2], timeout=30)
    connection.putrequest("PUT", "/api/items/8%3Aacs%3Aabc%2Fdef?x=1&x=2&empty=&y=3")
    for name, value in (("x-functions-key", FUNCTION_KEY), ("X-Sample", "a"), ("X-Sample", "b")):
        connection.putheader(name, value)
    connection.putheader("Content-Length", "7")
    connection.endheaders(b"payload")
    raw = connection.getresponse()
    response = requests.models.Response()
    response.status_code, response._content = raw.status, raw.read()
    response.headers = requests.structures.CaseInsensitiveDict(raw.getheaders())
    assert response.status_code == 200 and response.headers["Content-Type"] == "application/json"
    seen = response.json()
    assert seen["method"] == "PUT"
    # Kestrel decodes the path but %2F: the route value keeps its encoded slash.
    assert seen["route"] == {"itemId": "8:acs:abc%2Fdef"}
    assert seen["url"] == f"{host.api}/items/8:acs:abc%2Fdef?x=1&x=2&empty=&y=3"
    assert seen["params"] == {"x": "1,2", "y": "3"}
    assert seen["body"] == "payload"
    assert seen["headers"]["x-sample"] == "a,b"


def test_a_body_without_content_length_reaches_the_function_empty(host):
    """ToRpcHttp sends the body only when ContentLength > 0: a chunked upload has none."""
    chunked = requests.post(f"{host.api}/describe", data=iter([b"chunked ", b"body"]), timeout=30)
    assert chunked.request.headers.get("Transfer-Encoding") == "chunked"
    assert chunked.json()["body"] == ""
    assert requests.post(f"{host.api}/describe", data=b"sized", timeout=30).json()["body"] == "sized"


def test_the_answer_is_written_back_as_the_host_writes_it(host):
    """RawScriptResult: status and body as given, one value per header name (the message's headers
    are a map), cookies as the Set-Cookie lines ASP.NET Core writes."""
    response = requests.post(f"{host.api}/echo", data=b"\x00\x01binary", timeout=30)
    assert response.status_code == 201
    assert response.content == b"\x00\x01binary"
    assert response.headers["Content-Type"] == "application/octet-stream"
    assert response.headers["X-Echo"] == "yes" and response.headers["X-Twice"] == "second"
    assert response.headers["Set-Cookie"] == "session=abc; path=/app; samesite=strict; httponly"


def test_the_literal_route_wins_and_sync_functions_run(host):
    """WebJobsRouteBuilder sorts routes: a literal segment before a parameter, whatever the order
    of registration (items/special comes after items/{itemId})."""
    response = get(host, "/ITEMS/special")  # literals match case-insensitively
    assert response.status_code == 200 and response.text == "special"
    assert response.headers["X-Kind"] == "literal"
    assert response.headers["Content-Type"] == "text/plain; charset=utf-8"


def test_a_str_return_and_no_methods_means_every_method(host):
    for method in ("GET", "DELETE", "PATCH"):
        response = requests.request(method, f"{host.api}/text/", timeout=30)
        assert response.status_code == 200 and response.text == f"plain {method}"


def test_the_context_parameter_carries_the_invocation(host):
    name, invocation_id = get(host, "/context").text.split()
    assert name == "with_context"
    assert f"Executed 'Functions.with_context' (Succeeded, Id={invocation_id}" in host.wait_logged(
        invocation_id
    )


# --- routing rules ---------------------------------------------------------------------------------


def test_a_method_the_route_does_not_take_is_404_not_405(host):
    """WebScriptHostHttpRoutesManager makes the methods an HttpMethodRouteConstraint: a request the
    constraint rejects matches no route, and an unmatched request is 404."""
    response = requests.patch(f"{host.api}/items/1", headers={"x-functions-key": FUNCTION_KEY}, timeout=30)
    assert response.status_code == 404 and response.content == b""
    assert "Allow" not in response.headers
    assert requests.delete(f"{host.api}/items/1", timeout=30).status_code == 204  # another function's method
    for path in ("/nothing/here", "", "/../items/1"):
        assert get(host, path).status_code == 404, path
    assert requests.get(f"{host.base}/items/1", timeout=30).status_code == 404  # outside routePrefix


def test_routes_under_admin_or_runtime_are_refused_and_only_they(host):
    """ScriptHost.ValidateHttpFunction: a route that begins with "admin" or "runtime" throws "The
    specified route conflicts with one or more built in routes."; the function alone is in error."""
    logged = host.wait_logged("function is in error")
    message = "The specified route conflicts with one or more built in routes."
    assert f"The 'admin_revoke' function is in error: {message}" in logged
    assert f"The 'runtime_info' function is in error: {message}" in logged
    for key in (FUNCTION_KEY, MASTER_KEY):
        response = requests.post(
            f"{host.api}/admin/identities/x/revoke", headers={"x-functions-key": key}, timeout=30
        )
        assert response.status_code == 404
    assert get(host, "/runtimeinfo").status_code == 404
    status = requests.get(
        f"{host.base}/admin/host/status", headers={"x-functions-key": MASTER_KEY}, timeout=10
    )
    assert status.json()["functionErrors"]["admin_revoke"] == [message]
    assert get(host, "/items/special").status_code == 200  # the rest of the app runs


def test_a_route_that_conflicts_with_an_earlier_one_is_refused(host):
    """ScriptHost.HttpRoutesConflict: the same template (case and slashes aside) and a method in common."""
    logged = host.wait_logged("put_item_again")
    assert (
        "The 'put_item_again' function is in error: The route specified conflicts with the route "
        "defined by function 'get_item'." in logged
    )
    response = requests.put(f"{host.api}/items/1", timeout=30)  # get_item's, so it needs a key
    assert response.status_code == 401
    assert (
        "delete_item"
        not in requests.get(
            f"{host.base}/admin/host/status", headers={"x-functions-key": MASTER_KEY}, timeout=10
        ).json()["functionErrors"]
    )


def test_names_are_held_to_the_hosts_rules(host):
    """Utility.FunctionNameValidationRegex and BindingNameValidationRegex, applied by
    WorkerFunctionMetadataProvider.ValidateMetadata: no underscore in a binding name, no function
    called `host`."""
    logged = host.wait_logged("The 'underscore' function is in error")
    assert "The 'underscore' function is in error: The binding name my_req is invalid." in logged
    assert "The 'host' function is in error: 'host' is not a valid function name." in logged
    assert get(host, "/underscore").status_code == 404 and get(host, "/named-host").status_code == 404


def _raw(
    host: Host, method: str, target: str, headers: tuple[tuple[str, str], ...] = ()
) -> tuple[int, bytes]:
    """A request sent as written: clients (urllib3 among them) remove dot segments themselves."""
    connection = http.client.HTTPConnection(host.api.split("/")[2], timeout=30)
    connection.putrequest(method, target, skip_accept_encoding=True)
    for name, value in headers:
        connection.putheader(name, value)
    connection.endheaders()
    response = connection.getresponse()
    return response.status, response.read()


def test_the_path_is_normalised_and_matched_as_aspnet_does(host):
    """Kestrel removes dot segments after decoding (so %2e%2e climbs too); routing ignores one
    trailing slash and matches literals, the route prefix included, in any case."""
    assert _raw(host, "GET", "/api/x/../describe")[0] == 200
    assert _raw(host, "GET", "/api/x/%2e%2e/describe")[0] == 200
    assert _raw(host, "GET", "/API/Describe/")[0] == 200
    for target in ("/api//describe", "/api/describe//", "/api/items/..", "/api/items/%2e%2e"):
        assert _raw(host, "GET", target)[0] == 404, target
    master = (("x-functions-key", MASTER_KEY),)
    assert _raw(host, "GET", "/api/../admin/host/status", master)[0] == 200  # the host's own API, as in Azure
    assert _raw(host, "GET", "/ADMIN/host/status", master)[0] == 200


def test_query_keys_are_case_insensitive(host):
    assert get(host, "/items/1", params={"CODE": FUNCTION_KEY}).status_code == 200
    assert json.loads(_raw(host, "GET", "/api/describe?A=1&a=2")[1])["params"] == {"A": "1,2"}


def test_header_bytes_that_are_not_utf8_are_400_not_500(host):
    for name, value in ((b"X-A", b"\xff"), (b"x-functions-key", b"\xff"), (b"Host", b"\xff")):
        with socket.create_connection(
            ("127.0.0.1", int(host.api.split(":")[2].split("/")[0])), timeout=10
        ) as s:
            s.sendall(
                b"GET /api/items/1 HTTP/1.1\r\nHost: 127.0.0.1\r\n" * (name != b"Host")
                + name
                + b": "
                + value
                + b"\r\n\r\n"
            )
            assert s.recv(100).split(b" ")[1] == b"400", name


def test_a_status_http_has_not_is_500(host):
    assert get(host, "/status/201").status_code == 201
    assert get(host, "/status/99").status_code == 500


def test_the_worker_gets_the_app_settings_but_not_the_hosts_keys(host):
    assert get(host, "/env/PATH").json() is True
    for name in ("DEVHOST_FUNCTION_KEY", "DEVHOST_HOST_KEY", "DEVHOST_MASTER_KEY", "DEVHOST_CORS"):
        assert get(host, f"/env/{name}").json() is False, name


def test_a_malformed_request_leaves_no_key_or_bearer_in_the_log(host):
    """aiohttp logs a request it cannot parse with its raw bytes; the host keeps only the error's type."""
    port = int(host.api.split(":")[2].split("/")[0])
    bad = [
        b"GET /api/items/\xc3\xa9?code=" + MASTER_KEY.encode() + b" HTTP/1.1\r\nHost: x\r\n\r\n",
        b"GET /api/items/1 HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer eyJLEAK2.payload\x01x\r\n\r\n",
        b"GET /api/items/1 HTTP/1.1\r\nHost: x\r\nx-functions-key: " + HOST_KEY.encode() + b"\x7f\r\n\r\n",
    ]
    for request in bad:
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(request)
            assert s.recv(100).split(b" ")[1] == b"400"
    logged = host.wait_logged("Refused a malformed request")
    for secret in (MASTER_KEY, HOST_KEY, "eyJLEAK2"):
        assert secret not in logged


# --- keys ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", [FUNCTION_KEY, HOST_KEY, MASTER_KEY])
def test_a_function_level_route_takes_a_function_host_or_master_key(host, key):
    """SecretManager: function keys, host keys and the master key all grant the function level."""
    assert get(host, "/items/1", headers={"x-functions-key": key}).status_code == 200
    assert get(host, "/items/1", params={"code": key}).status_code == 200


@pytest.mark.parametrize(
    ("headers", "params"),
    [
        ({}, {}),
        ({"x-functions-key": "wrong"}, {}),
        ({}, {"code": "wrong"}),
        # AuthenticationLevelHandler: a header that is present is the key, even empty; the query
        # is read only when there is no header.
        ({"x-functions-key": ""}, {"code": FUNCTION_KEY}),
    ],
)
def test_a_function_level_route_refuses_a_missing_or_wrong_key(host, headers, params):
    response = get(host, "/items/1", headers=headers, params=params)
    assert response.status_code == 401 and response.content == b""


def test_an_admin_level_route_takes_only_the_master_key(host):
    url = f"{host.api}/manage/identities/8:acs:x/revoke"
    for key in (FUNCTION_KEY, HOST_KEY, "wrong"):
        assert requests.post(url, headers={"x-functions-key": key}, timeout=30).status_code == 401
    response = requests.post(url, headers={"x-functions-key": MASTER_KEY}, timeout=30)
    assert response.status_code == 200 and response.json()["route"] == {"communicationUserId": "8:acs:x"}


def test_the_host_admin_api_takes_only_the_master_key(host):
    for key in ("", FUNCTION_KEY, HOST_KEY):
        response = requests.get(
            f"{host.base}/admin/host/status", headers={"x-functions-key": key}, timeout=10
        )
        assert response.status_code == 401
    assert get(host, "/items/special", params={"code": "whatever"}).status_code == 200  # anonymous


# --- failures and logs -----------------------------------------------------------------------------


def test_a_raising_function_is_500_and_logged_as_the_host_logs_it(host):
    """The host answers 500 with no body (ExceptionMiddleware) and logs the function's failure with
    its exception, message included: Application Insights gets the same, so an exception message
    must never carry a secret."""
    response = get(host, "/boom", headers={"Authorization": "Bearer eyJ-user-jwt"})
    assert response.status_code == 500 and response.content == b""
    logged = host.wait_logged("Executed 'Functions.boom' (Failed")
    assert f"RuntimeError: {SECRET_IN_ERROR}" in logged
    assert "eyJ-user-jwt" not in logged
    assert get(host, "/items/special").status_code == 200  # still serving


def test_the_worker_logs_like_azure(host):
    """The worker sets the root logger to INFO and sends each record to the host, which logs a
    User record under Function.<name>.User while its invocation runs and drops it after
    (GrpcWorkerChannel.Log); azure-core's INFO records go too, unless the app quiets them."""
    marker = f"m{time.monotonic_ns()}"
    assert get(host, "/logs", params={"marker": marker}).text == "logged"
    time.sleep(0.5)  # the background record comes 0.2 s after the invocation ends
    logged = host.wait_logged(f"sdk record {marker}")
    assert f"Function.logs.User: app record {marker}" in logged
    assert f"Function.logs.User: sdk record {marker}" in logged
    assert f"debug record {marker}" not in logged
    assert f"late record {marker}" not in logged


def test_nothing_the_host_itself_logs_holds_a_key_or_a_header(host):
    get(host, "/items/1", headers={"x-functions-key": FUNCTION_KEY, "Authorization": "Bearer eyJ-t"})
    requests.post(f"{host.api}/echo", data=b"body-secret", params={"code": HOST_KEY}, timeout=30)
    logged = host.wait_logged("Executed 'Functions.echo' (Succeeded")
    for secret in (FUNCTION_KEY, HOST_KEY, MASTER_KEY, "body-secret", "eyJ-t"):
        assert secret not in logged


# --- functionTimeout and a worker that dies ---------------------------------------------------------


@pytest.mark.slow
def test_past_function_timeout_the_worker_restarts_and_every_call_in_flight_ends(tmp_path):
    """FunctionExecutor logs "Timeout value of ... exceeded"; WebScriptHostExceptionHandler then
    restarts the worker process: the late call and every other call in flight on it get 500."""
    running = start_host(tmp_path, AzureFunctionsJobHost__functionTimeout="00:00:02")
    try:
        before = int(get(running, "/pid").text)
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            slow = pool.submit(get, running, "/sleep", params={"seconds": "30"})
            time.sleep(0.5)
            bystander = pool.submit(get, running, "/sync-sleep", params={"seconds": "1.8"})
            started = time.monotonic()
            assert slow.result().status_code == 500
            assert time.monotonic() - started < 10
            assert bystander.result().status_code == 500  # in flight on the worker that was restarted
        logged = running.wait_logged("Restart of language worker process(es) completed.")
        assert "Timeout value of 00:00:02 exceeded by function 'Functions.sleep'" in logged
        assert "A function timeout has occurred. Restarting worker process executing invocationId" in logged
        after = get(running, "/pid")
        assert after.status_code == 200 and int(after.text) != before
    finally:
        stop_host(running)


def test_a_worker_killed_mid_request_is_restarted(tmp_path):
    running = start_host(tmp_path)
    try:
        worker = int(get(running, "/pid").text)
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            in_flight = pool.submit(get, running, "/sleep", params={"seconds": "2"})
            time.sleep(0.5)
            os.kill(worker, signal.SIGKILL)
            assert in_flight.result().status_code == 500
        running.wait_logged("Restart of language worker process(es) completed.")
        assert int(get(running, "/pid").text) != worker
    finally:
        stop_host(running)


def test_stopping_the_host_stops_its_worker(tmp_path):
    running = start_host(tmp_path)
    worker = int(get(running, "/pid").text)
    stop_host(running)
    deadline = time.monotonic() + 10
    while _alive(worker) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _alive(worker)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return not Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z"


def _flaky(tmp_path: Path, mode: str, *, broken: bool) -> Host:
    marker = tmp_path / "marker"
    if broken:
        marker.touch()
    return start_host(
        tmp_path, "tests/flaky_app/function_app.py", SAMPLE_MARKER=str(marker), SAMPLE_MODE=mode
    )


def _problem_503(host: Host) -> dict:
    response = requests.get(f"{host.api}/ok", timeout=30)
    assert response.status_code == 503 and response.json()["code"] == "host_import_failed"
    return response.json()


def test_a_worker_that_exits_while_starting_gives_503_not_a_dead_host(tmp_path):
    running = _flaky(tmp_path, "exit", broken=True)
    try:
        assert "code 3" in _problem_503(running)["detail"]
    finally:
        stop_host(running)


@pytest.mark.slow
def test_a_worker_whose_import_hangs_fails_after_the_hosts_10_seconds(tmp_path):
    """WorkerProcessCountOptions.InitializationTimeout: the WorkerInitResponse (the app's indexing,
    with its import) has 10 s; an app that takes longer fails to start in Azure too."""
    started = time.monotonic()
    running = _flaky(tmp_path, "hang", broken=True)
    try:
        assert 10 <= time.monotonic() - started < 30
        assert "within 10 s" in _problem_503(running)["detail"]
    finally:
        stop_host(running)


@pytest.mark.slow
def test_a_restart_that_cannot_start_the_worker_ends_in_503_not_a_wait(tmp_path):
    running = _flaky(tmp_path, "exit", broken=False)
    try:
        assert get(running, "/ok").text == "ok"
        assert get(running, "/crash").status_code == 500
        logged = running.wait_logged("The host stops running functions", seconds=30)
        assert "Worker restart 3 of 3 failed" in logged
        started = time.monotonic()
        _problem_503(running)
        assert time.monotonic() - started < 5
        status = requests.get(
            f"{running.base}/admin/host/status", headers={"x-functions-key": MASTER_KEY}, timeout=10
        )
        assert status.json()["state"] == "Error"
    finally:
        stop_host(running)


def test_a_function_timeout_under_a_second_is_refused_at_start(tmp_path):
    """ScriptJobHostOptionsSetup.ValidateTimeoutValue: at least MinFunctionTimeout, 1 s."""
    running = start_host(tmp_path, AzureFunctionsJobHost__functionTimeout="00:00:00")
    try:
        problem = requests.get(f"{running.api}/items/special", timeout=10).json()
        assert (
            problem["code"] == "host_import_failed"
            and "functionTimeout must be greater than" in problem["detail"]
        )
    finally:
        stop_host(running)


def test_an_app_the_worker_cannot_import_answers_503_problem_json(tmp_path):
    running = start_host(tmp_path, "tests/broken_app/function_app.py")
    try:
        for method in ("GET", "POST", "OPTIONS"):
            response = requests.request(method, f"{running.api}/token", timeout=10)
            assert response.status_code == 503
            assert response.headers["Content-Type"].startswith("application/problem+json")
            problem = response.json()
            assert set(problem) == {"type", "title", "status", "detail", "code"}
            assert problem["status"] == 503 and problem["code"] == "host_import_failed"
        assert requests.get(f"{running.base}/elsewhere", timeout=10).status_code == 404
        logged = running.logged()
        assert "The function app could not be loaded" in logged
        assert "ModuleNotFoundError" in logged and "devhost_tests_no_such_module" in logged
        assert "Traceback" in logged or 'File "' in logged  # the worker's own stack
    finally:
        stop_host(running)


# --- CORS ------------------------------------------------------------------------------------------


def test_preflight_from_an_allowed_origin(host):
    response = requests.options(
        f"{host.api}/items/1",
        headers={
            "Origin": ALLOWED,
            "Access-Control-Request-Method": "PUT",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=10,
    )
    assert response.status_code == 204  # answered by the host itself: no key needed, no function called
    assert response.headers["Access-Control-Allow-Origin"] == ALLOWED
    assert response.headers["Access-Control-Allow-Methods"] == "PUT"
    assert response.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "Access-Control-Allow-Credentials" not in response.headers


def test_preflight_from_another_origin_gets_no_cors_headers(host):
    response = requests.options(
        f"{host.api}/items/1",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"},
        timeout=10,
    )
    assert response.status_code == 204
    assert not any(h.lower().startswith("access-control-") for h in response.headers)


def test_actual_requests_carry_cors_headers_for_allowed_origins_only(host):
    allowed = get(host, "/items/special", headers={"Origin": "https://APP.example/"})
    assert allowed.headers["Access-Control-Allow-Origin"] == "https://APP.example/"
    assert "Origin" in allowed.headers["Vary"]
    denied = get(host, "/items/special", headers={"Origin": "https://evil.example"})
    assert "Access-Control-Allow-Origin" not in denied.headers
    unauthorized = get(host, "/items/1", headers={"Origin": ALLOWED})
    assert unauthorized.status_code == 401 and unauthorized.headers["Access-Control-Allow-Origin"] == ALLOWED


def test_non_preflight_options_reaches_the_function(host):
    handshake = {"WebHook-Request-Origin": "eventgrid.azure.net", "x-functions-key": FUNCTION_KEY}
    response = requests.options(f"{host.api}/events", headers=handshake, timeout=10)
    assert response.status_code == 200
    assert response.headers["WebHook-Allowed-Origin"] == "eventgrid.azure.net"
    assert (
        requests.options(
            f"{host.api}/events", headers={"WebHook-Request-Origin": "x"}, timeout=10
        ).status_code
        == 401
    )
    assert (
        requests.options(f"{host.api}/items/special", timeout=10).status_code == 404
    )  # route without OPTIONS


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


def _timer_calls(host: Host) -> dict:
    return get(host, "/timer-calls").json()


def test_timers_fire_through_the_worker_and_survive_exceptions(host):
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        calls = _timer_calls(host)["calls"]
        if calls.get("every_second", 0) >= 2 and calls.get("failing_every_second", 0) >= 2:
            break
        time.sleep(0.2)
    seen = _timer_calls(host)
    assert seen["calls"]["every_second"] >= 2 and seen["calls"]["failing_every_second"] >= 2
    assert seen["calls"].get("from_setting", 0) >= 1  # its schedule comes from DEVHOST_SAMPLE_SCHEDULE
    request = seen["requests"][0]  # the TimerInfo the host sent, as the runtime decoded it
    assert (
        request["past_due"] is False
        and request["status"]["Next"]
        and request["schedule"] == {"AdjustForDST": True}
    )
    logged = host.wait_logged("Executed 'Functions.failing_every_second' (Failed")
    assert f"ValueError: {SECRET_IN_ERROR}" in logged


def test_the_admin_api_takes_a_json_invocation_body(host):
    """FunctionsController.Invoke binds [FromBody] FunctionInvocation: none is 400, not JSON 415."""
    url, master = f"{host.base}/admin/functions/every_second", {"x-functions-key": MASTER_KEY}
    assert requests.post(url, headers=master, timeout=10).status_code == 415
    assert requests.post(url, data="{}", headers=master, timeout=10).status_code == 415  # form-encoded
    assert (
        requests.post(
            url, data="null", headers={**master, "Content-Type": "application/json"}, timeout=10
        ).status_code
        == 400
    )
    assert requests.post(url, json={"input": ""}, headers=master, timeout=10).status_code == 202


def test_the_admin_api_runs_a_timer_now(host):
    url = f"{host.base}/admin/functions/every_second"
    assert (
        requests.post(
            url, json={"input": ""}, headers={"x-functions-key": FUNCTION_KEY}, timeout=10
        ).status_code
        == 401
    )
    before = _timer_calls(host)["calls"]["every_second"]
    response = requests.post(url, json={"input": ""}, headers={"x-functions-key": MASTER_KEY}, timeout=10)
    assert response.status_code == 202
    assert _timer_calls(host)["calls"]["every_second"] > before
    missing = requests.post(
        f"{host.base}/admin/functions/nope", json={}, headers={"x-functions-key": MASTER_KEY}, timeout=10
    )
    assert missing.status_code == 404


def test_a_schedule_naming_a_missing_setting_puts_that_function_in_error(tmp_path):
    running = start_host(tmp_path)  # no DEVHOST_SAMPLE_SCHEDULE
    try:
        logged = running.wait_logged("from_setting")
        assert "The 'from_setting' function is in error" in logged and "DEVHOST_SAMPLE_SCHEDULE" in logged
        assert get(running, "/items/special").status_code == 200
    finally:
        stop_host(running)


def test_resolve_settings():
    env = {"CLEANUP_SCHEDULE": "0 */5 * * * *"}
    assert resolve_settings("%CLEANUP_SCHEDULE%", env) == "0 */5 * * * *"
    assert resolve_settings("0 0 * * * *", env) == "0 0 * * * *"
    with pytest.raises(LookupError, match="MISSING"):
        resolve_settings("%MISSING%", env)


def test_function_timeout_is_read_as_a_timespan():
    assert parse_timespan("00:01:00") == 60 and parse_timespan("01:30:00") == 5400
    assert parse_timespan("1.00:00:01.5") == 86401.5 and parse_timespan("-1") is None
    for bad in ("60", "1:00", "00:60"):
        with pytest.raises(ValueError):
            parse_timespan(bad)


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
    assert RouteTemplate.parse("blob/{*path}").match("/blob/a/b c") == {"path": "a/b c"}
    assert RouteTemplate.parse("f/{name}.{ext}").match("/f/report.pdf") == {"name": "report", "ext": "pdf"}
    assert RouteTemplate.parse("page/{n=1}").match("/page") == {"n": "1"}
    assert RouteTemplate.parse("a/{x}").match("/a/b/c") is None
    assert RouteTemplate.parse("a/{x}").match("/a/b%2Fc") == {"x": "b%2Fc"}
    assert RouteTemplate.parse("u/{user-id}").match("/u/7") == {"user-id": "7"}


def test_routes_are_tried_in_the_hosts_order():
    """WebJobsRouteBuilder.RouteComparison: literal before parameter, more constraints first,
    literals by text, then the longer route first."""
    templates = [
        "{*all}",
        "token/{action}",
        "token",
        "token/refresh",
        "items/{id}",
        "items/{id:int}",
        "b",
        "a/x",
    ]
    ordered = sorted(
        templates,
        key=functools.cmp_to_key(lambda a, b: compare(RouteTemplate.parse(a), RouteTemplate.parse(b))),
    )
    assert ordered == [
        "a/x",
        "b",
        "items/{id:int}",
        "items/{id}",
        "token/refresh",
        "token/{action}",
        "token",
        "{*all}",
    ]


def test_the_path_is_decoded_as_kestrel_decodes_it():
    assert kestrel_decoded_path("/api/items/8%3Aacs%3Aabc%2Fdef") == "/api/items/8:acs:abc%2Fdef"
    assert kestrel_decoded_path("/a%20b/%E2%82%AC/%ff/x%41%2f%42") == "/a b/€/%ff/xA%2fB"


# --- as part of `python -m devstack up` ------------------------------------------------------------


def test_up_runs_the_host_and_writes_api_and_keys(stack):
    assert stack["api"] == f"http://127.0.0.1:{stack['ports']['host']}/api"
    keys = {stack["function_key"], stack["host_key"], stack["master_key"]}
    assert len(keys) == 3 and min(len(k) for k in keys) >= 32
    response = requests.get(f"{stack['api']}/no-such-route-{time.time_ns()}", timeout=10)
    if response.status_code == 503:  # function_app.py is missing or broken: the fallback answers
        assert response.json()["code"] == "host_import_failed"
    else:
        assert response.status_code == 404
    host_log = (stack.state_dir / HOST_LOG_FILE).read_text()
    assert "devhost: listening on" in host_log
    assert "azure-functions-runtime" in host_log and "function is in error" not in host_log
    for key in keys:
        assert key not in host_log


def test_the_service_answers_through_the_worker(stack):
    """The manage routes exist and /api/admin does not (it could not load in Azure)."""
    for method, path in (
        ("POST", "manage/identities/8:acs:x/revoke"),
        ("DELETE", "manage/identities/8:acs:x"),
    ):
        response = requests.request(method, f"{stack['api']}/{path}", timeout=30)
        assert response.status_code == 401 and response.json()["code"]  # the service's own problem
        assert (
            requests.request(method, f"{stack['api']}/admin/identities/8:acs:x", timeout=30).status_code
            == 404
        )
    assert (
        "Executed 'Functions.manage_delete_identity' (Succeeded"
        in (stack.state_dir / HOST_LOG_FILE).read_text()
    )


def _port_closes(port: int, seconds: float = 10) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
        except OSError:
            return True
        time.sleep(0.2)
    return False


@pytest.mark.slow
def test_up_with_a_broken_app_still_comes_up_and_its_host_dies_with_it(tmp_path):
    state = tmp_path / "s"
    process = subprocess.Popen(
        [*UP, "--state-dir", str(state), "--host-app", "tests/broken_app/function_app.py"],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    env = wait_for_env(process, state)
    response = requests.post(f"{env['api']}/token", timeout=10)
    assert response.status_code == 503 and response.json()["code"] == "host_import_failed"
    assert "ModuleNotFoundError" in (state / HOST_LOG_FILE).read_text()
    process.kill()  # no chance to clean up: the parent-death signal must stop the host
    out, err = process.communicate(timeout=10)
    assert _port_closes(env["ports"]["host"]), "the dev host outlived its parent"
    printed = (out + err).decode()
    assert env["api"] in printed and "503" in printed
    assert (
        f'curl -s -X POST {env["api"]}/token -H "Authorization: Bearer $(make -s token USER=alice)"'
        in printed
    )
    # Another state dir than .devstack: the banner says how make and devstack find this stack.
    assert f"export DEVSTACK_STATE={state.resolve()}" in printed and "make -s timer" in printed
    for secret in (env["function_key"], env["host_key"], env["master_key"]):
        assert secret not in printed


@pytest.mark.slow
def test_up_says_loudly_which_functions_are_in_error(tmp_path):
    state = tmp_path / "s"
    process = subprocess.Popen(
        [*UP, "--state-dir", str(state), "--host-app", SAMPLE_APP],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        env = wait_for_env(process, state)
        assert requests.get(f"{env['api']}/items/special", timeout=10).status_code == 200
    finally:
        process.send_signal(signal.SIGTERM)
        out, _ = process.communicate(timeout=20)
    printed = out.decode()
    assert (
        "FUNCTION IN ERROR, NOT LOADED (as in Azure): admin_revoke: The specified route conflicts" in printed
    )
    assert "Python worker: azure-functions-runtime" in printed


def test_up_no_host_leaves_the_host_port_alone(tmp_path):
    process = start_stack(tmp_path / "s", "--no-host")
    try:
        env = wait_for_env(process, tmp_path / "s")
        assert "api" not in env and "function_key" not in env and "host" not in env["ports"]
        assert not (tmp_path / "s" / HOST_LOG_FILE).exists()
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(15)
    assert process.returncode == 0


def test_every_host_rule_is_written_down():
    """README's table of what runs locally and in Azure names the worker package it runs."""
    readme = (REPO_ROOT / "README.md").read_text()
    assert "What runs locally, and what runs in Azure" in readme and "azure-functions-runtime" in readme
