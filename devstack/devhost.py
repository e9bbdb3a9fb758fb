"""The dev host: the Functions host's HTTP front, keys, CORS and timers, before Azure's Python worker.

It runs `function_app.py` the way Azure does: a worker process (devstack/worker.py) loads the
app's pinned `azure-functions-runtime`, which indexes the app and converts and invokes every call
(function_host.py and worker_channel.py drive it over FunctionRpc messages). This module is the
front door, holding to the host's rules as its sources state them:

- routes under `/<routePrefix>` (host.json, default `api`), tried in the host's order; a request
  whose method the matched route does not accept is 404, as ASP.NET's method route constraint
  makes it (WebScriptHostHttpRoutesManager adds an HttpMethodRouteConstraint);
- keys: `authLevel` function accepts a function key, a host key or the master key, admin only
  the master key (host_keys.py); a refused key is 401 with an empty body;
- the host's own API under `/admin` (master key): `GET /admin/host/status` and
  `POST /admin/functions/{name}` (run a non-HTTP function now, 202);
- a failed, timed-out or orphaned invocation is 500 with an empty body (ExceptionMiddleware);
- `Host.CORS` of local.settings.json as Core Tools applies it; timer triggers on their NCRONTAB
  schedule, one run at a time.

It runs in a process of its own (`python -m devstack host`): aiohttp takes SSL_CERT_FILE when
first imported. What it logs is what the host logs; see function_host.py.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path

from aiohttp import web

from . import rpc_http
from .cors import CorsPolicy
from .dev_signin import DevSignin
from .function_host import FunctionHost, HostUnavailable, InvocationFailed
from .host_config import HostConfig
from .host_functions import HttpFunction, TimerFunction
from .host_keys import HostKeys, allows, presented_key
from .layout import CORS_CREDENTIALS_ENV, CORS_ENV, FUNCTION_KEY_ENV, HOST_KEY_ENV, MASTER_KEY_ENV
from .routes import compare, kestrel_decoded_path
from .rpc import protos

log = logging.getLogger("devstack.devhost")
# Kestrel's limits (KestrelServerLimits): an 8 KB request line, 32 KB of headers, 100 of them. aiohttp's
# default is 8 KB a header, which would refuse large Entra tokens that Azure takes.
HTTP_LIMITS = {"max_line_size": 8 * 1024, "max_field_size": 32 * 1024, "max_headers": 100}


class _RequestErrorFilter(logging.Filter):
    """aiohttp logs a malformed request with its raw bytes (a request line with `code=`, a bearer):
    keep the fact and the error's type, drop the bytes."""

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("Error handling request"):  # web_protocol.handle_error
            error = record.exc_info[1] if record.exc_info else None
            record.msg, record.args = "Refused a malformed request (%s)", (type(error).__name__,)
            record.exc_info = record.exc_text = None
        return True


logging.getLogger("aiohttp.server").addFilter(_RequestErrorFilter())

IMPORT_FAILED_CODE = "host_import_failed"
# The service's problem type base (shared/http/problems.py), repeated: this answer exists for when
# the service cannot be loaded, so it must not import it.
PROBLEM_TYPE = "urn:acs-token-service:problem:"  # + code; documented in README
MAX_BODY_BYTES = 100 * 1024 * 1024  # the Functions host's request size limit
HTTP_REASON = "This function was programmatically called via the host APIs."
HOST: web.AppKey[FunctionHost] = web.AppKey("host", FunctionHost)
SCRIPT_FILE_SETTING = (
    "PYTHON_SCRIPT_FILE_NAME"  # the worker's setting for a script other than function_app.py
)


def _routes_in_order(functions: list[HttpFunction]) -> list[HttpFunction]:
    def order(a: HttpFunction, b: HttpFunction) -> int:
        return compare(a.route, b.route)

    return sorted(functions, key=functools.cmp_to_key(order))


