"""The pending queue, `PK="pending"`: work on ACS identities that ACS has not confirmed yet.

A row per (user, identity, op) (`keys.pending_row`), so a newer request of the same kind for the
same identity replaces an older one, or per discarded identity (`keys.discard_row`). The timer
takes each with an etag lease (`claim`), and finishes it or tries again later (shared/cleanup/).
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Literal

from .. import telemetry
from . import keys
from .errors import Changed, Missing
from .record import IdentityRecord
from .table import Entity, Table

# revoke, delete: a request's; retire: retention's; settle: a mapping insert without a clear
# answer; discard: an identity nobody maps (a lost creation race)
PendingOp = Literal["revoke", "delete", "retire", "settle", "discard"]
RELEASED = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # a lease time that has always passed


@dataclass(frozen=True)
class PendingWork:
    """A revoke, delete, retirement, settlement or discard that ACS has not confirmed yet."""

    row_key: str
    op: PendingOp
    pending_id: str
    communication_user_id: str
    user_key: str  # "" for discard
    attempts: int
    next_attempt_at: dt.datetime
    lease_until: dt.datetime | None
    etag: str
    requested_at: dt.datetime | None = None
    retention_row: str = ""  # retire: the retention entry the pass judged (dropped with the identity)


class Pending:
    def __init__(self, table: Table) -> None:
        self.table = table

    async def queue(
        self,
        op: PendingOp,
        *,
        user_key: str,
        communication_user_id: str,
        pending_id: str,
        now: dt.datetime,
        retry_in: dt.timedelta,
        retention_row: str = "",
    ) -> None:
        """Queue `op` on the identity for the timer, under the request's `pending_id` (the one its
        mark on the mapping carries), first due `retry_in` from `now`."""
        entity: Entity = {
            "PartitionKey": keys.PENDING_PARTITION,
            "RowKey": keys.pending_row(user_key, communication_user_id, op),
            "op": op,
            "pendingId": pending_id,
            "communicationUserId": communication_user_id,
            "userKey": user_key,
            "attempts": 0,
            "requestedAt": now,
            "nextAttemptAt": now + retry_in,
        }
        if retention_row:
            entity["retentionRow"] = retention_row
        await self.table.upsert(entity)

    async def queued_id(self, user_key: str, communication_user_id: str, op: PendingOp) -> str | None:
        """The `pending_id` `op` on the identity is queued under, None when it is not queued."""
        queued = await self.table.get(
            keys.PENDING_PARTITION, keys.pending_row(user_key, communication_user_id, op)
        )
        return queued.get("pendingId") if queued is not None else None

    @telemetry.table_operation("requeue_blocked")
    async def requeue_blocked(self, record: IdentityRecord, now: dt.datetime) -> bool:
        """A mapping blocked for a revoke or delete whose queued work is gone (its block landed
        after the timer had finished the work): queue it again under the block's id, so that the
        user is not blocked for good. True when it had to be queued."""
        op: PendingOp
        if record.pending == "revoke":
            op = "revoke"
        elif record.pending == "delete":
            op = "delete"
        else:
            return False
        if await self.queued_id(record.user_key, record.communication_user_id, op) is not None:
            return False
        await self.queue(
            op,
            user_key=record.user_key,
            communication_user_id=record.communication_user_id,
            pending_id=record.pending_id,
            now=now,
            retry_in=dt.timedelta(0),
        )
        return True

    @telemetry.table_operation("queue_discard")
    async def queue_discard(self, communication_user_id: str, now: dt.datetime) -> None:
        """An ACS identity nobody maps, for the timer to delete."""
        await self.table.upsert(
            {
                "PartitionKey": keys.PENDING_PARTITION,
                "RowKey": keys.discard_row(communication_user_id),
                "op": "discard",
                "pendingId": uuid.uuid4().hex,
                "communicationUserId": communication_user_id,
                "userKey": "",
                "attempts": 0,
                "requestedAt": now,
                "nextAttemptAt": now,
            }
        )

    @telemetry.table_operation("queue_settle")
    async def queue_settle(self, user_key: str, communication_user_id: str, now: dt.datetime) -> None:
        """A new identity whose mapping insert may still land: the timer keeps it if it did, and
        deletes it once no late write can land any more if it did not (shared/cleanup/)."""
        await self.queue(
            "settle",
            user_key=user_key,
            communication_user_id=communication_user_id,
            pending_id=uuid.uuid4().hex,
            now=now,
            retry_in=dt.timedelta(0),
        )

    @telemetry.table_operation("forget_pending")
    async def forget(self, user_key: str, communication_user_id: str, op: PendingOp) -> None:
        """Drop queued work the request itself completed (a durable delete that went through)."""
        await self.table.delete(keys.PENDING_PARTITION, keys.pending_row(user_key, communication_user_id, op))

    # ---- the timer's side ------------------------------------------------------------------------

    @telemetry.table_operation("pending_work")
    async def pending_work(self) -> AsyncIterator[PendingWork]:
        async for entity in self.table.query("PartitionKey eq @p", {"p": keys.PENDING_PARTITION}):
            yield PendingWork(
                row_key=entity["RowKey"],
                op=entity["op"],
                pending_id=entity["pendingId"],
                communication_user_id=entity["communicationUserId"],
                user_key=entity.get("userKey", ""),
                attempts=entity.get("attempts", 0),
                next_attempt_at=entity["nextAttemptAt"],
                lease_until=entity.get("leaseUntil"),
                etag=str(entity.metadata["etag"]),
                requested_at=entity.get("requestedAt"),
                retention_row=entity.get("retentionRow", ""),
            )

    @telemetry.table_operation("claim")
    async def claim(self, work: PendingWork, lease_until: dt.datetime) -> PendingWork | None:
        """Take a lease on one piece of work; None when another cleanup run got it first."""
        etag = await self.table.merge_if_unchanged(
            keys.PENDING_PARTITION, work.row_key, work.etag, {"leaseUntil": lease_until}
        )
        return replace(work, lease_until=lease_until, etag=etag) if etag else None

    @telemetry.table_operation("retry_later")
    async def retry_later(self, work: PendingWork, next_attempt_at: dt.datetime) -> None:
        """Release the lease, due again at `next_attempt_at`; a newer request's row stays as it is."""
        try:
            await self.table.merge(
                keys.PENDING_PARTITION,
                work.row_key,
                {"attempts": work.attempts + 1, "nextAttemptAt": next_attempt_at, "leaseUntil": RELEASED},
                etag=work.etag,
            )
        except (Changed, Missing):
            pass

    @telemetry.table_operation("finish")
    async def finish(self, work: PendingWork) -> None:
        try:
            await self.table.delete(keys.PENDING_PARTITION, work.row_key, etag=work.etag)
        except Changed:
            pass  # a newer request replaced it: that one stays for the next run
