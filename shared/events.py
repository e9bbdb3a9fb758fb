"""Event Grid webhook deliveries, parsed and classified into actions. Pure: no I/O, no settings reads.

Both delivery schemas are read: the Event Grid schema (a JSON array, with the
`aeg-event-type: SubscriptionValidation` handshake) and CloudEvents 1.0 (one event or a batch; its
handshake is an OPTIONS request, see `handshake_allowed_origin`).

A delivery is either understood completely or rejected completely. Any malformed event raises
`BadRequest(code="invalid_event")` before anything is returned, so the handler touches no state and
Event Grid retries the delivery and finally dead-letters it, where an operator can see it. Acting on
half a batch and then failing would instead repeat the first half on every retry.
"""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .errors import BadRequest, PayloadTooLarge

MAX_BODY_BYTES = 1024 * 1024  # Event Grid delivers at most 1 MiB per request
MAX_EVENTS = 5000  # Event Grid's maximum batch size for webhook delivery
MAX_STRING = 1024

VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"
GRAPH_USER_DELETED = "Microsoft.Graph.UserDeleted"
GRAPH_USER_UPDATED = "Microsoft.Graph.UserUpdated"
# Microsoft Graph lifecycle notifications, through the partner topic the subscription's
# lifecycleNotificationUrl names. For users Graph sends only reauthorizationRequired ("Reduce
# missing subscriptions and change notifications", Microsoft Learn: subscriptionRemoved and missed
# are for Outlook and Teams resources); Event Grid names it as below ("Receive Microsoft Graph API
# change events through Azure Event Grid"). Every lifecycle notification carries
# data.lifecycleEvent, which is what decides here, so the other two are understood whatever type
# name they arrive under.
GRAPH_REAUTHORIZATION_REQUIRED = "Microsoft.Graph.SubscriptionReauthorizationRequired"
GRAPH_SUBSCRIPTION_REMOVED = "Microsoft.Graph.SubscriptionRemoved"
REAUTHORIZATION_REQUIRED, SUBSCRIPTION_REMOVED, MISSED = (
    "reauthorizationRequired",
    "subscriptionRemoved",
    "missed",
)
LIFECYCLE_EVENTS = (REAUTHORIZATION_REQUIRED, SUBSCRIPTION_REMOVED, MISSED)

# The schemas, as parts of an event's identity: each guarantees uniqueness of its own attributes.
CLOUDEVENTS_SCHEMA = "cloudevents"
EVENT_GRID_SCHEMA = "eventgrid"

JSON = "application/json"
CLOUDEVENT = "application/cloudevents+json"
CLOUDEVENT_BATCH = "application/cloudevents-batch+json"

# WebHook-Request-Origin is a DNS name (CloudEvents HTTP webhook spec); it is echoed back in a response
# header, so nothing but a plain host name may pass (no CR/LF, commas, spaces or URLs).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")


@dataclass(frozen=True)
class EventTarget:
    """Whom an event is about; exactly one form is set."""

    tenant_id: str | None = None  # Microsoft Graph users: tenant + object id
    object_id: str | None = None
    issuer: str | None = None  # custom app events: the app user, as the caller's token names it
    subject: str | None = None
    communication_user_id: str | None = None  # custom app events: the ACS identity itself


@dataclass(frozen=True)
class Action:
    """What one event asks for. It is acted on once: (schema, source, event_id) names it, as its
    schema makes only that unique (CloudEvents: source + id; an id alone is not)."""

    event_id: str  # Event Grid id / CloudEvents id
    kind: str  # "delete" | "revoke"
    target: EventTarget
    event_type: str
    schema: str  # CLOUDEVENTS_SCHEMA | EVENT_GRID_SCHEMA
    source: str  # CloudEvents `source`; Event Grid schema `topic` ("" when a publisher posted none)
    # When it happened (Event Grid `eventTime`, CloudEvents `time`): a redelivery ends the same
    # sessions as the first delivery. None when absent or unreadable: the service then uses now.
    occurred_at: dt.datetime | None = field(default=None, compare=False)


