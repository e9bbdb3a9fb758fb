"""Event Grid and Microsoft Graph events: what a delivery holds (`model.py`), one parser a schema
(`cloudevents.py`, `eventgrid.py`; `graph_notifications.py` and `custom_events.py` for the payloads)
and `delivery.py`, which reads one webhook POST whole or refuses it whole.
"""

from .cloudevents import handshake_allowed_origin
from .delivery import parse_delivery
from .model import MISSED, Action, Delivery, EventTarget, EventTypes, Lifecycle, SubscriptionSeen

__all__ = [
    "MISSED",
    "Action",
    "Delivery",
    "EventTarget",
    "EventTypes",
    "Lifecycle",
    "SubscriptionSeen",
    "handshake_allowed_origin",
    "parse_delivery",
]
