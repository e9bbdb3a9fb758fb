"""The ACS token service: every trigger, each a line that hands over to `shared/http/`.

Importing this module does no I/O and reads no setting: the Functions host indexes it first.
"""

import azure.functions as func

from shared import http

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.route(route="token", methods=["POST"])
async def issue_token(req: func.HttpRequest) -> func.HttpResponse:
    """Get-or-create the caller's ACS identity and issue a token for it."""
    return await http.tokens.issue(req)


@app.route(route="token/refresh", methods=["POST"])
async def refresh_token(req: func.HttpRequest) -> func.HttpResponse:
    """A new token for the caller's existing identity; never creates one."""
    return await http.tokens.refresh(req)


@app.route(route="identity", methods=["GET"])
async def get_identity(req: func.HttpRequest) -> func.HttpResponse:
    """The caller's ACS identity, or 404."""
    return await http.tokens.identity(req)


@app.route(route="health", methods=["GET"])
async def health(req: func.HttpRequest) -> func.HttpResponse:
    """Liveness and configuration, without secrets."""
    return await http.health.check(req)


@app.route(route="token/revoke", methods=["POST"])
async def revoke_tokens(req: func.HttpRequest) -> func.HttpResponse:
    """Revoke all of the caller's ACS tokens: 200 revoked, or 202 pending when ACS is unavailable."""
    return await http.tokens.revoke(req)


@app.route(route="identity", methods=["DELETE"])
async def delete_identity(req: func.HttpRequest) -> func.HttpResponse:
    """Delete the caller's ACS identity and mapping: 200 deleted, or 202 pending."""
    return await http.tokens.delete(req)


# Under manage/, not admin/: the Functions host refuses routes that begin with "admin" or "runtime".
@app.route(route="manage/identities/{communicationUserId}/revoke", methods=["POST"])
async def manage_revoke_tokens(req: func.HttpRequest) -> func.HttpResponse:
    """Revoke any identity's tokens (app role TokenService.Admin)."""
    return await http.manage.revoke(req)


@app.route(route="manage/identities/{communicationUserId}", methods=["DELETE"])
async def manage_delete_identity(req: func.HttpRequest) -> func.HttpResponse:
    """Delete any identity (app role TokenService.Admin)."""
    return await http.manage.delete(req)


@app.route(route="manage/retention", methods=["GET"])
async def manage_retention(req: func.HttpRequest) -> func.HttpResponse:
    """What retention would delete next, and not before when: a dry run (app role TokenService.Admin)."""
    return await http.manage.retention(req)


@app.route(route="events", methods=["POST", "OPTIONS"], auth_level=func.AuthLevel.FUNCTION)
async def events(req: func.HttpRequest) -> func.HttpResponse:
    """Event Grid webhook: users deleted or changed in the IdP lose their ACS access."""
    return await http.events.deliver(req)


@app.timer_trigger(schedule="%CLEANUP_SCHEDULE%", arg_name="timer", run_on_startup=False)
async def cleanup(timer: func.TimerRequest) -> None:
    """Complete pending revocations and deletions; retire identities unused for too long."""
    await http.timer.cleanup(timer)


@app.route(route="openapi.json", methods=["GET"])
async def openapi_document(req: func.HttpRequest) -> func.HttpResponse:
    """The OpenAPI 3.1 contract of these routes."""
    return await http.openapi.serve(req)


@app.route(route="teams/token", methods=["POST"])
async def teams_token(req: func.HttpRequest) -> func.HttpResponse:
    """Exchange the caller's Teams token (Entra, for ACS) for an ACS token for that Teams user."""
    return await http.tokens.teams(req)


@app.route(route="demo", methods=["GET"], auth_level=func.AuthLevel.ANONYMOUS)
async def demo(req: func.HttpRequest) -> func.HttpResponse:
    """The browser demo page (only with DEMO_PAGE_ENABLED=true): sign in, get and refresh a token."""
    return await http.demo.serve(req)
