"""Retention entries, `PK="index", RK=retention_row(day last known used, user_key, id)`, and
retention's steps on the mapping.

An entry is the first day's last-use record of an identity; later days' uses update the mapping,
and cleanup moves the entry forward lazily when it finds the identity used since. Scanned by key
range for days older than the retention period, so cleanup costs grow with stale identities, not
all identities. Filed with the owner row (identities.py), it also finds identities a crash left
unmapped: cleanup deletes an identity whose entry's user maps to another identity, or to none.

Retiring a stale identity takes two steps on its mapping, each etag-guarded so that a use in
between wins: a claim (`claim_retirement`, which a use cancels) and a commit (`commit_retirement`,
the point of no return).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace

from .. import telemetry
from . import keys
from .errors import Changed, Missing
from .lookups import Lookups, graph_entity
from .pending import Pending
from .record import BLOCKING, IdentityRecord, read_mapping
from .table import Entity, Table


@dataclass(frozen=True)
class RetentionEntry:
    """This user had this identity, last known used on the entry's day."""

    row_key: str
    user_key: str
    communication_user_id: str
    graph_row: str = ""  # the user's Graph lookup row, if one was filed with it
    etag: str | None = None
    lease_until: dt.datetime | None = None  # a cleanup run is sweeping it (`claim_sweep`)


