"""The index's lookups, and the notes beside a user's mapping.

- owner `RK=owner_row(id)`: ACS id -> app user, for admins and events. Filed *before* the
  mapping, so every mapping has one; an owner row whose user's mapping names another id is a
  leftover, and lookups through it check the mapping.
- graph `RK=graph_row(tid, oid, user_key)`: Entra (tenant, object id) -> app user, for Microsoft
  Graph events, which name users that way; one row per app user key, so a person who signed in
  to two apps (two `sub`s) is found under both, by one key-range query. Not written when users
  are keyed by object id (`Settings.object_id_issuer`): the event then names the mapping itself
  (`graph_users` answers the mappings either way).
  It goes once the user has no mapping: with `Identities.remove`, or, after a first issue that
  never got its mapping, with cleanup's sweep (the retention entry names it), never in the hot
  window where a concurrent first request of the same user may need it.
- ended sessions `RK=ended_user_row(user_key) | ended_entra_row(tid, oid)`: when an event ended
  a user's sessions, including users with no identity yet.
- deletion note `PK=user_key, RK="deleted"`: when and why the user's last identity was deleted.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Callable
from typing import Any

from .. import telemetry
from . import keys
from .errors import Changed, Missing
from .record import IdentityRecord, read_mapping
from .table import Entity, Table


def graph_entity(graph_row: str, user_key: str) -> Entity:
    """The Entra user's lookup row for one of their app user keys."""
    return {"PartitionKey": keys.INDEX_PARTITION, "RowKey": graph_row, "userKey": user_key}


