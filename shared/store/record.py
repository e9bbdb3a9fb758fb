"""The mapping row, `PK=user_key(issuer, sub), RK="identity"`: one app user's ACS identity, and the
pending state that may block its tokens. One point read answers every token request."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Literal

from .. import telemetry
from . import keys
from .table import Entity, Table

# "" none; "revoke", "delete" a request's (blocks); "retire" retention's claim (never blocks);
# "retiring" retention committed (blocks; any request's revoke or delete replaces it)
PendingState = Literal["", "revoke", "delete", "retire", "retiring"]
# Why a mapping was removed: what the user's next refresh is told (shared/tokens.py).
DeletionReason = Literal["user", "admin", "event", "retired", "gone", "deleted"]
BLOCKING: tuple[PendingState, ...] = ("revoke", "delete", "retiring")  # refuse new tokens (409)


@dataclass(frozen=True)
class IdentityRecord:
    user_key: str
    communication_user_id: str
    issuer: str
    subject: str
    created_at: dt.datetime
    last_used_on: str  # YYYY-MM-DD, UTC; written at most once a day
    last_issued_at: dt.datetime
    object_id: str | None = None
    tenant_id: str | None = None
    pending: PendingState = ""
    pending_id: str = ""
    sessions_ended_at: dt.datetime | None = None  # an event ended the user's sessions then
    # Its tokens were revoked then: no token issued before may be answered again (shared/storm.py).
    tokens_revoked_at: dt.datetime | None = None
    # False from the mapping insert until its first issue looked for an event that came meanwhile
    sessions_checked: bool = True
    etag: str | None = None

    def to_entity(self) -> dict[str, Any]:
        entity: dict[str, Any] = {
            "PartitionKey": self.user_key,
            "RowKey": keys.IDENTITY_ROW,
            "communicationUserId": self.communication_user_id,
            "issuer": self.issuer,
            "subject": self.subject,
            "createdAt": self.created_at,
            "lastUsedOn": self.last_used_on,
            "lastIssuedAt": self.last_issued_at,
            "pending": self.pending,
            "pendingId": self.pending_id,
        }
        if self.object_id:
            entity["oid"] = self.object_id
        if self.tenant_id:
            entity["tid"] = self.tenant_id
        if self.sessions_ended_at:
            entity["sessionsEndedAt"] = self.sessions_ended_at
        if self.tokens_revoked_at:
            entity["tokensRevokedAt"] = self.tokens_revoked_at
        if not self.sessions_checked:
            entity["sessionsUnchecked"] = True
        return entity

    @classmethod
    def from_entity(cls, entity: dict[str, Any]) -> IdentityRecord:
        return cls(
            user_key=entity["PartitionKey"],
            communication_user_id=entity["communicationUserId"],
            issuer=entity.get("issuer", ""),
            subject=entity.get("subject", ""),
            created_at=entity["createdAt"],
            last_used_on=entity.get("lastUsedOn", ""),
            last_issued_at=entity.get("lastIssuedAt", entity["createdAt"]),
            object_id=entity.get("oid"),
            tenant_id=entity.get("tid"),
            pending=entity.get("pending", ""),
            pending_id=entity.get("pendingId", ""),
            sessions_ended_at=entity.get("sessionsEndedAt") or None,
            tokens_revoked_at=entity.get("tokensRevokedAt") or None,
            sessions_checked=not entity.get("sessionsUnchecked", False),
            etag=entity.metadata.get("etag") if hasattr(entity, "metadata") else None,
        )


def owner_entity(record: IdentityRecord) -> Entity:
    """The reverse lookup of a new identity: its ACS id -> its user."""
    return {
        "PartitionKey": keys.INDEX_PARTITION,
        "RowKey": keys.owner_row(record.communication_user_id),
        "communicationUserId": record.communication_user_id,
        "userKey": record.user_key,
        "createdAt": record.created_at,
    }


@telemetry.table_operation("get")
async def read_mapping(table: Table, user_key: str) -> IdentityRecord | None:
    """The user's mapping, None when they have none: the one read every store here shares."""
    entity = await table.get(user_key, keys.IDENTITY_ROW)
    return IdentityRecord.from_entity(entity) if entity is not None else None
