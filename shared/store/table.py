"""The one Table Storage client every store shares, and the one place azure-core's errors end.

Each call makes sure the table exists (once per worker; infra may have made it already) and turns
what azure-core raises into the store's own errors (errors.py), as azure-data-tables turns the
service's answers into azure-core's (`_process_table_error`) and shared/acs.py turns ACS's into
the service's: callers decide on "it exists", "it changed", "no answer", never on SDK types.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from typing import Any

from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.data.tables import TableEntity, UpdateMode
from azure.data.tables.aio import TableClient

from .. import telemetry
from .errors import AlreadyExists, Changed, Missing, Refused, StoreError, Unanswered, Unreachable

Entity = dict[str, Any]


def translated(err: AzureError) -> StoreError:
    """What an azure-core error means to the caller. A 4xx other than 408 is a clear no; anything
    else (no answer, 408, 5xx, an error without a status) may hide a write that landed."""
    name = type(err).__name__  # the type, not the message: a message may quote a row
    if isinstance(err, ServiceRequestError | ServiceResponseError):
        return Unreachable(f"Table Storage cannot be reached ({name}).")
    status = err.status_code if isinstance(err, HttpResponseError) else None
    message = f"Table Storage answered {status} ({name})."
    if isinstance(err, ResourceExistsError):
        return AlreadyExists(message, status_code=status)
    if isinstance(err, ResourceModifiedError):
        return Changed(message, status_code=status)
    if isinstance(err, ResourceNotFoundError):
        return Missing(message, status_code=status)
    if status is not None and 400 <= status < 500 and status != 408:
        return Refused(message, status_code=status)
    return Unanswered(message, status_code=status)


@contextmanager
def _translating() -> Iterator[None]:
    try:
        yield
    except AzureError as err:
        raise translated(err) from err


def _if_unchanged(etag: str | None) -> dict[str, Any]:
    return {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}


class Table:
    """The aio TableClient of one table (`client`), its calls as the stores need them."""

    def __init__(self, client: TableClient) -> None:
        self.client = client
        self._ready = False
        self._ready_lock = asyncio.Lock()

    async def _ensure(self) -> None:
        """Create the table once per worker; infra may have made it already."""
        if self._ready:
            return
        async with self._ready_lock:
            if not self._ready:
                try:
                    with _translating():
                        await self.client.create_table()
                except AlreadyExists:
                    pass
                self._ready = True

    async def get(self, partition: str, row: str) -> TableEntity | None:
        """One row by its keys, None when there is none."""
        await self._ensure()
        try:
            with _translating():
                return await self.client.get_entity(partition, row)
        except Missing:
            return None

    async def insert(self, entity: Entity) -> str:
        """A row that must not exist yet: its etag; AlreadyExists when it does."""
        await self._ensure()
        with _translating():
            metadata = await self.client.create_entity(entity)
        return metadata["etag"]

    async def upsert(self, entity: Entity) -> None:
        """Write the row whole, whatever was there."""
        await self._ensure()
        with _translating():
            await self.client.upsert_entity(entity, mode=UpdateMode.REPLACE)

    async def upsert_together(self, rows: list[Entity]) -> None:
        """Rows of one partition in one entity-group transaction: all or nothing, one request.
        Upserts are idempotent, so the SDK may retry the transaction after a lost answer."""
        await self._ensure()
        with _translating():
            await self.client.submit_transaction(
                [("upsert", row, {"mode": UpdateMode.REPLACE}) for row in rows]
            )

    async def merge(self, partition: str, row: str, values: Entity, *, etag: str | None = None) -> str:
        """Merge `values` into the row (only as read, with `etag`): its new etag. Missing when the
        row is gone; Changed when it changed since it was read."""
        await self._ensure()
        with _translating():
            metadata = await self.client.update_entity(
                {"PartitionKey": partition, "RowKey": row, **values},
                mode=UpdateMode.MERGE,
                **_if_unchanged(etag),
            )
        return metadata["etag"]

    async def merge_if_unchanged(
        self, partition: str, row: str, etag: str | None, values: Entity
    ) -> str | None:
        """Merge `values` into the row only as it was read (`etag`): its new etag, or None when it
        changed or went since (someone else's write came first) or was never read."""
        if etag is None:
            return None
        try:
            return await self.merge(partition, row, values, etag=etag)
        except (Changed, Missing):
            return None

    async def delete(self, partition: str, row: str, *, etag: str | None = None) -> bool:
        """Delete the row (only as read, with `etag`): False when there was none; Changed when it
        changed since it was read."""
        await self._ensure()
        try:
            with _translating():
                await self.client.delete_entity(partition, row, **_if_unchanged(etag))
        except Missing:
            return False
        return True

    async def query(
        self, query: str, parameters: dict[str, Any], select: list[str] | None = None
    ) -> AsyncIterator[TableEntity]:
        """The rows a filter matches, page by page."""
        await self._ensure()
        with _translating():
            async for entity in self.client.query_entities(query, parameters=parameters, select=select):
                yield entity

    @telemetry.table_operation("ping")
    async def ping(self) -> None:
        """A cheap round trip for health checks (a point read that usually finds nothing)."""
        await self.get("health", "probe")
