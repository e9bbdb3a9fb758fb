"""What a webhook delivery means once parsed, and the checks every schema's parser shares.

Pure: no I/O, no settings reads. A malformed event raises `BadRequest(code=Code.INVALID_EVENT)`.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import Any, Literal

from ..errors import BadRequest, Code

MAX_STRING = 1024

# The schemas, as parts of an event's identity: each guarantees uniqueness of its own attributes.
CLOUDEVENTS_SCHEMA = "cloudevents"
EVENT_GRID_SCHEMA = "eventgrid"

# What a Microsoft Graph lifecycle notification's data.lifecycleEvent says (graph_notifications.py).
REAUTHORIZATION_REQUIRED, SUBSCRIPTION_REMOVED, MISSED = (
    "reauthorizationRequired",
    "subscriptionRemoved",
    "missed",
)
LIFECYCLE_EVENTS = (REAUTHORIZATION_REQUIRED, SUBSCRIPTION_REMOVED, MISSED)


@dataclass(frozen=True)
class EventTarget:
    """Whom an event is about; exactly one form is set."""

    tenant_id: str | None = None  # Microsoft Graph users: tenant + object id
    object_id: str | None = None
    issuer: str | None = None  # custom app events: the app user, as the caller's token names it
    subject: str | None = None
    communication_user_id: str | None = None  # custom app events: the ACS identity itself


Kind = Literal["delete", "revoke"]  # what an event asks for: a delete also revokes


@dataclass(frozen=True)
class Action:
    """What one event asks for. It is acted on once: (schema, source, event_id) names it, as its
    schema makes only that unique (CloudEvents: source + id; an id alone is not)."""

    event_id: str  # Event Grid id / CloudEvents id
    kind: Kind
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
    # Bookkeeping, not an action: which Graph subscriptions user events came through (shared/graph/).
    subscriptions: tuple[SubscriptionSeen, ...] = field(default=(), compare=False)


@dataclass(frozen=True)
class EventTypes:
    """Which event types mean what, from settings."""

    user_deleted: tuple[str, ...] = ()  # custom app event types meaning "user deleted"
    credentials_changed: tuple[str, ...] = ()  # custom types meaning "credentials changed" (-> revoke)
    revoke_on_graph_user_updated: bool = True


@dataclass(frozen=True)
class Event:
    """The attributes the parsers need, the same for both schemas."""

    label: str  # names the event in error details
    schema: str  # CLOUDEVENTS_SCHEMA | EVENT_GRID_SCHEMA
    source: str  # CloudEvents `source`, Event Grid schema `topic`: with the id, what is unique
    id: str
    type: str
    subject: str | None
    data: Any  # None when the event carries no data
    time: dt.datetime | None = None


def envelope(item: dict, *, label: str, schema: str, source: str, type_key: str, time_key: str) -> Event:
    """The attributes both schemas share; they differ in the names of type and time."""
    subject = item.get("subject")
    return Event(
        label=label,
        schema=schema,
        source=source,
        id=required_string(item.get("id"), f"{label}: id"),
        type=required_string(item.get(type_key), f"{label}: {type_key}"),
        subject=subject if isinstance(subject, str) else None,
        data=item.get("data"),
        time=_event_time(item.get(time_key)),
    )


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


def invalid(detail: str) -> BadRequest:
    return BadRequest(detail, code=Code.INVALID_EVENT)


def is_type(event_type: str, known: str) -> bool:
    """Event types compare case-insensitively, as Event Grid's own filters do."""
    return event_type.casefold() == known.casefold()


def required_string(value: Any, what: str) -> str:
    """An id or claim: a non-empty string of sane length, kept verbatim."""
    if not isinstance(value, str) or not value.strip():
        raise invalid(f"{what} must be a non-empty string.")
    if len(value) > MAX_STRING:
        raise invalid(f"{what} is longer than {MAX_STRING} characters.")
    return value
