"""The Event Grid webhook: handshakes, then each event acted on once.

Event Grid delivers at least once. An event is marked done after it is acted on, so a redelivery
of a done event is acknowledged without acting again; one whose handling failed, or was cut off by
a timeout or a crash, has no mark, and Event Grid's retry acts on it. A Graph event names an Entra
user, who may have several identities: each is marked done on its own, so a retry acts only on
those not done yet. Two deliveries of one event at the same moment (Event Grid retries an answer
that takes over 30 s) may both act: a second revoke or delete of the same identity seconds later
changes nothing that matters.
A malformed delivery is refused whole (400) before any state is touched.

Microsoft Graph lifecycle notifications (the subscription must be renewed, was removed, or missed
notifications) go to `shared.graph`, once each like the rest. A renewal that failed for a reason a
retry may fix (Graph throttled or down) answers 503, so that Event Grid redelivers (it retries 5xx,
not 4xx); one that needs the operator (no permission) is recorded for /api/health and answered
200, and the cleanup timer keeps trying.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections import Counter
from typing import TYPE_CHECKING

import azure.functions as func

from .clients import Clients, get_clients
from .errors import BadRequest, ServiceError
from .events import Action, EventTypes, handshake_allowed_origin, parse_delivery
from .keys import user_key
from .problems import from_error, from_unexpected, json_response

if TYPE_CHECKING:  # the store loads with the clients: importing function_app stays light
    from .store import IdentityRecord

log = logging.getLogger("acs_token_service.events")


async def _records_for(clients: Clients, action: Action) -> list[IdentityRecord]:
    target, store = action.target, clients.store
    if target.tenant_id and target.object_id:
        return await store.graph_users(target.tenant_id, target.object_id)
    if target.issuer and target.subject:
        record = await store.get(user_key(target.issuer, target.subject))
        return [record] if record is not None else []
    if target.communication_user_id:
        key = await store.owner_of(target.communication_user_id)
        record = await store.get(key) if key else None
        # An event may name an identity the user no longer has (deleted, then recreated).
        if record is not None and record.communication_user_id == target.communication_user_id:
            return [record]
    return []


async def _act(clients: Clients, action: Action) -> list[str]:
    """What became of each identity the event names. A Graph event names an Entra user, who may be
    known under several app keys: each identity done is marked (event, key) after it is acted on,
    so a redelivery after a failure acts only on those not done, even if the user's identities
    changed in between, and one that keeps failing does not stop the others. Marking after acting
    means a mark that fails to land repeats that identity's action, never skips it."""
    records = await _records_for(clients, action)
    if not records:
        return ["unknown_user"]  # never used the service (or already deleted): nothing to do
    graph = bool(action.target.tenant_id and action.target.object_id)
    store = clients.store
    outcomes: list[str] = []
    failures: list[Exception] = []
    for record in records:
        done = f"{action.event_id}/{record.user_key}" if graph else None
        try:
            if done and await store.event_seen(done):
                outcomes.append("duplicate")
                continue
            outcomes.append(await _apply(clients, action, record))
            if done:
                await store.mark_event_done(done, dt.datetime.now(dt.UTC))
        except Exception as err:  # noqa: BLE001 - raised once the others have had their turn
            failures.append(err)
    if failures:
        raise failures[0]
    return outcomes


async def _apply(clients: Clients, action: Action, record: IdentityRecord) -> str:
    source = f"event:{action.event_type}"
    if action.kind == "delete":
        return (await clients.revocation.delete(record, source=source)).status
    return (await clients.revocation.revoke(record, source=source)).status


async def _observe(clients: Clients, delivery) -> None:
    """Note the Graph subscription the user events came through (bookkeeping: never fails them)."""
    if not delivery.subscriptions:
        return
    try:
        await clients.graph.observe(delivery.subscriptions)
    except Exception as err:  # noqa: BLE001 - the events were handled; the next ones note it again
        log.warning("graph subscription not noted: %s", type(err).__name__)


def handshake(req: func.HttpRequest) -> func.HttpResponse:
    """CloudEvents abuse protection: Event Grid asks with OPTIONS before delivering."""
    origin = handshake_allowed_origin(req.headers)
    if origin is None:
        return from_error(BadRequest("WebHook-Request-Origin is required.", code="invalid_handshake"))
    return func.HttpResponse(
        status_code=200,
        headers={"WebHook-Allowed-Origin": origin, "WebHook-Allowed-Rate": "*", "Allow": "POST, OPTIONS"},
    )


async def deliver(req: func.HttpRequest) -> func.HttpResponse:
    if req.method == "OPTIONS":
        return handshake(req)
    try:
        clients = get_clients()
        settings = clients.settings
        types = EventTypes(
            user_deleted=settings.user_deleted_event_types,
            credentials_changed=settings.credentials_changed_event_types,
            revoke_on_graph_user_updated=settings.revoke_on_graph_user_updated,
        )
        delivery = parse_delivery(
            req.get_body(), req.headers.get("content-type"), req.headers.get("aeg-event-type"), types
        )
        if delivery.validation_code is not None:
            log.info("event subscription validated")
            return json_response({"validationResponse": delivery.validation_code})
        results: Counter[str] = Counter()
        failures: list[Exception] = []
        for action in delivery.actions:  # each event gets its turn; a failure answers for the batch
            try:
                if await clients.store.event_seen(action.event_id):
                    results["duplicate"] += 1
                    continue
                results.update(await _act(clients, action))
                await clients.store.mark_event_done(action.event_id, dt.datetime.now(dt.UTC))
            except Exception as err:  # noqa: BLE001 - raised below: Event Grid retries the batch
                failures.append(err)
        now = dt.datetime.now(dt.UTC)
        for notice in delivery.lifecycle:
            try:
                if await clients.store.event_seen(notice.event_id):
                    results["duplicate"] += 1
                    continue
                results[await clients.graph.on_lifecycle(notice)] += 1
                await clients.store.mark_event_done(notice.event_id, now)
            except Exception as err:  # noqa: BLE001 - raised below: Event Grid retries the batch
                failures.append(err)
        await _observe(clients, delivery)
        if failures:
            raise failures[0]
        results["ignored"] = delivery.ignored
        log.info("events handled: %s", " ".join(f"{k}={v}" for k, v in sorted(results.items())))
        return json_response({"results": dict(results)})
    except ServiceError as err:
        return from_error(err)
    except Exception as err:  # noqa: BLE001
        return from_unexpected(err)