class Lookups:
    def __init__(
        self,
        table: Table,
        *,
        object_id_issuer: str | None = None,
        object_id_issuers: Callable[[str], tuple[str, ...]] | None = None,
    ) -> None:
        self.table = table
        self.object_id_issuer = object_id_issuer
        # With several issuers (AUTH_ISSUERS), every Entra user has a lookup row; users of issuers
        # keyed by object id are also looked for directly, so that mappings made before their rows
        # were written (under AUTH_ISSUER with AUTH_USER_CLAIM=oid) are found too.
        self.object_id_issuers = object_id_issuers

    def graph_row(self, record: IdentityRecord) -> str | None:
        """The user's Graph lookup row, when Graph events need one to find them."""
        if record.object_id and record.tenant_id and self.object_id_issuer is None:
            return keys.graph_row(record.tenant_id, record.object_id, record.user_key)
        return None

    # ---- owners -------------------------------------------------------------------------------------

    @telemetry.table_operation("owner_of")
    async def owner_of(self, communication_user_id: str) -> str | None:
        entity = await self.table.get(keys.INDEX_PARTITION, keys.owner_row(communication_user_id))
        return entity["userKey"] if entity is not None else None

    @telemetry.table_operation("forget_owner")
    async def forget_owner(self, communication_user_id: str) -> None:
        await self.table.delete(keys.INDEX_PARTITION, keys.owner_row(communication_user_id))

    # ---- Entra users ----------------------------------------------------------------------------------

    async def graph_user_keys(self, tenant_id: str, object_id: str) -> list[str]:
        """The app user keys the Entra user's Graph rows name: hints, for the caller to check
        against each mapping."""
        prefix = keys.graph_prefix(tenant_id, object_id)
        query = "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi"
        params = {"p": keys.INDEX_PARTITION, "lo": prefix, "hi": keys.prefix_end(prefix)}
        return [row["userKey"] async for row in self.table.query(query, params, select=["userKey"])]

    @telemetry.table_operation("graph_users")
    async def graph_users(self, tenant_id: str, object_id: str) -> list[IdentityRecord]:
        """The mappings of the Entra user a Microsoft Graph event names: one per app user key."""
        object_id_issuer = self.object_id_issuer
        if object_id_issuer is None:
            user_keys = await self.graph_user_keys(tenant_id, object_id)
            for issuer in self.object_id_issuers(tenant_id) if self.object_id_issuers else ():
                user_keys += [
                    keys.user_key(issuer, oid) for oid in dict.fromkeys((object_id, object_id.lower()))
                ]
            user_keys = list(dict.fromkeys(user_keys))
            found = await asyncio.gather(*(read_mapping(self.table, key) for key in user_keys))
            # A row is a hint: act only on a mapping recorded for this very Entra user.
            return [
                record
                for record in found
                if record is not None
                and (record.tenant_id or "").lower() == tenant_id.lower()
                and (record.object_id or "").lower() == object_id.lower()
            ]
        # Object ids are GUIDs: tokens and Graph both write them in lower case, but be lenient.
        for candidate in dict.fromkeys((object_id, object_id.lower())):
            record = await read_mapping(self.table, keys.user_key(object_id_issuer, candidate))
            if record is not None:
                # Object ids are unique across tenants; checking the tenant costs nothing.
                return [record] if (record.tenant_id or "").lower() == tenant_id.lower() else []
        return []

    @telemetry.table_operation("forget_graph_row")
    async def forget_graph_row(self, user_key: str, graph_row: str) -> None:
        """Drop a user's Graph lookup row once they have no mapping.

        Read the row, then the mapping, then delete only the row as read: a first issue that filed
        it again after the first read keeps it. One that filed it before and inserts its mapping
        after the second read loses it; `Retention.move_forward` writes it again for users still
        active.
        """
        entity = await self.table.get(keys.INDEX_PARTITION, graph_row)
        if entity is None or await self.table.get(user_key, keys.IDENTITY_ROW) is not None:
            return
        try:
            await self.table.delete(keys.INDEX_PARTITION, graph_row, etag=entity.metadata["etag"])
        except Changed:
            pass

    # ---- sessions an event ended ------------------------------------------------------------------

    @telemetry.table_operation("end_sessions")
    async def end_sessions(
        self,
        when: dt.datetime,
        reason: str,
        *,
        user_keys: list[str],
        entra: tuple[str, str] | None = None,
        mapped: list[IdentityRecord] | None = None,
    ) -> None:
        """Record that an event ended these users' sessions at `when`: bearers issued before it
        are refused from now on (shared/tokens.py). Index rows by user key and, for an Entra user,
        by (tenant, object id), which also covers app keys with no identity yet; and the moment on
        each mapping still there (a revoke), so the hot path needs no extra read. The rows land
        first: an event that fails midway is retried, and a row written twice is the same row."""
        rows = [keys.ended_user_row(key) for key in dict.fromkeys(user_keys)]
        if entra:
            rows.append(keys.ended_entra_row(*entra))
        entities = [
            {"PartitionKey": keys.INDEX_PARTITION, "RowKey": row, "endedAt": when, "reason": reason}
            for row in rows
        ]
        for start in range(0, len(entities), 100):  # an entity-group transaction takes 100
            await self.table.upsert_together(entities[start : start + 100])
        for record in mapped or []:
            try:
                await self.table.merge(record.user_key, keys.IDENTITY_ROW, {"sessionsEndedAt": when})
            except Missing:
                pass  # deleted meanwhile: the index row still stands

    @telemetry.table_operation("sessions_ended")
    async def sessions_ended(
        self, user_key: str, tenant_id: str | None = None, object_id: str | None = None
    ) -> dt.datetime | None:
        """When an event last ended this caller's sessions, by user key or Entra user: one query."""
        rows = [keys.ended_user_row(user_key)]
        if tenant_id and object_id:
            rows.append(keys.ended_entra_row(tenant_id, object_id))
        names = {f"r{i}": row for i, row in enumerate(rows)}
        # Spaces around the parentheses: azure-data-tables substitutes @names word by word.
        query = "PartitionKey eq @p and ( " + " or ".join(f"RowKey eq @{name}" for name in names) + " )"
        params: dict[str, Any] = {"p": keys.INDEX_PARTITION, **names}
        found = [entity["endedAt"] async for entity in self.table.query(query, params, select=["endedAt"])]
        return max(found) if found else None

    # ---- deletion notes ------------------------------------------------------------------------------

    @telemetry.table_operation("note_deletion")
    async def note_deletion(self, user_key: str, reason: str, when: dt.datetime) -> None:
        await self.table.upsert(
            {"PartitionKey": user_key, "RowKey": keys.DELETED_ROW, "deletedAt": when, "reason": reason}
        )

    @telemetry.table_operation("deletion")
    async def deletion(self, user_key: str) -> tuple[dt.datetime, str] | None:
        """When and why this user's last identity was deleted, if the service noted it."""
        entity = await self.table.get(user_key, keys.DELETED_ROW)
        if entity is None:
            return None
        return entity["deletedAt"], str(entity.get("reason") or "deleted")
