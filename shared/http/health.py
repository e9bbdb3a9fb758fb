"""GET /api/health: settings, Table Storage, the issuer's keys and the Graph subscription, each
named "ok" or by what is wrong with it, never by a value."""

from __future__ import annotations

import azure.functions as func

from ..compose import Services, services
from ..errors import ServiceError, SettingError
from ..settings import get_settings
from . import bodies
from .route import Auth, route


@route(auth=Auth.ANONYMOUS)
async def check(_req: func.HttpRequest) -> func.HttpResponse:
    """Degraded (503) once any check fails. `graphSubscription` also once a renewal failed or the
    subscription expires within 3 days: deleted users would then stop reaching the webhook silently."""
    checks: dict[str, str] = {}
    try:
        settings = get_settings()
        checks["settings"] = "ok"
    except SettingError as err:
        checks["settings"] = f"missing or invalid: {err.setting}"
        return bodies.health(checks, healthy=False)
    clients = services()
    try:
        await clients.store.table.ping()
        checks["storage"] = "ok"
    except Exception as err:  # noqa: BLE001
        checks["storage"] = f"unavailable ({type(err).__name__})"
    if clients.issuer_keys:
        checks["issuer"] = "ok"
        for keys in clients.issuer_keys.values():  # every trusted issuer's key set loads
            try:
                await keys.key("\x00health")  # an unknown kid is expected
            except ServiceError as err:
                if err.status != 401:
                    checks["issuer"] = f"unavailable ({err.code})"
    else:
        checks["issuer"] = f"easyauth ({settings.auth_mode})"
    graph_ok = await _graph(clients, checks)
    ok = graph_ok and all(
        v == "ok" or v.startswith("easyauth") for k, v in checks.items() if k != "graphSubscription"
    )
    return bodies.health(checks, healthy=ok)


async def _graph(clients: Services, checks: dict[str, str]) -> bool:
    """Adds `graphSubscription` when there is one to report on (shared/graph/); False if degraded."""
    if checks.get("storage") != "ok":  # its record is in Table Storage
        return True
    try:
        reported = await clients.graph.health()
    except Exception as err:  # noqa: BLE001
        reported = (f"unknown ({type(err).__name__})", False)
    if reported is None:
        return True
    checks["graphSubscription"], healthy = reported
    return healthy