class Retention:
    def __init__(self, table: Table, lookups: Lookups, pending: Pending) -> None:
        self.table = table
        self.lookups = lookups
        self.pending = pending

    def entry_rows(self, record: IdentityRecord) -> list[Entity]:
        """The identity's entry under its last-use day and, when Graph events need one, the user's
        Graph row, which the entry names: cleanup drops it with a user's last identity."""
        entry: Entity = {
            "PartitionKey": keys.INDEX_PARTITION,
            "RowKey": keys.retention_row(record.last_used_on, record.user_key, record.communication_user_id),
            "userKey": record.user_key,
            "communicationUserId": record.communication_user_id,
        }
        graph_row = self.lookups.graph_row(record)
        if graph_row is None:
            return [entry]
        entry["graphRow"] = graph_row
        return [entry, graph_entity(graph_row, record.user_key)]

    async def forget(self, record: IdentityRecord) -> None:
        """Drop the identity's entry: filed under its first day, and moved by cleanup to its last-use
        day only when that day comes up, so it is in one of the two (or, moved by a run that saw an
        older last use, in between: then the sweep finds it and ACS says gone)."""
        days = {record.last_used_on, record.created_at.date().isoformat()}
        rows = (keys.retention_row(day, record.user_key, record.communication_user_id) for day in days)
        await asyncio.gather(*(self.table.delete(keys.INDEX_PARTITION, row) for row in rows))

    # ---- the entries, for cleanup -------------------------------------------------------------------

    @telemetry.table_operation("filed_before")
    async def entries_before(self, day: str) -> AsyncIterator[RetentionEntry]:
        """Entries older than `day`, oldest first."""
        query = "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi"
        params = {"p": keys.INDEX_PARTITION, "lo": keys.RETENTION_PREFIX, "hi": keys.retention_bound(day)}
        async for entity in self.table.query(query, params):
            yield RetentionEntry(
                row_key=entity["RowKey"],
                user_key=entity["userKey"],
                communication_user_id=entity["communicationUserId"],
                graph_row=entity.get("graphRow", ""),
                etag=entity.metadata.get("etag"),
                lease_until=entity.get("leaseUntil"),
            )

    @telemetry.table_operation("refile")
    async def move_forward(self, entry: RetentionEntry, record: IdentityRecord) -> None:
        """An identity was used after its entry's day: move the entry to that day. The user's Graph
        row goes in the same transaction, so one lost to a race is back within a retention period."""
        await self.table.upsert_together(self.entry_rows(record))
        await self.table.delete(keys.INDEX_PARTITION, entry.row_key)

    @telemetry.table_operation("claim_sweep")
    async def claim_sweep(self, entry: RetentionEntry, lease_until: dt.datetime) -> bool:
        """A lease on an unmapped identity's entry, so that of two cleanup runs at once one deletes
        it; False when another run has it, or it is gone (retired meanwhile)."""
        leased = {"leaseUntil": lease_until}
        return (
            await self.table.merge_if_unchanged(keys.INDEX_PARTITION, entry.row_key, entry.etag, leased)
            is not None
        )

    @telemetry.table_operation("drop_retention_row")
    async def drop_entry(self, row_key: str) -> None:
        await self.table.delete(keys.INDEX_PARTITION, row_key)

    @telemetry.table_operation("lease_retention_rows")
    async def lease_entries(self, rows: list[str], lease_until: dt.datetime) -> None:
        """Hold an identity's entries while retention deletes it, so that another run's scan, which
        may find its mapping gone before the entries, does not sweep it again."""
        for row in dict.fromkeys(rows):
            try:
                await self.table.merge(keys.INDEX_PARTITION, row, {"leaseUntil": lease_until})
            except Missing:
                pass

    # ---- retirement's steps on the mapping ----------------------------------------------------------

    @telemetry.table_operation("claim_retirement")
    async def claim_retirement(
        self, record: IdentityRecord, now: dt.datetime, grace: dt.timedelta, retention_row: str = ""
    ) -> bool:
        """Retention's claim on a stale identity: `pending="retire"` on the mapping, but only as it
        was judged (its etag), so that a use in between (the user's last-use write), or another
        pass, wins; and queued work for a later run. A use cancels the claim
        (`keep_in_use`) and never waits for it. False when the mapping changed since."""
        pending_id = uuid.uuid4().hex
        claim = {"pending": "retire", "pendingId": pending_id}
        if (
            await self.table.merge_if_unchanged(record.user_key, keys.IDENTITY_ROW, record.etag, claim)
            is None
        ):
            return False
        # After the mark: a queue row without a mark would only be dropped; a mark without a row
        # (a crash here) is queued again by the next retention pass (`queue_retirement`).
        await self._queue(replace(record, pending_id=pending_id), now, grace, retention_row)
        return True

    @telemetry.table_operation("queue_retirement")
    async def queue_retirement(
        self, record: IdentityRecord, now: dt.datetime, grace: dt.timedelta, retention_row: str = ""
    ) -> bool:
        """Queue the work of a claim whose queue row a crash lost; False when it is queued."""
        if (
            await self.pending.queued_id(record.user_key, record.communication_user_id, "retire")
            == record.pending_id
        ):
            return False
        await self._queue(record, now, grace, retention_row)
        return True

    async def _queue(
        self, record: IdentityRecord, now: dt.datetime, grace: dt.timedelta, retention_row: str
    ) -> None:
        await self.pending.queue(
            "retire",
            user_key=record.user_key,
            communication_user_id=record.communication_user_id,
            pending_id=record.pending_id,
            now=now,
            retry_in=grace,
            retention_row=retention_row,
        )

    @telemetry.table_operation("keep_in_use")
    async def keep_in_use(self, record: IdentityRecord, now: dt.datetime) -> IdentityRecord | None:
        """Record a use before a token is issued, cancelling retention's claim: one etag-guarded
        write, so that either it lands before retention commits (`commit_retirement` then fails) or
        it finds the delete committed. The mapping as it now is (a pending revoke or delete left as
        it was, for the caller to refuse), or None when it no longer names this identity."""
        current: IdentityRecord | None = record
        day = now.date().isoformat()
        used = {"pending": "", "pendingId": "", "lastUsedOn": day, "lastIssuedAt": now}
        for _ in range(5):
            if current is None or current.communication_user_id != record.communication_user_id:
                return None
            if current.pending in BLOCKING:
                return current
            try:
                etag = await self.table.merge(record.user_key, keys.IDENTITY_ROW, used, etag=current.etag)
            except Missing:
                return None
            except Changed:
                current = await read_mapping(self.table, record.user_key)
                continue
            return replace(
                current,
                pending="",
                pending_id="",
                last_used_on=day,
                last_issued_at=now,
                etag=etag,
            )
        raise Changed("The identity mapping keeps changing; try again.")

    @telemetry.table_operation("commit_retirement")
    async def commit_retirement(self, record: IdentityRecord) -> IdentityRecord | None:
        """Retention's point of no return: the claim becomes `retiring`, etag-guarded on the mapping
        as just judged still claimed and stale. A use that landed first has won (None); from here
        on a request gets 409 delete_pending, and a request's own revoke or delete replaces it."""
        etag = await self.table.merge_if_unchanged(
            record.user_key, keys.IDENTITY_ROW, record.etag, {"pending": "retiring"}
        )
        return replace(record, pending="retiring", etag=etag) if etag else None

    @telemetry.table_operation("reopen_retirement")
    async def reopen_retirement(self, record: IdentityRecord) -> None:
        """ACS refused the delete (throttled): back to a claim a use may cancel."""
        current = await self.table.get(record.user_key, keys.IDENTITY_ROW)
        if (
            current is not None
            and current["communicationUserId"] == record.communication_user_id
            and current.get("pending", "") == "retiring"
            and current.get("pendingId", "") == record.pending_id
        ):
            # Anything else is someone else's request by now: theirs stands.
            etag = current.metadata.get("etag")
            await self.table.merge_if_unchanged(
                record.user_key, keys.IDENTITY_ROW, etag, {"pending": "retire"}
            )
