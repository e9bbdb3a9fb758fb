"""A small FunctionApp for the dev host's tests: one function per host behaviour under test.

Its default auth level is FUNCTION, as for `func.FunctionApp()`, so that routes without an
explicit level exercise the key check.
"""

from __future__ import annotations

import json
from collections import Counter

import azure.functions as func

app = func.FunctionApp()
SECRET_IN_ERROR = "eyJ-secret-token-in-an-exception-message"
timer_calls: Counter[str] = Counter()
timer_requests: list[func.TimerRequest] = []


def _describe(req: func.HttpRequest) -> func.HttpResponse:
    body = {
        "method": req.method,
        "url": req.url,
        "route": dict(req.route_params),
        "params": dict(req.params),
        "body": req.get_body().decode(),
        "header": req.headers.get("x-sample"),
    }
    return func.HttpResponse(json.dumps(body), mimetype="application/json")


@app.route(route="items/{itemId}", methods=["GET", "PUT"])
async def get_item(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req)


@app.route(route="admin/identities/{communicationUserId}/revoke", methods=["POST"], auth_level="ADMIN")
async def admin_revoke(req: func.HttpRequest) -> func.HttpResponse:
    return _describe(req)


@app.route(route="items/special", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
def special_item(req: func.HttpRequest) -> func.HttpResponse:
    """Sync, and registered after items/{itemId}: the literal route must still win."""
    return func.HttpResponse("special", headers={"X-Kind": "literal"})


@app.route(route="echo", methods=["POST"], auth_level=func.AuthLevel.ANONYMOUS)
async def echo(req: func.HttpRequest) -> func.HttpResponse:
    return func.HttpResponse(
        req.get_body(), status_code=201, mimetype="application/octet-stream", headers={"X-Echo": "yes"}
    )


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
    return func.HttpResponse(context.function_name)


@app.timer_trigger(schedule="* * * * * *", arg_name="timer")
async def every_second(timer: func.TimerRequest) -> None:
    timer_calls["every_second"] += 1
    timer_requests.append(timer)


@app.timer_trigger(schedule="* * * * * *", arg_name="timer")
def failing_every_second(timer: func.TimerRequest) -> None:
    timer_calls["failing_every_second"] += 1
    raise ValueError(SECRET_IN_ERROR)


@app.timer_trigger(schedule="%DEVHOST_SAMPLE_SCHEDULE%", arg_name="timer")
def from_setting(timer: func.TimerRequest) -> None:
    timer_calls["from_setting"] += 1
