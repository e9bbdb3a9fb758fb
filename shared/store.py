"""The identity map in Azure Table Storage: app user <-> ACS identity.

Rows (one table):
- mapping `PK=user_key(issuer, sub), RK="identity"`: the ACS id, who it belongs to, oid/tid,
  when it was created and last used. One point read answers every token request.
- owner `PK=communication_user_key(id), RK="owner"`: the reverse lookup for events and admins.
  It is written *before* the mapping, so an owner row whose user's mapping names another id marks
  an identity that lost a creation race or was left mid-way: cleanup can find and delete it.

Creation is race-safe because the mapping insert is an insert, not an upsert: of two concurrent
first requests exactly one wins; the loser removes what it made and uses the winner's identity.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from dataclasses import dataclass

from azure.core.exceptions import ResourceExistsError, ResourceNotFoundError
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from .keys import IDENTITY_ROW, OWNER_ROW, communication_user_key


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

    def to_entity(self) -> dict:
        entity = {
            "PartitionKey": self.user_key,
            "RowKey": IDENTITY_ROW,
            "communicationUserId": self.communication_user_id,
            "issuer": self.issuer,
            "subject": self.subject,
            "createdAt": self.created_at,
            "lastUsedOn": self.last_used_on,
            "lastIssuedAt": self.last_issued_at,
        }
        if self.object_id:
            entity["oid"] = self.object_id
        if self.tenant_id:
            entity["tid"] = self.tenant_id
        return entity

    @classmethod
    def from_entity(cls, entity: dict) -> IdentityRecord:
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
        )


class IdentityStore:
    def __init__(self, table: TableClient) -> None:
        self.table = table
        self._ready = False
        self._ready_lock = asyncio.Lock()

    async def _ensure_table(self) -> None:
        """Create the table once per worker; infra may have made it already."""
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                try:
                    await self.table.create_table()
                except ResourceExistsError:
                    pass
                self._ready = True

    async def get(self, user_key: str) -> IdentityRecord | None:
        await self._ensure_table()
        try:
            entity = await self.table.get_entity(user_key, IDENTITY_ROW)
        except ResourceNotFoundError:
            return None
        return IdentityRecord.from_entity(entity)

    async def add(self, record: IdentityRecord) -> bool:
        """Insert owner then mapping. False when another request mapped this user first."""
        await self._ensure_table()
        owner = {
            "PartitionKey": communication_user_key(record.communication_user_id),
            "RowKey": OWNER_ROW,
            "communicationUserId": record.communication_user_id,
            "userKey": record.user_key,
            "createdAt": record.created_at,
        }
        await self.table.upsert_entity(owner, mode=UpdateMode.REPLACE)
        try:
            await self.table.create_entity(record.to_entity())
        except ResourceExistsError:
            await self.forget_owner(record.communication_user_id)
            return False
        return True

    async def forget_owner(self, communication_user_id: str) -> None:
        try:
            await self.table.delete_entity(communication_user_key(communication_user_id), OWNER_ROW)
        except ResourceNotFoundError:
            pass

    async def touch(self, record: IdentityRecord, now: dt.datetime) -> None:
        """Record use (issue or refresh) once per day: the retention cleanup reads it."""
        await self.table.update_entity(
            {
                "PartitionKey": record.user_key,
                "RowKey": IDENTITY_ROW,
                "lastUsedOn": now.date().isoformat(),
                "lastIssuedAt": now,
            },
            mode=UpdateMode.MERGE,
        )

    async def owner_of(self, communication_user_id: str) -> str | None:
        await self._ensure_table()
        try:
            entity = await self.table.get_entity(communication_user_key(communication_user_id), OWNER_ROW)
        except ResourceNotFoundError:
            return None
        return entity["userKey"]

    async def ping(self) -> None:
        """A cheap round trip for health checks (a point read that usually finds nothing)."""
        await self._ensure_table()
        try:
            await self.table.get_entity("health", "probe")
        except ResourceNotFoundError:
            pass
