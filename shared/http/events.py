"""POST and OPTIONS /api/events: the Event Grid webhook's HTTP side (acting on events: shared/events/act.py).

The function key is the host's to check. A malformed delivery is refused whole (400) before any
state is touched; work left undone answers 503, which Event Grid retries (it never retries a 4xx).
"""

from __future__ import annotations

import logging
import time

import azure.functions as func

from ..compose import services
from ..errors import BadRequest, Code
from ..events import EventTypes, act, handshake_allowed_origin, parse_delivery
from ..settings import Settings
from . import bodies
from .route import Auth, route

log = logging.getLogger("acs_token_service.events")


@route(auth=Auth.ANONYMOUS)
async def deliver(req: func.HttpRequest) -> func.HttpResponse:
    if req.method == "OPTIONS":
        return _handshake(req)
    started = time.monotonic()  # Event Grid's 30 s run from here
    clients = services()
    delivery = parse_delivery(
        req.get_body(),
        req.headers.get("content-type"),
        req.headers.get("aeg-event-type"),
        _event_types(clients.settings),
    )
    if delivery.validation_code is not None:
        log.info("event subscription validated")
        return bodies.subscription_validated(delivery.validation_code)
    return bodies.events_handled(await act.act_on(clients, delivery, started))


def _handshake(req: func.HttpRequest) -> func.HttpResponse:
    """CloudEvents abuse protection: Event Grid asks with OPTIONS before delivering."""
    origin = handshake_allowed_origin(req.headers)
    if origin is None:
        raise BadRequest("WebHook-Request-Origin is required.", code=Code.INVALID_HANDSHAKE)
    return func.HttpResponse(
        status_code=200,
        headers={"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "*", "Allow": "POST, OPTIONS"},
    )


def _event_types(settings: Settings) -> EventTypes:
    return EventTypes(
        user_deleted=settings.user_deleted_event_types,
        credentials_changed=settings.credentials_changed_event_types,
        revoke_on_graph_user_updated=settings.revoke_on_graph_user_updated,
    )
