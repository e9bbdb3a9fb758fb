"""Table Storage keys for app users and ACS identities.

Keys are hashes, not the raw values: a `sub` may hold any character (Table keys forbid / \\ # ?
and control characters) and be long; hashing the length-prefixed issuer with the subject makes
keys fixed-size, always legal, and unable to collide across issuers ("a|b" + "c" vs "a" + "b|c").
"""

from __future__ import annotations

import base64
import hashlib

IDENTITY_ROW = "identity"
OWNER_ROW = "owner"


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


def communication_user_key(communication_user_id: str) -> str:
    """PartitionKey of the reverse-lookup row: ACS identity -> app user."""
    return "c-" + _digest(communication_user_id)


def graph_user_key(tenant_id: str, object_id: str) -> str:
    """PartitionKey of the Entra lookup row: (tid, oid) from Graph events -> app user."""
    return "o-" + _digest(tenant_id.lower(), object_id.lower())


def retention_partition(day: str) -> str:
    """Identities last known to be used on `day` (YYYY-MM-DD): range-scannable by age."""
    return "d-" + day


def retention_row(user_key: str, communication_user_id: str) -> str:
    """One row per (user, ACS identity): two racing first requests file distinct rows."""
    return f"{user_key}.{_digest(communication_user_id)}"


RETENTION_PREFIX = "d-"
PENDING_PARTITION = "pending"
EVENTS_PARTITION = "events"
USER_ROW = "user"


def pending_row(user_key: str, communication_user_id: str, op: str) -> str:
    """A newer request of the same kind for the same identity replaces an older one; a revoke
    never replaces a pending delete, and another identity's work stays."""
    return f"{user_key}.{_digest(communication_user_id)}.{op}"


def discard_row(communication_user_id: str) -> str:
    """Pending-queue row for an ACS identity nobody maps to (a lost creation race)."""
    return "x-" + _digest(communication_user_id)


def event_row(event_id: str) -> str:
    return "e-" + _digest(event_id)
