"""The dev host: serves an `azure.functions.FunctionApp` locally the way the Functions host does.

It reads the app's own registrations (`get_functions()`), so no route is written twice: HTTP
triggers under `/api/<route>` with the host's key check, timer triggers on their NCRONTAB schedule.
It runs in a process of its own (`python -m devstack host`): aiohttp takes SSL_CERT_FILE when first
imported, and the service must not share the emulator's event loop.

What reaches the log: function names, status codes, durations and exception *types*. Never a
header, a body, a query string or an exception message: those carry bearer tokens and keys.
"""

from __future__ import annotations

import asyncio
import hmac
import importlib
import inspect
import logging
import os
import signal
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import azure.functions as func
from aiohttp import web
from azure.functions.decorators.core import AuthLevel
from azure.functions.decorators.http import HttpTrigger
from azure.functions.decorators.timer import TimerTrigger
from azure.functions.timer import TimerRequest  # func.TimerRequest is the abstract base

from .cors import CorsPolicy
from .dev_signin import DevSignin
from .layout import CORS_CREDENTIALS_ENV, CORS_ENV
from .ncrontab import CronSchedule, resolve_settings
from .routes import RouteTemplate

log = logging.getLogger("devstack.devhost")

ROUTE_PREFIX = "/api"
FUNCTION_KEY_HEADER = "x-functions-key"
IMPORT_FAILED_CODE = "host_import_failed"
# The service's problem type base (shared/problems.py), repeated: this answer exists for when
# the service cannot be imported, so it must not import it.
PROBLEM_TYPE = "urn:acs-token-service:problem:"  # + code; documented in README
MAX_BODY_BYTES = 100 * 1024 * 1024  # the Functions host's request size limit
FUNCTIONS = web.AppKey("functions", "Functions")
LOAD_ERROR = web.AppKey("load_error", BaseException)
_HOP_BY_HOP = {"content-length", "transfer-encoding", "connection", "keep-alive"}


@dataclass(frozen=True)
class HttpFunction:
    name: str
    route: RouteTemplate
    methods: frozenset[str] | None  # None: every method, as when the trigger names none
    auth_level: AuthLevel
    user_function: Callable[..., Any]
    arg_name: str


@dataclass(frozen=True)
class TimerFunction:
    name: str
    schedule: CronSchedule
    run_on_startup: bool
    user_function: Callable[..., Any]
    arg_name: str


@dataclass
class Functions:
    http: list[HttpFunction] = field(default_factory=list)
    timers: list[TimerFunction] = field(default_factory=list)


@dataclass(frozen=True)
class InvocationContext:
    """What the worker passes as `context` to a function that asks for one."""

    invocation_id: str
    function_name: str
    function_directory: str = field(default_factory=os.getcwd)
    trace_context: Any = None
    retry_context: Any = None


def discover(app: func.FunctionApp, environ: Mapping[str, str] | None = None) -> Functions:
    """The functions the host would index; one it could not index is logged and left out, as there."""
    # get_functions() remembers the names it validated and rejects them on a second call, so
    # building a second host from the same app object (tests do) needs this reset.
    app.functions_bindings = None
    found = Functions()
    for function in app.get_functions():
        name, trigger = function.get_function_name(), function.get_trigger()
        call = function.get_user_function()
        if isinstance(trigger, HttpTrigger):
            methods = None if trigger.methods is None else frozenset(str(m) for m in trigger.methods)
            level = trigger.auth_level or AuthLevel.FUNCTION
            found.http.append(
                HttpFunction(name, RouteTemplate.parse(trigger.route), methods, level, call, trigger.name)
            )
        elif isinstance(trigger, TimerTrigger):
            try:
                schedule = CronSchedule.parse(resolve_settings(trigger.schedule, environ))
            except (ValueError, LookupError) as err:
                log.error("Function '%s' is not scheduled: %s", name, err)
                continue
            found.timers.append(
                TimerFunction(name, schedule, bool(trigger.run_on_startup), call, trigger.name)
            )
        else:
            log.warning("Function '%s': the dev host does not fire %s triggers", name, trigger.type)
    found.http.sort(key=lambda f: f.route.precedence)  # stable: registration order breaks ties
    return found


async def invoke(name: str, user_function: Callable[..., Any], arguments: dict[str, Any]) -> Any:
    """Call a function like the Python worker: coroutines on the loop, plain functions on a thread."""
    if "context" in inspect.signature(user_function).parameters:
        arguments = arguments | {"context": InvocationContext(str(uuid.uuid4()), name)}
    if inspect.iscoroutinefunction(user_function):
        return await user_function(**arguments)
    result = await asyncio.to_thread(user_function, **arguments)
    return await result if inspect.isawaitable(result) else result


def _joined(values: Mapping[str, str] | Any, sep: str) -> dict[str, str]:
    """Repeated headers or query keys become one comma-joined value, as the host hands them over."""
    return {key: sep.join(values.getall(key)) for key in values.keys()}


