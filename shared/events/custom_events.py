"""The app's own events: which custom types mean what (settings), and whom each one names."""

from __future__ import annotations

from .model import Event, EventTarget, EventTypes, Kind, invalid, required_string


def custom_kinds(types: EventTypes) -> dict[str, Kind]:
    """Custom event type (case-folded) -> kind. A type in both lists means delete, the stronger."""
    kinds: dict[str, Kind] = {t.casefold(): "revoke" for t in types.credentials_changed}
    kinds.update({t.casefold(): "delete" for t in types.user_deleted})
    return kinds


def custom_target(event: Event) -> EventTarget:
    """The app user ({issuer, subject}) or ACS identity ({communicationUserId}) a custom event names.

    Exactly one form must be given: with both, the event would be ambiguous about whom to act on.
    Null members count as absent, as serialisers of optional fields tend to write them.
    """
    data = event.data
    if not isinstance(data, dict):
        raise invalid(f'{event.label}: data must be {{"issuer", "subject"}} or {{"communicationUserId"}}.')
    app_user = data.get("issuer") is not None or data.get("subject") is not None
    identity = data.get("communicationUserId") is not None
    if app_user and identity:
        raise invalid(f"{event.label}: data names both an app user and a communicationUserId; give one.")
    if identity:
        return EventTarget(
            communication_user_id=required_string(
                data["communicationUserId"], f"{event.label}: data.communicationUserId"
            )
        )
    if app_user:
        return EventTarget(
            issuer=required_string(data.get("issuer"), f"{event.label}: data.issuer"),
            subject=required_string(data.get("subject"), f"{event.label}: data.subject"),
        )
    raise invalid(f'{event.label}: data must be {{"issuer", "subject"}} or {{"communicationUserId"}}.')