def unavailable(error: BaseException) -> web.Response:
    """Every route's answer while the app cannot be loaded: 503 problem+json, so the stack stays usable."""
    body = {
        "type": PROBLEM_TYPE + IMPORT_FAILED_CODE,
        "title": "The function app could not be loaded",
        "status": 503,
        "detail": f"The Python worker could not load the function app ({error}); the dev host's log "
        "(.devstack/host.log under `make run`) has the worker's traceback. Fix it and restart the stack.",
        "code": IMPORT_FAILED_CODE,
    }
    return web.json_response(
        body,
        status=503,
        content_type="application/problem+json",
        headers={"Retry-After": "10", "Cache-Control": "no-store"},
    )


class HttpFront:
    """Route, check the method and the key, invoke: the host's order of refusals."""

    def __init__(self, host: FunctionHost, keys: HostKeys) -> None:
        self.host = host
        self.keys = keys
        self.prefix = f"/{host.config.route_prefix}" if host.config.route_prefix else ""
        self._routes: list[HttpFunction] | None = None
        self._routes_of: object = None

    def routes(self) -> list[HttpFunction]:
        if self._routes_of is not self.host.functions:  # re-sorted after a worker restart only
            self._routes = _routes_in_order(self.host.functions.http)
            self._routes_of = self.host.functions
        assert self._routes is not None
        return self._routes

    def granted(self, request: web.Request) -> str:
        return self.keys.level(presented_key(request.headers, request.query))

    async def handle(self, request: web.Request) -> web.StreamResponse:
        if not _utf8_headers(request):
            return web.Response(status=400)  # Kestrel reads request headers as UTF-8 and refuses the rest
        path = kestrel_decoded_path(request.rel_url.raw_path)
        folded = (
            path.lower()
        )  # ASP.NET matches literal segments, the prefix and /admin among them, in any case
        if folded == "/admin" or folded.startswith("/admin/"):
            return await self.admin(request, folded)
        if self.prefix and folded != self.prefix and not folded.startswith(self.prefix + "/"):
            return web.Response(status=404)
        if self.host.load_error is not None:
            return unavailable(self.host.load_error)
        relative = path[len(self.prefix) :]
        for function in self.routes():
            route_params = function.route.match(relative)
            if route_params is None or (
                function.methods is not None and request.method not in function.methods
            ):
                continue  # the method is part of the route: another route may still take it
            if not allows(self.granted(request), function.auth_level):
                return web.Response(status=401)
            return await self.invoke(function, route_params, request)
        return web.Response(status=404)

    async def invoke(self, function: HttpFunction, route_params: dict[str, str], request: web.Request):
        data = protos.TypedData(http=await rpc_http.to_rpc_http(request, route_params))
        try:
            response = await self.host.invoke(
                function, data, reason=HTTP_REASON, traceparent=request.headers.get("traceparent")
            )
        except InvocationFailed:
            return web.Response(status=500)
        except HostUnavailable as err:
            log.error("Answered 503 for 'Functions.%s': %s", function.name, err)
            return web.Response(status=503)
        answer = rpc_http.to_web_response(
            response.return_value if response.HasField("return_value") else None
        )
        if not 100 <= answer.status <= 999:  # ASP.NET refuses to set such a status: the request fails
            log.error("Function '%s' answered status %s, which HTTP has not", function.name, answer.status)
            return web.Response(status=500)
        return answer

    # ---- the host's admin API -------------------------------------------------------------------

    async def admin(self, request: web.Request, path: str) -> web.Response:
        if self.granted(request) != "admin":
            return web.Response(status=401)
        if path == "/admin/host/status" and request.method == "GET":
            return web.json_response(self.status())
        name = path.removeprefix("/admin/functions/")
        if name != path and "/" not in name and request.method == "POST":
            # FunctionsController.Invoke: [FromBody] FunctionInvocation, 400 without one; MVC refuses
            # a body that is not JSON with 415.
            if request.content_type not in (
                "application/json",
                "text/json",
            ) and not request.content_type.endswith("+json"):
                return web.Response(status=415)
            try:
                invocation = json.loads(await request.read() or b"null")
            except (UnicodeDecodeError, json.JSONDecodeError):
                invocation = None
            if not isinstance(invocation, dict):
                return web.Response(status=400)
            function = self.host.functions.by_name(name)
            if not isinstance(function, TimerFunction):
                return web.Response(status=404)
            task = asyncio.create_task(
                fire(self.host, function, last=None, due=datetime.now(UTC), reason=HTTP_REASON)
            )
            request.app[BACKGROUND].add(task)
            task.add_done_callback(request.app[BACKGROUND].discard)
            return web.Response(status=202)
        return web.Response(status=404)

    def status(self) -> dict:
        """`GET /admin/host/status`; `functionErrors` is the dev host's addition, for `make run` to show."""
        host = self.host
        worker = host.worker.metadata if host.worker and host.worker.metadata else None
        return {
            "state": "Error" if host.load_error else "Running",
            "errors": [str(host.load_error)] if host.load_error else [],
            "processUptime": int((time.monotonic() - host.started_at) * 1000),
            "functionErrors": host.functions.errors,
            "worker": {
                "package": "azure-functions-runtime",
                "version": worker.worker_version if worker else None,
                "python": worker.runtime_version if worker else None,
                "pid": host.worker.pid if host.worker else None,
            },
        }