async def to_http_request(request: web.Request, route_params: dict[str, str]) -> func.HttpRequest:
    return func.HttpRequest(
        method=request.method,
        url=str(request.url),
        headers=_joined(request.headers, ", "),
        params=_joined(request.query, ","),
        route_params=route_params,
        body=await request.read(),
    )


def to_web_response(result: Any) -> web.Response:
    """The worker's conversion: HttpResponse as given, a str as a 200 text body, None as 204."""
    if result is None:
        return web.Response(status=204)
    if isinstance(result, str):
        result = func.HttpResponse(result)
    if not isinstance(result, func.HttpResponse):
        raise TypeError(f"an HTTP function returned {type(result).__name__}, not func.HttpResponse")
    response = web.Response(status=result.status_code, body=result.get_body())
    for key, value in result.headers.items():  # werkzeug Headers: repeated names stay repeated
        if key.lower() not in _HOP_BY_HOP:
            response.headers.add(key, value)
    if "Content-Type" not in result.headers:
        mimetype = result.mimetype
        text = mimetype.startswith("text/")
        response.headers["Content-Type"] = f"{mimetype}; charset={result.charset}" if text else mimetype
    return response


class HttpDispatcher:
    """Route, check the method and the key, call the function: the host's order of refusals."""

    def __init__(self, functions: list[HttpFunction], function_key: str | None) -> None:
        self.functions = functions
        self.function_key = function_key

    def authorized(self, function: HttpFunction, request: web.Request) -> bool:
        if function.auth_level == AuthLevel.ANONYMOUS:
            return True
        given = request.headers.get(FUNCTION_KEY_HEADER) or request.query.get("code") or ""
        return bool(self.function_key) and hmac.compare_digest(given.encode(), self.function_key.encode())

    async def handle(self, request: web.Request) -> web.StreamResponse:
        path = request.rel_url.raw_path
        if path != ROUTE_PREFIX and not path.startswith(ROUTE_PREFIX + "/"):
            return web.Response(status=404)
        relative = path[len(ROUTE_PREFIX) :]
        matches = [(f, params) for f in self.functions if (params := f.route.match(relative)) is not None]
        if not matches:
            return web.Response(status=404)
        chosen = next(((f, p) for f, p in matches if f.methods is None or request.method in f.methods), None)
        if chosen is None:
            allowed = sorted({m for f, _ in matches for m in f.methods or ()})
            return web.Response(status=405, headers={"Allow": ", ".join(allowed)})
        function, route_params = chosen
        if not self.authorized(function, request):
            return web.Response(status=401)
        return await self.run(function, route_params, request)

    async def run(self, function: HttpFunction, route_params: dict[str, str], request: web.Request):
        started = time.monotonic()
        try:
            http_request = await to_http_request(request, route_params)
            result = await invoke(function.name, function.user_function, {function.arg_name: http_request})
            response = to_web_response(result)
        except Exception as exc:  # noqa: BLE001  (answer 500, keep serving; the message may hold a token)
            log.error("Executed 'Functions.%s' (Failed, %s)", function.name, type(exc).__name__)
            return web.Response(status=500)
        elapsed = (time.monotonic() - started) * 1000
        log.info("Executed 'Functions.%s' (Succeeded, %d, %.0f ms)", function.name, response.status, elapsed)
        return response