@dataclass(frozen=True)
class Lifecycle:
    """A Microsoft Graph lifecycle notification: the subscription needs the service's attention."""

    event_id: str
    event_type: str
    lifecycle_event: str  # one of LIFECYCLE_EVENTS
    subscription_id: str
    expires_at: dt.datetime | None  # data.subscriptionExpirationDateTime, when given
    schema: str  # with source and event_id, what names it once (as for Action)
    source: str


@dataclass(frozen=True)
class SubscriptionSeen:
    """A Graph subscription a user change notification came through, and its expiry then."""

    subscription_id: str
    expires_at: dt.datetime


@dataclass(frozen=True)
class Delivery:
    validation_code: str | None  # set for an Event Grid SubscriptionValidationEvent handshake
    actions: tuple[Action, ...]  # what to do, in delivery order
    ignored: int  # events acknowledged but not acted on (unrelated types)
    lifecycle: tuple[Lifecycle, ...] = ()  # Graph lifecycle notifications, in delivery order
    # Bookkeeping, not an action: which Graph subscriptions user events came through (graph.py).
    subscriptions: tuple[SubscriptionSeen, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class EventTypes:
    """Which event types mean what, from settings."""

    user_deleted: tuple[str, ...] = ()  # custom app event types meaning "user deleted"
    credentials_changed: tuple[str, ...] = ()  # custom types meaning "credentials changed" (-> revoke)
    revoke_on_graph_user_updated: bool = True


@dataclass(frozen=True)
class _Event:
    """The attributes this module needs, the same for both schemas."""

    label: str  # names the event in error details
    schema: str  # CLOUDEVENTS_SCHEMA | EVENT_GRID_SCHEMA
    source: str  # CloudEvents `source`, Event Grid schema `topic`: with the id, what is unique
    id: str
    type: str
    subject: str | None
    data: Any  # None when the event carries no data
    time: dt.datetime | None = None


def _event_time(value: Any) -> dt.datetime | None:
    """An RFC 3339 time, as both schemas carry it; None rather than a 400 for a bad one (it only
    dates the event, and Graph's own events always have one)."""
    if not isinstance(value, str) or len(value) > 64:
        return None
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed.astimezone(dt.UTC) if parsed.tzinfo else None


def parse_delivery(
    body: bytes, content_type: str | None, aeg_event_type: str | None, types: EventTypes
) -> Delivery:
    """Reads one webhook POST: a validation handshake, or the actions its events call for.

    Raises PayloadTooLarge for bodies over 1 MiB and BadRequest(code="invalid_event") for anything
    malformed, anywhere in the delivery.
    """
    body = body or b""
    if len(body) > MAX_BODY_BYTES:
        raise PayloadTooLarge(f"The event delivery is larger than {MAX_BODY_BYTES} bytes.")
    media = _media_type(content_type)
    items, cloud = _top_level(_load_json(body), media)
    if not items:
        raise _invalid("The delivery holds no events.")
    if len(items) > MAX_EVENTS:
        raise _invalid(f"The delivery holds {len(items)} events; at most {MAX_EVENTS} are accepted.")
    events = [_event(i, item, cloud=cloud) for i, item in enumerate(items)]

    handshake = (aeg_event_type or "").strip().casefold() == "subscriptionvalidation"
    if handshake or any(_is(e.type, VALIDATION_EVENT) for e in events):
        return Delivery(validation_code=_validation_code(events, handshake), actions=(), ignored=0)

    custom = _custom_kinds(types)
    actions: list[Action] = []
    lifecycle: list[Lifecycle] = []
    seen: dict[str, SubscriptionSeen] = {}
    for event in events:
        notice = _lifecycle(event)
        if notice is not None:
            lifecycle.append(notice)
            continue
        action = _action(event, types, custom)
        if action is not None:
            actions.append(action)
        if _is(event.type, GRAPH_USER_DELETED) or _is(event.type, GRAPH_USER_UPDATED):
            if (sighting := _subscription_seen(event)) is not None:
                seen[sighting.subscription_id] = sighting
    return Delivery(
        validation_code=None,
        actions=tuple(actions),
        ignored=len(events) - len(actions) - len(lifecycle),
        lifecycle=tuple(lifecycle),
        subscriptions=tuple(seen.values()),
    )


def handshake_allowed_origin(headers: Mapping[str, str]) -> str | None:
    """The CloudEvents abuse-protection answer: the WebHook-Allowed-Origin value for an OPTIONS request.

    It is the sender's WebHook-Request-Origin echoed back, or None (refuse the handshake) when that
    header is missing, empty or not a plain DNS name. Header names match case-insensitively, so a
    plain dict works as well as the Functions request's headers.
    """
    origin = next((v for k, v in headers.items() if k.lower() == "webhook-request-origin"), None)
    if not isinstance(origin, str):
        return None
    origin = origin.strip()
    return origin if _HOST_NAME.match(origin) else None


def _invalid(detail: str) -> BadRequest:
    return BadRequest(detail, code="invalid_event")


def _is(event_type: str, known: str) -> bool:
    """Event types compare case-insensitively, as Event Grid's own filters do."""
    return event_type.casefold() == known.casefold()


def _string(value: Any, what: str) -> str:
    """An id or claim: a non-empty string of sane length, kept verbatim."""
    if not isinstance(value, str) or not value.strip():
        raise _invalid(f"{what} must be a non-empty string.")
    if len(value) > MAX_STRING:
        raise _invalid(f"{what} is longer than {MAX_STRING} characters.")
    return value


def _media_type(content_type: str | None) -> str:
    """The media type without parameters (`; charset=utf-8`), lower-cased; none given reads as JSON."""
    media = (content_type or "").split(";", 1)[0].strip().lower()
    if not media:
        return JSON
    if media not in (JSON, CLOUDEVENT, CLOUDEVENT_BATCH):
        raise _invalid(
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
        raise _invalid("The event delivery is not valid UTF-8 JSON.") from None


def _top_level(value: Any, media: str) -> tuple[Sequence[Any], bool]:
    """The list of raw events, and whether they are CloudEvents.

    application/json carries the Event Grid schema (an array), unless the events are recognisably
    CloudEvents (they carry `specversion`), which some publishers post as plain JSON.
    """
    if media == CLOUDEVENT:
        if not isinstance(value, dict):
            raise _invalid(f"A {CLOUDEVENT} body must be one JSON object.")
        return [value], True
    if media == CLOUDEVENT_BATCH:
        if not isinstance(value, list):
            raise _invalid(f"A {CLOUDEVENT_BATCH} body must be a JSON array.")
        return value, True
    if isinstance(value, dict) and "specversion" in value:
        return [value], True
    if not isinstance(value, list):
        raise _invalid("An Event Grid schema delivery must be a JSON array of events.")
    return value, bool(value) and isinstance(value[0], dict) and "specversion" in value[0]


def _label(index: int, item: dict) -> str:
    event_id = item.get("id")
    if isinstance(event_id, str) and event_id.strip() and len(event_id) <= MAX_STRING:
        return f"Event #{index} (id {event_id[:100]!r})"
    return f"Event #{index}"


def _event(index: int, item: Any, *, cloud: bool) -> _Event:
    """The attributes both schemas share; they differ in the type's name and CloudEvents' extras."""
    if not isinstance(item, dict):
        raise _invalid(f"Event #{index} is not a JSON object.")
    label = _label(index, item)
    if cloud:
        if item.get("specversion") != "1.0":
            raise _invalid(f'{label}: specversion must be "1.0".')
        source = _string(item.get("source"), f"{label}: source")
    else:
        # Event Grid stamps `topic` on every event it delivers (publishers cannot write it); one
        # posted straight to the webhook may lack it, and its id then stands alone.
        topic = item.get("topic")
        source = "" if topic is None else _string(topic, f"{label}: topic")
    type_key = "type" if cloud else "eventType"
    subject = item.get("subject")
    return _Event(
        label=label,
        schema=CLOUDEVENTS_SCHEMA if cloud else EVENT_GRID_SCHEMA,
        source=source,
        id=_string(item.get("id"), f"{label}: id"),
        type=_string(item.get(type_key), f"{label}: {type_key}"),
        subject=subject if isinstance(subject, str) else None,
        data=item.get("data"),
        time=_event_time(item.get("time" if cloud else "eventTime")),
    )


def _validation_code(events: list[_Event], handshake: bool) -> str:
    """The code to echo in `validationResponse`; the handshake is one event and carries its header."""
    if not handshake:
        raise _invalid(
            f"A {VALIDATION_EVENT} arrived without the header aeg-event-type: SubscriptionValidation."
        )
    if len(events) != 1 or not _is(events[0].type, VALIDATION_EVENT):
        raise _invalid(f"A SubscriptionValidation delivery must hold exactly one {VALIDATION_EVENT}.")
    event = events[0]
    data = event.data if isinstance(event.data, dict) else {}
    return _string(data.get("validationCode"), f"{event.label}: data.validationCode")


def _custom_kinds(types: EventTypes) -> dict[str, str]:
    """Custom event type (case-folded) -> kind. A type in both lists means delete, the stronger."""
    kinds = {t.casefold(): "revoke" for t in types.credentials_changed}
    kinds.update({t.casefold(): "delete" for t in types.user_deleted})
    return kinds


def _action(event: _Event, types: EventTypes, custom: dict[str, str]) -> Action | None:
    """What one event asks for, or None when it is not ours to act on."""
    if _is(event.type, GRAPH_USER_DELETED):
        kind, target = "delete", _graph_target(event)
    elif _is(event.type, GRAPH_USER_UPDATED):
        # Graph sends UserUpdated on create, on any change and on soft delete: revoking on it is a
        # policy choice (settings), and when it is off the event is simply not ours.
        if not types.revoke_on_graph_user_updated:
            return None
        kind, target = "revoke", _graph_target(event)
    elif event.type.casefold() in custom:
        kind, target = custom[event.type.casefold()], _custom_target(event)
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


def _graph_user_path(value: Any) -> str | None:
    """The object id in a Graph resource path `Users/<id>`, or None."""
    if not isinstance(value, str) or value[:6].lower() != "users/":
        return None
    object_id = value[6:]
    return object_id if object_id and "/" not in object_id else None


def _graph_target(event: _Event) -> EventTarget:
    """Tenant and object id of a Microsoft Graph user change notification.

    As Graph delivers it (CloudEvents from a partner topic), `data.resourceData` holds `id` (the
    user's object id) and `organizationId` (the tenant); `subject` and `data.resource` are
    `Users/<id>` and `data.tenantId` repeats the tenant, so those serve when resourceData lacks them.
    """
    data = event.data
    if not isinstance(data, dict):
        raise _invalid(f"{event.label}: a {event.type} event needs data as a JSON object.")
    resource = data.get("resourceData")
    if resource is None:
        resource = {}
    if not isinstance(resource, dict):
        raise _invalid(f"{event.label}: data.resourceData must be a JSON object.")
    object_id = resource.get("id")
    if object_id is None:
        object_id = _graph_user_path(event.subject) or _graph_user_path(data.get("resource"))
    tenant_id = resource.get("organizationId")
    if tenant_id is None:
        tenant_id = data.get("tenantId")
    return EventTarget(
        tenant_id=_string(tenant_id, f"{event.label}: tenant id (data.resourceData.organizationId)"),
        object_id=_string(object_id, f"{event.label}: user object id (data.resourceData.id)"),
    )


def _timestamp(value: Any) -> dt.datetime | None:
    """An RFC 3339 date-time with a zone (Graph writes 7 fractional digits and Z), else None."""
    if not isinstance(value, str) or "T" not in value or len(value) > 64:
        return None
    try:
        stamp = dt.datetime.fromisoformat(value)
    except ValueError:
        return None
    return stamp.astimezone(dt.UTC) if stamp.tzinfo is not None else None


def _lifecycle(event: _Event) -> Lifecycle | None:
    """A Graph lifecycle notification, or None when the event is not one.

    `data.lifecycleEvent` (reauthorizationRequired, subscriptionRemoved, missed) decides on any
    Microsoft.Graph type; the two type names Event Grid uses stand for it when it is missing. The
    subscription id is required: without it there is nothing to renew (400, and a dead letter).
    """
    if not event.type.casefold().startswith("microsoft.graph."):
        return None
    data = event.data if isinstance(event.data, dict) else None
    named = {e.casefold(): e for e in LIFECYCLE_EVENTS}.get(
        str((data or {}).get("lifecycleEvent", "")).casefold()
    )
    if named is None:
        if _is(event.type, GRAPH_REAUTHORIZATION_REQUIRED):
            named = REAUTHORIZATION_REQUIRED
        elif _is(event.type, GRAPH_SUBSCRIPTION_REMOVED):
            named = SUBSCRIPTION_REMOVED
        else:
            return None
    if data is None:
        raise _invalid(f"{event.label}: a {event.type} lifecycle notification needs data as a JSON object.")
    expiry = data.get("subscriptionExpirationDateTime")
    expires_at = _timestamp(expiry)
    if expiry is not None and expires_at is None:
        raise _invalid(f"{event.label}: data.subscriptionExpirationDateTime is not an RFC 3339 date-time.")
    return Lifecycle(
        event_id=event.id,
        event_type=event.type,
        lifecycle_event=named,
        subscription_id=_string(data.get("subscriptionId"), f"{event.label}: data.subscriptionId"),
        expires_at=expires_at,
        schema=event.schema,
        source=event.source,
    )


def _subscription_seen(event: _Event) -> SubscriptionSeen | None:
    """The subscription a Graph user event came through (data.subscriptionId and its expiry, as the
    Microsoft Entra events page shows them). Lenient: bookkeeping never turns an event away."""
    data = event.data if isinstance(event.data, dict) else {}
    subscription_id, expires_at = (
        data.get("subscriptionId"),
        _timestamp(data.get("subscriptionExpirationDateTime")),
    )
    if (
        not isinstance(subscription_id, str)
        or not subscription_id.strip()
        or len(subscription_id) > MAX_STRING
    ):
        return None
    return SubscriptionSeen(subscription_id, expires_at) if expires_at is not None else None


def _custom_target(event: _Event) -> EventTarget:
    """The app user ({issuer, subject}) or ACS identity ({communicationUserId}) a custom event names.

    Exactly one form must be given: with both, the event would be ambiguous about whom to act on.
    Null members count as absent, as serialisers of optional fields tend to write them.
    """
    data = event.data
    if not isinstance(data, dict):
        raise _invalid(f'{event.label}: data must be {{"issuer", "subject"}} or {{"communicationUserId"}}.')
    app_user = data.get("issuer") is not None or data.get("subject") is not None
    identity = data.get("communicationUserId") is not None
    if app_user and identity:
        raise _invalid(f"{event.label}: data names both an app user and a communicationUserId; give one.")
    if identity:
        return EventTarget(
            communication_user_id=_string(
                data["communicationUserId"], f"{event.label}: data.communicationUserId"
            )
        )
    if app_user:
        return EventTarget(
            issuer=_string(data.get("issuer"), f"{event.label}: data.issuer"),
            subject=_string(data.get("subject"), f"{event.label}: data.subject"),
        )
    raise _invalid(f'{event.label}: data must be {{"issuer", "subject"}} or {{"communicationUserId"}}.')