# ---- timers ---------------------------------------------------------------------------------------


def timer_payload(*, last: datetime | None, due: datetime, upcoming: datetime | None, past_due: bool) -> str:
    """The TimerInfo the host sends (as JSON) for a timer trigger."""
    return json.dumps(
        {
            "Schedule": {"AdjustForDST": True},
            "ScheduleStatus": {
                "Last": (last or due).isoformat(),
                "Next": upcoming.isoformat() if upcoming else None,
                "LastUpdated": due.isoformat(),
            },
            "IsPastDue": past_due,
        }
    )


async def fire(
    host: FunctionHost, timer: TimerFunction, *, last: datetime | None, due: datetime, reason: str
) -> None:
    data = protos.TypedData(
        json=timer_payload(last=last, due=due, upcoming=timer.schedule.next_after(due), past_due=False)
    )
    try:
        await host.invoke(timer, data, reason=reason)
    except InvocationFailed:
        pass  # logged by the host; the schedule goes on
    except HostUnavailable as err:
        log.error("Timer '%s' did not fire: no worker can run it (%s)", timer.name, err)


async def run_timer(
    host: FunctionHost, timer: TimerFunction, clock: Callable[[], datetime] = lambda: datetime.now(UTC)
) -> None:
    """Fire on schedule until cancelled; a run never overlaps the next, as under the host's lock."""
    last: datetime | None = None
    if timer.run_on_startup:
        await fire(host, timer, last=None, due=clock(), reason="Timer fired at startup")
    while True:
        due = timer.schedule.next_after(max(clock(), last) if last else clock())
        if due is None:
            log.warning("Function '%s': schedule %r never fires", timer.name, timer.schedule.expression)
            return
        # A hair past due: the loop's monotonic clock and the wall clock may disagree by a little.
        await asyncio.sleep(max(0.0, (due - clock()).total_seconds()) + 0.005)
        await fire(host, timer, last=last, due=due, reason=f"Timer fired at {clock().isoformat()}")
        last = due


def _report_stopped_timer(task: asyncio.Task) -> None:
    """A bug here would otherwise end a timer silently."""
    if not task.cancelled() and task.exception() is not None:
        log.error("Timer '%s' stopped: %s", task.get_name(), type(task.exception()).__name__)


# ---- the application ------------------------------------------------------------------------------

BACKGROUND: web.AppKey[set[asyncio.Task]] = web.AppKey("background", set)


def resolve_app(script: str | Path) -> tuple[Path, dict[str, str]]:
    """A script path (default function_app.py) as the worker's app folder and script-name setting."""
    path = Path(script).resolve()
    settings = {} if path.name == "function_app.py" else {SCRIPT_FILE_SETTING: path.name}
    return path.parent, settings