async def run_timer(timer: TimerFunction, clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
    """Fire on schedule until cancelled; a run never overlaps the next, as under the host's lock."""
    last: datetime | None = None
    if timer.run_on_startup:
        await fire(timer, last=None, due=clock())
    while True:
        due = timer.schedule.next_after(max(clock(), last) if last else clock())
        if due is None:
            log.warning("Function '%s': schedule %r never fires", timer.name, timer.schedule.expression)
            return
        # A hair past due: the loop's monotonic clock and the wall clock may disagree by a little.
        await asyncio.sleep(max(0.0, (due - clock()).total_seconds()) + 0.005)
        await fire(timer, last=last, due=due)
        last = due


async def fire(timer: TimerFunction, *, last: datetime | None, due: datetime) -> None:
    upcoming = timer.schedule.next_after(due)
    status = {
        "Last": (last or due).isoformat(),
        "Next": upcoming.isoformat() if upcoming else None,
        "LastUpdated": due.isoformat(),
    }
    request = TimerRequest(past_due=False, schedule_status=status, schedule={"AdjustForDST": True})
    started = time.monotonic()
    try:
        await invoke(timer.name, timer.user_function, {timer.arg_name: request})
    except Exception as exc:  # noqa: BLE001  (logged by type only; the schedule goes on)
        log.error("Executed 'Functions.%s' (Failed, %s)", timer.name, type(exc).__name__)
        return
    log.info("Executed 'Functions.%s' (Succeeded, %.0f ms)", timer.name, (time.monotonic() - started) * 1000)


def _report_stopped_timer(task: asyncio.Task) -> None:
    """A bug here would otherwise end a timer silently."""
    if not task.cancelled() and task.exception() is not None:
        log.error("Timer '%s' stopped: %s", task.get_name(), type(task.exception()).__name__)


def _web_app(handler: Callable, cors: CorsPolicy | None) -> web.Application:
    app = web.Application(middlewares=[cors.middleware()] if cors else [], client_max_size=MAX_BODY_BYTES)
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def create_app(
    function_app: func.FunctionApp,
    *,
    function_key: str | None,
    cors: CorsPolicy | None = None,
    run_timers: bool = True,
    environ: Mapping[str, str] | None = None,
) -> web.Application:
    """The host for one FunctionApp; timers start with the app and stop at its cleanup."""
    functions = discover(function_app, environ)
    app = _web_app(HttpDispatcher(functions.http, function_key).handle, cors)
    app[FUNCTIONS] = functions

    async def timers(_app: web.Application):
        tasks = [asyncio.create_task(run_timer(t), name=t.name) for t in functions.timers]
        for task in tasks:
            task.add_done_callback(_report_stopped_timer)
        yield
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    if run_timers:
        app.cleanup_ctx.append(timers)
    return app


def create_unavailable_app(error: BaseException, *, cors: CorsPolicy | None = None) -> web.Application:
    """Every /api route answers 503 problem+json, so the stack stays usable while the app is broken."""
    body = {
        "type": PROBLEM_TYPE + IMPORT_FAILED_CODE,
        "title": "The function app could not be loaded",
        "status": 503,
        "detail": f"Importing the function app failed with {type(error).__name__}; the dev host's log "
        "(.devstack/host.log under `make run`) has the traceback. Fix it and restart the stack.",
        "code": IMPORT_FAILED_CODE,
    }

    async def unavailable(request: web.Request) -> web.Response:
        path = request.rel_url.raw_path
        if path != ROUTE_PREFIX and not path.startswith(ROUTE_PREFIX + "/"):
            return web.Response(status=404)
        return web.json_response(
            body,
            status=503,
            content_type="application/problem+json",
            headers={"Retry-After": "10", "Cache-Control": "no-store"},
        )

    app = _web_app(unavailable, cors)
    app[LOAD_ERROR] = error
    return app


def load_function_app(spec: str) -> func.FunctionApp:
    """`module:attribute` (attribute defaults to `app`), imported the way the worker indexes it."""
    module_name, _, attribute = spec.partition(":")
    module = importlib.import_module(module_name)
    app = getattr(module, attribute or "app")
    if not callable(getattr(app, "get_functions", None)):
        raise TypeError(f"{spec} is a {type(app).__name__}, not an azure.functions.FunctionApp")
    return app


def cors_from(local_settings: Mapping, environ: Mapping[str, str]) -> CorsPolicy | None:
    """DEVHOST_CORS (set by `devstack up`) wins over the Host section of local.settings.json."""
    if CORS_ENV in environ:
        return CorsPolicy.parse(environ[CORS_ENV], environ.get(CORS_CREDENTIALS_ENV, False))
    return CorsPolicy.from_local_settings(local_settings)


async def serve(app: web.Application, port: int, describe: str) -> None:
    """Listen on loopback only, print one line once ready, run until SIGINT/SIGTERM."""
    runner = web.AppRunner(app, access_log=None, handle_signals=False)  # access logs hold `code=`
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, "127.0.0.1", port).start()
        actual = runner.addresses[0][1]
        print(f"devhost: listening on http://127.0.0.1:{actual}{ROUTE_PREFIX} ({describe})", flush=True)
        await stop.wait()
    finally:
        await runner.cleanup()


def main(
    *, app_spec: str, port: int, function_key: str | None, local_settings: Mapping, repo_root: str
) -> int:
    """The `python -m devstack host` process, after its settings are in os.environ."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("azure").setLevel(logging.WARNING)
    if repo_root not in sys.path:
        sys.path.insert(0, repo_root)
    try:
        cors = cors_from(local_settings, os.environ)
    except ValueError as err:
        print(f"devhost: {err}", file=sys.stderr)
        return 2
    if not function_key:
        log.warning("No function key given: function- and admin-level routes answer 401")
    try:
        app = create_app(load_function_app(app_spec), function_key=function_key, cors=cors)
        functions = app[FUNCTIONS]
        describe = f"{len(functions.http)} HTTP functions, {len(functions.timers)} timers"
    except Exception as err:  # noqa: BLE001  (whatever the import raises, the host serves 503)
        log.error("Could not load the function app %r:\n%s", app_spec, traceback.format_exc())
        app = create_unavailable_app(err, cors=cors)
        describe = f"function app failed to load ({type(err).__name__}): /api answers 503"
    signin = DevSignin.from_environ(os.environ)
    if signin is not None:  # only under `devstack up`: the demo page's dev sign-in
        app.middlewares.append(signin.middleware())
    try:
        asyncio.run(serve(app, port, describe))
    except OSError as err:
        print(f"devhost: cannot listen on 127.0.0.1:{port}: {err.strerror}", file=sys.stderr)
        return 2
    return 0
