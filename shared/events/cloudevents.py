"""CloudEvents 1.0 over HTTP: the event's attributes, and the webhook handshake (an OPTIONS request)."""

from __future__ import annotations

import re
from collections.abc import Mapping

from .model import CLOUDEVENTS_SCHEMA, Event, envelope, invalid, required_string

CLOUDEVENT = "application/cloudevents+json"
CLOUDEVENT_BATCH = "application/cloudevents-batch+json"

# WebHook-Request-Origin is a DNS name (CloudEvents HTTP webhook spec); it is echoed back in a response
# header, so nothing but a plain host name may pass (no CR/LF, commas, spaces or URLs).
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOST_NAME = re.compile(rf"(?=.{{1,253}}\Z){_LABEL}(?:\.{_LABEL})*\Z")


def read_cloudevent(item: dict, label: str) -> Event:
    """A CloudEvent's attributes: `source` with `id` is what the spec makes unique."""
    if item.get("specversion") != "1.0":
        raise invalid(f'{label}: specversion must be "1.0".')
    source = required_string(item.get("source"), f"{label}: source")
    return envelope(
        item, label=label, schema=CLOUDEVENTS_SCHEMA, source=source, type_key="type", time_key="time"
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
