"""The ACS token service: every trigger, each a line that hands over to `shared/`.

Importing this module does no I/O and reads no setting: the Functions host indexes it first.
"""

import azure.functions as func

from shared import endpoints

app = func.FunctionApp(http_auth_level=func.AuthLevel.ANONYMOUS)


@app.route(route="token", methods=["POST"])
async def issue_token(req: func.HttpRequest) -> func.HttpResponse:
    """Get-or-create the caller's ACS identity and issue a token for it."""
    return await endpoints.issue_token(req)


@app.route(route="token/refresh", methods=["POST"])
async def refresh_token(req: func.HttpRequest) -> func.HttpResponse:
    """A new token for the caller's existing identity; never creates one."""
    return await endpoints.refresh_token(req)


@app.route(route="identity", methods=["GET"])
async def get_identity(req: func.HttpRequest) -> func.HttpResponse:
    """The caller's ACS identity, or 404."""
    return await endpoints.get_identity(req)


@app.route(route="health", methods=["GET"])
async def health(req: func.HttpRequest) -> func.HttpResponse:
    """Liveness and configuration, without secrets."""
    return await endpoints.health(req)
