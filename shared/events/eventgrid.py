"""The Event Grid event schema: the event's attributes, and the SubscriptionValidation handshake."""

from __future__ import annotations

from .model import EVENT_GRID_SCHEMA, Event, envelope, invalid, is_type, required_string

JSON = "application/json"
VALIDATION_EVENT = "Microsoft.EventGrid.SubscriptionValidationEvent"


def read_eventgrid_event(item: dict, label: str) -> Event:
    """An Event Grid schema event's attributes: `topic` with `id` is what is unique."""
    # Event Grid stamps `topic` on every event it delivers (publishers cannot write it); one
    # posted straight to the webhook may lack it, and its id then stands alone.
    topic = item.get("topic")
    source = "" if topic is None else required_string(topic, f"{label}: topic")
    return envelope(
        item, label=label, schema=EVENT_GRID_SCHEMA, source=source, type_key="eventType", time_key="eventTime"
    )


def validation_code(events: list[Event], handshake: bool) -> str:
    """The code to echo in `validationResponse`; the handshake is one event and carries its header."""
    if not handshake:
        raise invalid(
            f"A {VALIDATION_EVENT} arrived without the header aeg-event-type: SubscriptionValidation."
        )
    if len(events) != 1 or not is_type(events[0].type, VALIDATION_EVENT):
        raise invalid(f"A SubscriptionValidation delivery must hold exactly one {VALIDATION_EVENT}.")
    event = events[0]
    data = event.data if isinstance(event.data, dict) else {}
    return required_string(data.get("validationCode"), f"{event.label}: data.validationCode")
