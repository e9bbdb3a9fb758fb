"""One Event Grid webhook delivery, parsed and classified into actions. Pure: no I/O, no settings reads.

Both delivery schemas are read: the Event Grid schema (a JSON array, with the
`aeg-event-type: SubscriptionValidation` handshake) and CloudEvents 1.0 (one event or a batch; its
handshake is an OPTIONS request, see `handshake_allowed_origin`).

A delivery is either understood completely or rejected completely. Any malformed event raises
`BadRequest(code=Code.INVALID_EVENT)` before anything is returned, so the handler touches no state and
Event Grid retries the delivery and finally dead-letters it, where an operator can see it. Acting on
half a batch and then failing would instead repeat the first half on every retry.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from ..errors import PayloadTooLarge
from .cloudevents import CLOUDEVENT, CLOUDEVENT_BATCH, read_cloudevent
from .custom_events import custom_kinds, custom_target
from .eventgrid import JSON, VALIDATION_EVENT, read_eventgrid_event, validation_code
from .graph_notifications import (
    GRAPH_USER_DELETED,
    GRAPH_USER_UPDATED,
    graph_target,
    is_user_event,
    lifecycle_notice,
    subscription_seen,
)
from .model import (
    MAX_STRING,
    Action,
    Delivery,
    Event,
    EventTypes,
    Kind,
    Lifecycle,
    SubscriptionSeen,
    invalid,
    is_type,
)

MAX_BODY_BYTES = 1024 * 1024  # Event Grid delivers at most 1 MiB per request
MAX_EVENTS = 5000  # Event Grid's maximum batch size for webhook delivery


def parse_delivery(
    body: bytes, content_type: str | None, aeg_event_type: str | None, types: EventTypes
) -> Delivery:
    """Reads one webhook POST: a validation handshake, or the actions its events call for.

    Raises PayloadTooLarge for bodies over 1 MiB and BadRequest(code=Code.INVALID_EVENT) for anything
    malformed, anywhere in the delivery.
    """
    body = body or b""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The event delivery is larger than {MAX_BODY_BYTES} bytes.")
    media = _media_type(content_type)
    items, cloud = _top_level(_load_json(body), media)
    if not items:
        raise invalid("The delivery holds no events.")
    if len(items) > MAX_EVENTS:
        raise invalid(f"The delivery holds {len(items)} events; at most {MAX_EVENTS} are accepted.")
    events = [_event(i, item, cloud=cloud) for i, item in enumerate(items)]

    handshake = (aeg_event_type or "").strip().casefold() == "subscriptionvalidation"
    if handshake or any(is_type(e.type, VALIDATION_EVENT) for e in events):
        return Delivery(validation_code=validation_code(events, handshake), actions=(), ignored=0)

    custom = custom_kinds(types)
    actions: list[Action] = []
    lifecycle: list[Lifecycle] = []
    seen: dict[str, SubscriptionSeen] = {}
    for event in events:
        notice = lifecycle_notice(event)
        if notice is not None:
            lifecycle.append(notice)
            continue
        action = _action(event, types, custom)
        if action is not None:
            actions.append(action)
        if is_user_event(event):
            if (sighting := subscription_seen(event)) is not None:
                seen[sighting.subscription_id] = sighting
    return Delivery(
        validation_code=None,
        actions=tuple(actions),
        ignored=len(events) - len(actions) - len(lifecycle),
        lifecycle=tuple(lifecycle),
        subscriptions=tuple(seen.values()),
    )


def _media_type(content_type: str | None) -> str:
    """The media type without parameters (`; charset=utf-8`), lower-cased; none given reads as JSON."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not media:
        return JSON
    if media not in (JSON, CLOUDEVENT, CLOUDEVENT_BATCH):
        raise invalid(
            f"Unsupported content type {media[:100]!r}; expected {JSON}, {CLOUDEVENT} or {CLOUDEVENT_BATCH}."
        )
    return media


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _load_json(body: bytes) -> Any:
    """Strict UTF-8 JSON (a BOM is tolerated); NaN/Infinity and absurd nesting are malformed too."""
    try:
        return json.loads(body.decode("utf-8-sig"), parse_constant=_reject_constant)
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise invalid("The event delivery is not valid UTF-8 JSON.") from None


def _top_level(value: Any, media: str) -> tuple[Sequence[Any], bool]:
    """The list of raw events, and whether they are CloudEvents.

    application/json carries the Event Grid schema (an array), unless the events are recognisably
    CloudEvents (they carry `specversion`), which some publishers post as plain JSON.
    """
    if media == CLOUDEVENT:
        if not isinstance(value, dict):
            raise invalid(f"A {CLOUDEVENT} body must be one JSON object.")
        return [value], True
    if media == CLOUDEVENT_BATCH:
        if not isinstance(value, list):
            raise invalid(f"A {CLOUDEVENT_BATCH} body must be a JSON array.")
        return value, True
    if isinstance(value, dict) and "specversion" in value:
        return [value], True
    if not isinstance(value, list):
        raise invalid("An Event Grid schema delivery must be a JSON array of events.")
    return value, bool(value) and isinstance(value[0], dict) and "specversion" in value[0]


def _label(index: int, item: dict) -> str:
    event_id = item.get("id")
    if isinstance(event_id, str) and event_id.strip() and len(event_id) <= MAX_STRING:
        return f"Event #{index} (id {event_id[:100]!r})"
    return f"Event #{index}"


def _event(index: int, item: Any, *, cloud: bool) -> Event:
    """One raw event's attributes, read by its schema's rules."""
    if not isinstance(item, dict):
        raise invalid(f"Event #{index} is not a JSON object.")
    label = _label(index, item)
    return read_cloudevent(item, label) if cloud else read_eventgrid_event(item, label)


def _action(event: Event, types: EventTypes, custom: dict[str, Kind]) -> Action | None:
    """What one event asks for, or None when it is not ours to act on."""
    kind: Kind
    if is_type(event.type, GRAPH_USER_DELETED):
        kind, target = "delete", graph_target(event)
    elif is_type(event.type, GRAPH_USER_UPDATED):
        # Graph sends UserUpdated on create, on any change and on soft delete: revoking on it is a
        # policy choice (settings), and when it is off the event is simply not ours.
        if not types.revoke_on_graph_user_updated:
            return None
        kind, target = "revoke", graph_target(event)
    elif event.type.casefold() in custom:
        kind, target = custom[event.type.casefold()], custom_target(event)
    else:
        return None
    return Action(
        event_id=event.id,
        kind=kind,
        target=target,
        event_type=event.type,
        schema=event.schema,
        source=event.source,
        occurred_at=event.time,
    )
