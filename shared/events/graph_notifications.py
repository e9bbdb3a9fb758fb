"""Microsoft Graph change and lifecycle notifications on users, as Event Grid delivers them.

Change notifications (UserDeleted, UserUpdated) name the user by tenant and object id. Lifecycle
notifications come through the partner topic the subscription's lifecycleNotificationUrl names. For
users Graph sends only reauthorizationRequired ("Reduce missing subscriptions and change
notifications", Microsoft Learn: subscriptionRemoved and missed are for Outlook and Teams
resources); Event Grid names it as below ("Receive Microsoft Graph API change events through Azure
Event Grid"). Every lifecycle notification carries data.lifecycleEvent, which is what decides here,
so the other two are understood whatever type name they arrive under.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from .model import (
    LIFECYCLE_EVENTS,
    MAX_STRING,
    REAUTHORIZATION_REQUIRED,
    SUBSCRIPTION_REMOVED,
    Event,
    EventTarget,
    Lifecycle,
    SubscriptionSeen,
    invalid,
    is_type,
    required_string,
)

GRAPH_USER_DELETED = "Microsoft.Graph.UserDeleted"
GRAPH_USER_UPDATED = "Microsoft.Graph.UserUpdated"
GRAPH_REAUTHORIZATION_REQUIRED = "Microsoft.Graph.SubscriptionReauthorizationRequired"
GRAPH_SUBSCRIPTION_REMOVED = "Microsoft.Graph.SubscriptionRemoved"


def is_user_event(event: Event) -> bool:
    """A change notification on a user: the events Graph subscriptions deliver."""
    return is_type(event.type, GRAPH_USER_DELETED) or is_type(event.type, GRAPH_USER_UPDATED)


def _graph_user_path(value: Any) -> str | None:
    """The object id in a Graph resource path `Users/<id>`, or None."""
    if not isinstance(value, str) or value[:6].lower() != "users/":
        return None
    object_id = value[6:]
    return object_id if object_id and "/" not in object_id else None


def graph_target(event: Event) -> EventTarget:
    """Tenant and object id of a Microsoft Graph user change notification.

    As Graph delivers it (CloudEvents from a partner topic), `data.resourceData` holds `id` (the
    user's object id) and `organizationId` (the tenant); `subject` and `data.resource` are
    `Users/<id>` and `data.tenantId` repeats the tenant, so those serve when resourceData lacks them.
    """
    data = event.data
    if not isinstance(data, dict):
        raise invalid(f"{event.label}: a {event.type} event needs data as a JSON object.")
    resource = data.get("resourceData")
    if resource is None:
        resource = {}
    if not isinstance(resource, dict):
        raise invalid(f"{event.label}: data.resourceData must be a JSON object.")
    object_id = resource.get("id")
    if object_id is None:
        object_id = _graph_user_path(event.subject) or _graph_user_path(data.get("resource"))
    tenant_id = resource.get("organizationId")
    if tenant_id is None:
        tenant_id = data.get("tenantId")
    return EventTarget(
        tenant_id=required_string(tenant_id, f"{event.label}: tenant id (data.resourceData.organizationId)"),
        object_id=required_string(object_id, f"{event.label}: user object id (data.resourceData.id)"),
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


def lifecycle_notice(event: Event) -> Lifecycle | None:
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
        if is_type(event.type, GRAPH_REAUTHORIZATION_REQUIRED):
            named = REAUTHORIZATION_REQUIRED
        elif is_type(event.type, GRAPH_SUBSCRIPTION_REMOVED):
            named = SUBSCRIPTION_REMOVED
        else:
            return None
    if data is None:
        raise invalid(f"{event.label}: a {event.type} lifecycle notification needs data as a JSON object.")
    expiry = data.get("subscriptionExpirationDateTime")
    expires_at = _timestamp(expiry)
    if expiry is not None and expires_at is None:
        raise invalid(f"{event.label}: data.subscriptionExpirationDateTime is not an RFC 3339 date-time.")
    return Lifecycle(
        event_id=event.id,
        event_type=event.type,
        lifecycle_event=named,
        subscription_id=required_string(data.get("subscriptionId"), f"{event.label}: data.subscriptionId"),
        expires_at=expires_at,
        schema=event.schema,
        source=event.source,
    )


def subscription_seen(event: Event) -> SubscriptionSeen | None:
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
