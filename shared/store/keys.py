"""Table Storage keys for app users and ACS identities.

Keys are hashes, not the raw values: a `sub` may hold any character (Table keys forbid / \\ # ?
and control characters) and be long; hashing the length-prefixed issuer with the subject makes
keys fixed-size, always legal, and unable to collide across issuers ("a|b" + "c" vs "a" + "b|c").
"""

from __future__ import annotations

import base64
import hashlib

IDENTITY_ROW = "identity"
DELETED_ROW = "deleted"  # beside the mapping: when and why the user's last identity was deleted


def _digest(*parts: str) -> str:
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8", "surrogatepass")
        h.update(len(data).to_bytes(8, "big"))
        h.update(data)
    return base64.urlsafe_b64encode(h.digest()).rstrip(b"=").decode("ascii")


def user_key(issuer: str, subject: str) -> str:
    """PartitionKey of an app user's mapping row."""
    return "u-" + _digest(issuer, subject)


# The index: every row that looks an identity up by something other than its user lives in one
# partition, so a first issue files all of them in one entity-group transaction (atomic, one
# request). Its load is bounded: first issues, and the cleanup timer's moves.
INDEX_PARTITION = "index"
RETENTION_PREFIX = "d-"


def owner_row(communication_user_id: str) -> str:
    """Index row of the reverse lookup: ACS identity -> app user."""
    return "c-" + _digest(communication_user_id)


def graph_prefix(tenant_id: str, object_id: str) -> str:
    """Index rows of an Entra user (tid, oid), one per app user key it signed in as: Graph events
    name the Entra user, and a `sub` differs per app, so one person may have several keys."""
    return "o-" + _digest(tenant_id.lower(), object_id.lower()) + "."


def graph_row(tenant_id: str, object_id: str, user_key: str) -> str:
    """Index row of the Entra lookup: (tid, oid) from Graph events -> this app user."""
    return graph_prefix(tenant_id, object_id) + user_key


def ended_user_row(user_key: str) -> str:
    """Index row saying an event ended this app user's sessions (and when)."""
    return "x-u-" + _digest(user_key)


def ended_entra_row(tenant_id: str, object_id: str) -> str:
    """Index row saying an event ended this Entra user's sessions, under every app user key,
    including keys that have no identity yet."""
    return "x-o-" + _digest(tenant_id.lower(), object_id.lower())


def prefix_end(prefix: str) -> str:
    """The least key above every key that starts with `prefix`, for a key-range query."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


def retention_row(day: str, user_key: str, communication_user_id: str) -> str:
    """Index row saying this user had this identity, last known used on `day` (YYYY-MM-DD).

    Rows sort by day, so the stale ones are one key-range scan; one row per (user, identity), so two
    racing first requests file distinct rows.
    """
    return f"{RETENTION_PREFIX}{day}.{user_key}.{_digest(communication_user_id)}"


def retention_bound(day: str) -> str:
    """Every retention row of a day before `day` sorts below this key, and no other."""
    return RETENTION_PREFIX + day


PENDING_PARTITION = "pending"
EVENTS_PARTITION = "events"


def pending_row(user_key: str, communication_user_id: str, op: str) -> str:
    """A newer request of the same kind for the same identity replaces an older one; a revoke
    never replaces a pending delete, and another identity's work stays."""
    return f"{user_key}.{_digest(communication_user_id)}.{op}"


def discard_row(communication_user_id: str) -> str:
    """Pending-queue row for an ACS identity nobody maps to (a lost creation race)."""
    return "x-" + _digest(communication_user_id)


# The webhook's marks in the events partition: an event acted on, and one identity's part of a
# Microsoft Graph event (a Graph user may have several identities). Each kind has a key space of
# its own, a prefix and a digest of length-prefixed parts, so nothing an event says (its id, its
# source) can name a mark of the other kind, or another event's. Marks of the first format
# ("e-" + digest(id), and "e-" + digest("<id>/<user key>")) are never read again: a redelivery of
# an event marked that way acts once more (a revoke or delete repeated), and cleanup drops them
# with every mark once they are older than its EVENT_MEMORY (7 days).
EVENT_MARK_PREFIX = "ev-"
IDENTITY_MARK_PREFIX = "ei-"


def event_mark(schema: str, source: str, event_id: str) -> str:
    """Row of an event acted on, keyed on what its schema makes unique.

    CloudEvents 1.0: "Producers MUST ensure that source + id is unique for each distinct event";
    an id alone is unique only within its source, so two publishers may both send id "1". The
    Event Grid schema has no source: its `topic`, which Event Grid stamps on every event it
    delivers, takes that part. The schema is a part too, so the two never share a namespace.
    """
    return EVENT_MARK_PREFIX + _digest(schema, source, event_id)


def identity_mark(schema: str, source: str, event_id: str, user_key: str) -> str:
    """Row of one identity (by app user key) done for an event, so that a retry of an event that
    failed for some of a Graph user's identities acts only on the others."""
    return IDENTITY_MARK_PREFIX + _digest(schema, source, event_id, user_key)


# The Microsoft Graph change-notification subscription the service keeps alive: one row, read by
# /api/health and the cleanup timer, written by the webhook (lifecycle events) and the timer.
GRAPH_SUBSCRIPTION_PARTITION = "graph-subscription"
GRAPH_SUBSCRIPTION_ROW = "current"
