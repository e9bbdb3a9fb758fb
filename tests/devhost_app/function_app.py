"""A small function app for the dev host's tests: one function per host behaviour under test.

The dev host runs it as it runs the service: its worker process indexes this file with
azure-functions-runtime, so the tests see it only through HTTP and the host's log. Its default
auth level is FUNCTION, as for `func.FunctionApp()`, so that routes without an explicit level
exercise the key check. host.json beside it sets functionTimeout to 3 seconds.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from collections import Counter

import azure.functions as func

app = func.FunctionApp()
SECRET_IN_ERROR = "eyJ-secret-token-in-an-exception-message"
timer_calls: Counter[str] = Counter()
timer_requests: list[dict] = []
log = logging.getLogger("devhost_sample")


def _describe(req: func.HttpRequest) -> func.HttpResponse:
    body = {
        "method": req.method,
        "url": req.url,
        "route": dict(req.route_params),
        "params": dict(req.params),
        "body": req.get_body().decode(),
        "headers": dict(req.headers),
    }
    return func.HttpResponse(json.dumps(body), mimetype="application/json")


@app.route(route="items/{itemId}", methods=["GET", "PUT"])
async def get_item(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req)


@app.route(route="ITEMS/{itemId}/", methods=["PUT"], auth_level=func.AuthLevel.ANONYMOUS)
async def put_item_again(req: func.HttpRequest) -> func.HttpResponse:
    """Conflicts with get_item (same route, PUT in common): the host refuses this one."""
    return func.HttpResponse("must never load", status_code=418)


@app.route(route="items/{itemId}", methods=["DELETE"], auth_level=func.AuthLevel.ANONYMOUS)
async def delete_item(req: func.HttpRequest) -> func.HttpResponse:
    """Same route, no method in common: no conflict."""
    return func.HttpResponse(status_code=204)


@app.route(route="admin/identities/{communicationUserId}/revoke", methods=["POST"])
async def admin_revoke(req: func.HttpRequest) -> func.HttpResponse:
    """Under the host's reserved `admin` route space: refused, as in Azure."""
    return _describe(req)


@app.route(route="runtimeinfo", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def runtime_info(req: func.HttpRequest) -> func.HttpResponse:
    """`runtime...` is reserved too (a prefix, not a segment)."""
    return func.HttpResponse("must never load")


@app.route(route="manage/identities/{communicationUserId}/revoke", methods=["POST"], auth_level="ADMIN")
async def manage_revoke(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req)


@app.route(route="underscore", trigger_arg_name="my_req", auth_level=func.AuthLevel.ANONYMOUS)
async def underscore(my_req: func.HttpRequest) -> func.HttpResponse:
    """A binding name with an underscore: Azure's binding-name rule refuses it."""
    return func.HttpResponse("must never load")


@app.function_name("host")
@app.route(route="named-host", auth_level=func.AuthLevel.ANONYMOUS)
async def named_host(req: func.HttpRequest) -> func.HttpResponse:
    """`host` is the one function name Azure's name rule refuses outright."""
    return func.HttpResponse("must never load")


@app.route(route="env/{name}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def env(req: func.HttpRequest) -> func.HttpResponse:
    """Whether a setting reaches the worker (the host's own keys must not)."""
    return func.HttpResponse(json.dumps(req.route_params["name"] in os.environ))


@app.route(route="status/{code}", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def status(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse("as asked", status_code=int(req.route_params["code"]))


@app.route(route="items/special", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def special_item(req: func.HttpRequest) -> func.HttpResponse:
    """Sync, and registered after items/{itemId}: the literal route must still win."""
    return func.HttpResponse("special", headers={"X-Kind": "literal"})


@app.route(route="echo", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def echo(req: func.HttpRequest) -> func.HttpResponse:
    response = func.HttpResponse(
        req.get_body(), status_code=201, mimetype="application/octet-stream", headers={"X-Echo": "yes"}
    )
    response.headers.add("X-Twice", "first")
    response.headers.add("X-Twice", "second")  # RpcHttp's headers are a map: one value survives
    response.headers.add("Set-Cookie", "session=abc; Path=/app; HttpOnly; SameSite=Strict")
    return response


@app.route(route="describe", auth_level=func.AuthLevel.ANONYMOUS)
def describe(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req)


@app.route(route="text", auth_level=func.AuthLevel.ANONYMOUS)  # no methods: every method
def text(req: func.HttpRequest) -> str:
    return f"plain {req.method}"


@app.route(route="boom", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def boom(req: func.HttpRequest) -> func.HttpResponse:
    raise RuntimeError(SECRET_IN_ERROR)


@app.route(route="events", methods=["POST", "OPTIONS"])
async def events(req: func.HttpRequest) -> func.HttpResponse:
    """Event Grid's CloudEvents handshake is an OPTIONS that is not a CORS preflight."""
    if req.method == "OPTIONS":
        origin = req.headers.get("WebHook-Request-Origin", "")
        return func.HttpResponse(status_code=200, headers={"WebHook-Allowed-Origin": origin})
    return func.HttpResponse(status_code=202)


@app.route(route="context", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def with_context(req: func.HttpRequest, context: func.Context) -> func.HttpResponse:
    return func.HttpResponse(f"{context.function_name} {context.invocation_id}")


@app.route(route="logs", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def logs(req: func.HttpRequest) -> func.HttpResponse:
    """Logs as an app does: its own logger, an SDK logger at INFO, and a background task after it returns."""
    marker = req.params.get("marker", "")
    log.info("app record %s", marker)
    logging.getLogger("azure.core.pipeline.policies.http_logging_policy").info("sdk record %s", marker)
    logging.getLogger("devhost_sample").debug("debug record %s", marker)

    async def later() -> None:
        await asyncio.sleep(0.2)
        log.info("late record %s", marker)

    app_tasks.add(asyncio.get_running_loop().create_task(later()))
    return func.HttpResponse("logged")


app_tasks: set[asyncio.Task] = set()


@app.route(route="sleep", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def sleep(req: func.HttpRequest) -> func.HttpResponse:
    await asyncio.sleep(float(req.params.get("seconds", "0")))
    return func.HttpResponse(str(os.getpid()))


@app.route(route="sync-sleep", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def sync_sleep(req: func.HttpRequest) -> func.HttpResponse:
    time.sleep(float(req.params.get("seconds", "0")))
    return func.HttpResponse(str(os.getpid()))


@app.route(route="pid", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def pid(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(str(os.getpid()))


@app.route(route="timer-calls", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def timer_calls_seen(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(json.dumps({"calls": timer_calls, "requests": timer_requests}))


@app.timer_trigger(schedule="* * * * * *", arg_name="timer")
async def every_second(timer: func.TimerRequest) -> None:
    timer_calls["every_second"] += 1
    timer_requests.append(
        {"past_due": timer.past_due, "status": timer.schedule_status, "schedule": timer.schedule}
    )


@app.timer_trigger(schedule="* * * * * *", arg_name="timer")
def failing_every_second(timer: func.TimerRequest) -> None:
    timer_calls["failing_every_second"] += 1
    raise ValueError(SECRET_IN_ERROR)


@app.timer_trigger(schedule="%DEVHOST_SAMPLE_SCHEDULE%", arg_name="timer")
def from_setting(timer: func.TimerRequest) -> None:
    timer_calls["from_setting"] += 1
