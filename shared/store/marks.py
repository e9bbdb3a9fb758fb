"""Event marks, `PK="events"`: events (and one identity's part of a Graph event) already acted on.

The webhook names what an event is by its schema's guarantees (`keys.event_mark`,
`keys.identity_mark`); this keeps the rows, and forgets them once Event Grid can no longer
redeliver the event.
"""

from __future__ import annotations

import datetime as dt

from .. import telemetry
from . import keys
from .errors import AlreadyExists
from .table import Table


class EventMarks:
    def __init__(self, table: Table) -> None:
        self.table = table

    @telemetry.table_operation("event_seen")
    async def seen(self, mark: str) -> bool:
        """Was this event (or one identity's part of it) marked done? `mark` is the row key."""
        return await self.table.get(keys.EVENTS_PARTITION, mark) is not None

    @telemetry.table_operation("mark_event_done")
    async def mark_done(self, mark: str, now: dt.datetime) -> None:
        """Marked after acting, never before: a delivery cut off midway (a timeout, a crash) leaves
        no mark, so Event Grid's retry acts again instead of skipping what was never done."""
        try:
            await self.table.insert(
                {"PartitionKey": keys.EVENTS_PARTITION, "RowKey": mark, "receivedAt": now}
            )
        except AlreadyExists:
            pass  # a concurrent delivery of the same event marked it first

    @telemetry.table_operation("forget_events")
    async def forget_before(self, cutoff: dt.datetime) -> int:
        """Drop marks older than Event Grid's redelivery window; returns how many."""
        query = "PartitionKey eq @p and receivedAt lt @cutoff"
        params = {"p": keys.EVENTS_PARTITION, "cutoff": cutoff}
        old = [entity["RowKey"] async for entity in self.table.query(query, params, select=["RowKey"])]
        for row in old:
            await self.table.delete(keys.EVENTS_PARTITION, row)
        return len(old)