def create_app(
    script: str | Path,
    *,
    keys: HostKeys,
    cors: CorsPolicy | None = None,
    run_timers: bool = True,
    environ: Mapping[str, str] | None = None,
) -> web.Application:
    """The host for one function app; its worker starts with the app, timers after it, all stop at cleanup."""
    app_dir, script_settings = resolve_app(script)
    environment = {**(os.environ if environ is None else environ), **script_settings}
    try:
        config, config_error = HostConfig.load(app_dir, environment), None
    except ValueError as err:  # the host refuses to start; every route says why
        config, config_error = HostConfig(), str(err)
    host = FunctionHost(app_dir, config=config, environ=environment, config_error=config_error)
    front = HttpFront(host, keys)
    app = web.Application(
        middlewares=[cors.middleware()] if cors else [],
        client_max_size=MAX_BODY_BYTES,
        handler_args=HTTP_LIMITS,
    )
    app.router.add_route("*", "/{tail:.*}", front.handle)
    app[HOST] = host
    app[BACKGROUND] = set()

    async def lifetime(_app: web.Application):
        await host.start()
        tasks = []
        if run_timers and host.load_error is None:
            tasks = [asyncio.create_task(run_timer(host, t), name=t.name) for t in host.functions.timers]
            for task in tasks:
                task.add_done_callback(_report_stopped_timer)
        yield
        for task in [*tasks, *app[BACKGROUND]]:
            task.cancel()
        await asyncio.gather(*tasks, *app[BACKGROUND], return_exceptions=True)
        await host.stop()

    app.cleanup_ctx.append(lifetime)
    return app


def cors_from(local_settings: Mapping, environ: Mapping[str, str]) -> CorsPolicy | None:
    """DEVHOST_CORS (set by `devstack up`) wins over the Host section of local.settings.json."""
    if CORS_ENV in environ:
        return CorsPolicy.parse(environ[CORS_ENV], environ.get(CORS_CREDENTIALS_ENV, False))
    return CorsPolicy.from_local_settings(local_settings)


def keys_from(environ: Mapping[str, str], function_key: str | None) -> HostKeys:
    return HostKeys(
        function_key=function_key or environ.get(FUNCTION_KEY_ENV) or None,
        host_key=environ.get(HOST_KEY_ENV) or None,
        master_key=environ.get(MASTER_KEY_ENV) or None,
    )


def describe(host: FunctionHost) -> str:
    if host.load_error is not None:
        return f"the function app failed to load ({host.load_error}): /{host.config.route_prefix} answers 503"
    functions = host.functions
    text = f"{len(functions.http)} HTTP functions, {len(functions.timers)} timers"
    if functions.errors:
        text += f"; FUNCTIONS IN ERROR, NOT LOADED: {', '.join(sorted(functions.errors))}"
    return text


async def serve(app: web.Application, port: int) -> None:
    """Listen on loopback only, print one line once ready, run until SIGINT/SIGTERM."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)  # access logs hold `code=`
    await runner.setup()  # starts the worker and loads the app
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        try:
            await web.TCPSite(runner, "127.0.0.1", port).start()
        except OSError as err:
            raise CannotListen(f"cannot listen on 127.0.0.1:{port}: {err.strerror}") from None
        actual = runner.addresses[0][1]
        host = app[HOST]
        prefix = f"/{host.config.route_prefix}" if host.config.route_prefix else ""
        print(f"devhost: listening on http://127.0.0.1:{actual}{prefix} ({describe(host)})", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(*, app_script: str, port: int, function_key: str | None, local_settings: Mapping) -> int:
    """The `python -m devstack host` process, after its settings are in os.environ."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        cors = cors_from(local_settings, os.environ)
    except ValueError as err:
        print(f"devhost: {err}", file=sys.stderr)
        return 2
    keys = keys_from(os.environ, function_key)
    if not keys.function_key:
        log.warning("No function key given: function-level routes take the host or master key only")
    app = create_app(app_script, keys=keys, cors=cors)
    signin = DevSignin.from_environ(os.environ)
    if signin is not None:  # only under `devstack up`: the demo page's dev sign-in
        app.middlewares.append(signin.middleware())
    try:
        asyncio.run(serve(app, port))
    except CannotListen as err:
        print(f"devhost: {err}", file=sys.stderr)
        return 2
    return 0


class CannotListen(RuntimeError):
    """The port is taken (or not ours to take)."""


def _utf8_headers(request: web.Request) -> bool:
    try:
        for name, value in request.raw_headers:
            name.decode("utf-8"), value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True
