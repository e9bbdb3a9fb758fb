"""The identity map in Azure Table Storage: app user <-> ACS identity, and the work around it.

Rows (one table, every lookup a point read or a key-range scan):
- mapping `PK=user_key(issuer, sub), RK="identity"`: the ACS id, who it belongs to, oid/tid, when
  it was created and last used, and any pending revoke/delete. One point read answers every
  token request, including "is this user blocked by a pending revocation?". A partition per user:
  the hot path spreads over the whole table.
- the index, `PK="index"`: every lookup by something other than the user, in one partition so that
  a first issue files them all in one entity-group transaction (one request, all or nothing):
  - owner `RK=owner_row(id)`: ACS id -> app user, for admins and events. Filed *before* the
    mapping, so every mapping has one; an owner row whose user's mapping names another id is a
    leftover, and lookups through it check the mapping.
  - graph `RK=graph_row(tid, oid, user_key)`: Entra (tenant, object id) -> app user, for Microsoft
    Graph events, which name users that way; one row per app user key, so a person who signed in
    to two apps (two `sub`s) is found under both, by one key-range query. Not written when users
    are keyed by object id (`Settings.object_id_issuer`): the event then names the mapping itself.
    It goes once the user has no mapping: with `remove`, or, after a first issue that never got
    its mapping, with cleanup's sweep (the retention row names it), never in the hot window where
    a concurrent first request of the same user may need it.
  - retention `RK=retention_row(day last known used, user_key, id)`: scanned by key range for days
    older than the retention period, so cleanup costs grow with stale identities, not all
    identities. It is the first day's last-use record; later days' uses update the mapping, and
    cleanup moves the row forward lazily when it finds the identity used since. Filed with the
    owner row, it also finds identities a crash left unmapped: cleanup deletes an identity whose
    row's user maps to another identity, or to none.
  The index takes first issues and the timer's moves, not the per-request traffic: one partition
  serves about 2,000 entities a second, several hundred first issues a second.
- pending `PK="pending", RK=pending_row(user_key, id, op) | discard_row(id)`: revocations and
  deletions that could not reach ACS yet, with attempts, next attempt and a lease; the timer
  completes them.
- events `PK="events", RK=event_mark(schema, source, id) | identity_mark(..., user_key)`: events
  (and a Graph event's identities) already acted on; see keys.py for why both key spaces.
- Graph subscription `PK="graph-subscription", RK="current"`: the Microsoft Graph change-notification
  subscription the service keeps alive (id, expiry, last renewal outcome), for the timer and health.

Creation is race-safe because the mapping insert is an insert, not an upsert: of two concurrent
first requests exactly one wins; the loser deletes its identity, then its rows, and uses the
winner's identity (`TokenService`). Writes that act on an identity the user may have replaced
since (remove, mark_pending) are etag-guarded and touch the mapping only while it names it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, replace

from azure.core import MatchConditions
from azure.core.exceptions import ResourceExistsError, ResourceModifiedError, ResourceNotFoundError
from azure.data.tables import UpdateMode
from azure.data.tables.aio import TableClient

from . import keys, telemetry
from .clock import utcnow

log = logging.getLogger("acs_token_service.store")
RELEASED = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)  # a lease time that has always passed
BLOCKING = ("revoke", "delete", "retiring")  # pending states that refuse new tokens (409)


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
    # "", "revoke", "delete" (a request's: blocks), "retire" (retention's claim: never blocks) or
    # "retiring" (retention committed: blocks; any request's revoke or delete replaces it)
    pending: str = ""
    pending_id: str = ""
    sessions_ended_at: dt.datetime | None = None  # an event ended the user's sessions then
    # False from the mapping insert until its first issue looked for an event that came meanwhile
    sessions_checked: bool = True
    etag: str | None = None

    def to_entity(self) -> dict:
        entity = {
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
        if not self.sessions_checked:
            entity["sessionsUnchecked"] = True
        return entity

    @classmethod
    def from_entity(cls, entity) -> IdentityRecord:
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
            sessions_checked=not entity.get("sessionsUnchecked", False),
            etag=entity.metadata.get("etag") if hasattr(entity, "metadata") else None,
        )


@dataclass(frozen=True)
class Filed:
    """A retention row: this user had this identity, last known used on the row's day."""

    row_key: str
    user_key: str
    communication_user_id: str
    graph_row: str = ""  # the user's Graph lookup row, if one was filed with it
    etag: str | None = None
    lease_until: dt.datetime | None = None  # a cleanup run is sweeping it (`claim_sweep`)


@dataclass(frozen=True)
class GraphSubscriptionState:
    """What the service knows of its Microsoft Graph subscription on users (`shared.graph`).

    `outcome` is "ok" after a renewal or creation succeeded, "observed" when the subscription is only
    known from the events it delivered, else the last failure's code. No secret: Graph ids and times.
    """

    subscription_id: str  # "" while none exists (creation failed)
    expires_at: dt.datetime | None
    outcome: str
    attempted_at: dt.datetime | None = None  # last renewal or creation attempt
    renewed_at: dt.datetime | None = None  # last success
    missed_at: dt.datetime | None = None  # last "missed" lifecycle notification

    def to_entity(self) -> dict:
        entity = {
            "PartitionKey": keys.GRAPH_SUBSCRIPTION_PARTITION,
            "RowKey": keys.GRAPH_SUBSCRIPTION_ROW,
            "subscriptionId": self.subscription_id,
            "outcome": self.outcome,
        }
        for name, value in (
            ("expiresAt", self.expires_at),
            ("attemptedAt", self.attempted_at),
            ("renewedAt", self.renewed_at),
            ("missedAt", self.missed_at),
        ):
            if value is not None:  # Table Storage keeps no nulls: an absent property reads as None
                entity[name] = value
        return entity

    @classmethod
    def from_entity(cls, entity) -> GraphSubscriptionState:
        return cls(
            subscription_id=entity.get("subscriptionId", ""),
            expires_at=entity.get("expiresAt"),
            outcome=entity.get("outcome", ""),
            attempted_at=entity.get("attemptedAt"),
            renewed_at=entity.get("renewedAt"),
            missed_at=entity.get("missedAt"),
        )


@dataclass(frozen=True)
class PendingWork:
    """A revoke, delete or discard that ACS has not confirmed yet."""

    row_key: str
    op: str  # "revoke", "delete", "retire", "settle" or "discard"
    pending_id: str
    communication_user_id: str
    user_key: str  # "" for discard
    attempts: int
    next_attempt_at: dt.datetime
    lease_until: dt.datetime | None
    etag: str
    requested_at: dt.datetime | None = None
    retention_row: str = ""  # retire: the retention row the pass judged (dropped with the identity)


class IdentityStore:
    def __init__(self, table: TableClient, *, object_id_issuer: str | None = None) -> None:
        self.table = table
        self.object_id_issuer = object_id_issuer
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

    async def _get(self, partition: str, row: str):
        await self._ensure_table()
        try:
            return await self.table.get_entity(partition, row)
        except ResourceNotFoundError:
            return None

    async def _merge_if_unchanged(
        self, partition: str, row: str, etag: str | None, values: dict
    ) -> str | None:
        """Merge `values` into the row only as it was read (`etag`): its new etag, or None when it
        changed or went since (someone else's write came first) or was never read."""
        if etag is None:
            return None
        try:
            metadata = await self.table.update_entity(
                {"PartitionKey": partition, "RowKey": row, **values},
                mode=UpdateMode.MERGE,
                etag=etag,
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            return None
        return metadata["etag"]

    async def _delete(self, partition: str, row: str, etag: str | None = None) -> None:
        kwargs = {"etag": etag, "match_condition": MatchConditions.IfNotModified} if etag else {}
        try:
            await self.table.delete_entity(partition, row, **kwargs)
        except ResourceNotFoundError:
            pass

    # ---- the mapping and its lookups -------------------------------------------------------------

    @telemetry.table_operation("get")
    async def get(self, user_key: str) -> IdentityRecord | None:
        entity = await self._get(user_key, keys.IDENTITY_ROW)
        return IdentityRecord.from_entity(entity) if entity is not None else None

    @telemetry.table_operation("file_new")
    async def file_new(self, record: IdentityRecord) -> None:
        """File a new identity in the index before its mapping insert (`insert`): owner, retention
        and, when Graph events need it, graph rows, in one entity-group transaction.

        They land before the mapping can, so every mapping has them, and an identity left unmapped
        (a crash, a lost race whose cleanup failed) is still on file for cleanup. The graph row names
        only the user: a racing request writes what the winner writes.
        """
        await self._ensure_table()
        await self._upsert_together(self.index_rows(record))

    def index_rows(self, record: IdentityRecord) -> list[dict]:
        """What `file_new` writes: owner, retention and, if needed, Graph rows (the bench files
        these very rows to measure what the transaction costs)."""
        owner = {
            "PartitionKey": keys.INDEX_PARTITION,
            "RowKey": keys.owner_row(record.communication_user_id),
            "communicationUserId": record.communication_user_id,
            "userKey": record.user_key,
            "createdAt": record.created_at,
        }
        return [owner, *self._filed_rows(record)]

    @telemetry.table_operation("insert")
    async def insert(self, record: IdentityRecord) -> IdentityRecord:
        """The mapping insert, which two racing first requests can't both win: ResourceExistsError.
        The index rows stay until the caller has deleted a loser's identity: `forget_lost`."""
        metadata = await self.table.create_entity(record.to_entity())
        return replace(record, etag=metadata["etag"])

    def _graph_row(self, record: IdentityRecord) -> str | None:
        """The user's Graph lookup row, when Graph events need one to find them."""
        if record.object_id and record.tenant_id and self.object_id_issuer is None:
            return keys.graph_row(record.tenant_id, record.object_id, record.user_key)
        return None

    def _retention_entity(self, record: IdentityRecord) -> dict:
        """The identity filed under its last-use day; it names the Graph row, which cleanup drops
        with the last identity of a user who has no mapping left."""
        entity = {
            "PartitionKey": keys.INDEX_PARTITION,
            "RowKey": keys.retention_row(record.last_used_on, record.user_key, record.communication_user_id),
            "userKey": record.user_key,
            "communicationUserId": record.communication_user_id,
        }
        if graph_row := self._graph_row(record):
            entity["graphRow"] = graph_row
        return entity

    def _filed_rows(self, record: IdentityRecord) -> list[dict]:
        """The retention row and, when Graph events need one, the user's Graph row."""
        rows = [self._retention_entity(record)]
        if graph_row := self._graph_row(record):
            rows.append(
                {"PartitionKey": keys.INDEX_PARTITION, "RowKey": graph_row, "userKey": record.user_key}
            )
        return rows

    async def _upsert_together(self, rows: list[dict]) -> None:
        """Index rows in one entity-group transaction: all or nothing, one request. Upserts are
        idempotent, so the SDK may retry the transaction after a lost answer."""
        await self.table.submit_transaction([("upsert", row, {"mode": UpdateMode.REPLACE}) for row in rows])

    @telemetry.table_operation("forget_lost")
    async def forget_lost(self, record: IdentityRecord, *, user_mapped: bool) -> None:
        """The rows of an identity no mapping names (a lost race, a failed first issue), once it is
        deleted or queued for deletion.

        The Graph row names only the user: with `user_mapped` (a lost race) it is the winner's.
        Without, it may be, too: a concurrent first request of the same user may have filed it and
        be about to insert its mapping, so it is not deleted now. The retention row, which names
        it, stays instead, and cleanup's sweep drops both once the retention period has passed, if
        the user still has no mapping then (the identity's deletion is repeated; ACS says gone).
        """
        rows = [self.forget_owner(record.communication_user_id)]
        if user_mapped or self._graph_row(record) is None:
            rows.append(self._unfile(record))
        outcomes = await asyncio.gather(*rows, return_exceptions=True)
        if any(isinstance(outcome, BaseException) for outcome in outcomes):
            log.warning("a lost race's rows stay for cleanup to sweep")

    async def _if_still_mapped(
        self, record: IdentityRecord, write: Callable[[IdentityRecord], Awaitable]
    ) -> bool:
        """Run `write(current)` on the mapping while it names `record`'s identity; False once it
        doesn't. `write` guards itself with `current.etag`.

        A revocation, deletion or cleanup acting on one identity may find the user on another by
        now: an etag-guarded write never touches the newer mapping.
        """
        current: IdentityRecord | None = record if record.etag else None
        for _ in range(3):
            if current is None:
                entity = await self._get(record.user_key, keys.IDENTITY_ROW)
                current = IdentityRecord.from_entity(entity) if entity is not None else None
                if current is None or current.communication_user_id != record.communication_user_id:
                    return False
            try:
                await write(current)
                return True
            except ResourceNotFoundError:
                return False
            except ResourceModifiedError:
                current = None  # touched or marked meanwhile: look again
        raise ResourceModifiedError(message="The identity mapping keeps changing; try again.")

    async def _unfile(self, record: IdentityRecord) -> None:
        """Drop the identity's retention row: filed under its first day, and moved by cleanup to
        its last-use day only when that day comes up, so it is in one of the two (or, moved by a
        run that saw an older last use, in between: then the sweep finds it and ACS says gone)."""
        days = {record.last_used_on, record.created_at.date().isoformat()}
        rows = (keys.retention_row(day, record.user_key, record.communication_user_id) for day in days)
        await asyncio.gather(*(self._delete(keys.INDEX_PARTITION, row) for row in rows))

    @telemetry.table_operation("forget_owner")
    async def forget_owner(self, communication_user_id: str) -> None:
        await self._delete(keys.INDEX_PARTITION, keys.owner_row(communication_user_id))

    @telemetry.table_operation("touch")
    async def touch(self, record: IdentityRecord, now: dt.datetime) -> None:
        """Record use (issue or refresh) once per day: the retention cleanup reads it."""
        await self.table.update_entity(
            {
                "PartitionKey": record.user_key,
                "RowKey": keys.IDENTITY_ROW,
                "lastUsedOn": now.date().isoformat(),
                "lastIssuedAt": now,
            },
            mode=UpdateMode.MERGE,
        )

    @telemetry.table_operation("note_use")
    async def note_use(self, record: IdentityRecord, now: dt.datetime) -> None:
        """Record a use that got no token (its identity was blocked): the day only."""
        try:
            await self.table.update_entity(
                {
                    "PartitionKey": record.user_key,
                    "RowKey": keys.IDENTITY_ROW,
                    "lastUsedOn": now.date().isoformat(),
                },
                mode=UpdateMode.MERGE,
            )
        except ResourceNotFoundError:
            pass

    @telemetry.table_operation("owner_of")
    async def owner_of(self, communication_user_id: str) -> str | None:
        entity = await self._get(keys.INDEX_PARTITION, keys.owner_row(communication_user_id))
        return entity["userKey"] if entity is not None else None

    @telemetry.table_operation("graph_users")
    async def graph_users(self, tenant_id: str, object_id: str) -> list[IdentityRecord]:
        """The mappings of the Entra user a Microsoft Graph event names: one per app user key."""
        if self.object_id_issuer is None:
            await self._ensure_table()
            prefix = keys.graph_prefix(tenant_id, object_id)
            query = "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi"
            params = {"p": keys.INDEX_PARTITION, "lo": prefix, "hi": keys.prefix_end(prefix)}
            rows = self.table.query_entities(query, parameters=params, select=["userKey"])
            found = await asyncio.gather(*[self.get(row["userKey"]) async for row in rows])
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
            record = await self.get(keys.user_key(self.object_id_issuer, candidate))
            if record is not None:
                # Object ids are unique across tenants; checking the tenant costs nothing.
                return [record] if (record.tenant_id or "").lower() == tenant_id.lower() else []
        return []

    @telemetry.table_operation("remove")
    async def remove(self, record: IdentityRecord, *, reason: str = "deleted") -> None:
        """Forget a deleted identity: mapping first (so no token is issued for it), then lookups.

        The user's partition keeps a note of when and why (`reason`: user, admin, event, retired,
        gone, deleted), so that their next refresh can say what happened instead of "no identity
        yet". Only when the mapping still named this identity: a user already on a newer one has
        nothing to be told.
        """
        unmapped = await self._if_still_mapped(
            record,
            lambda current: self.table.delete_entity(
                record.user_key,
                keys.IDENTITY_ROW,
                etag=current.etag,
                match_condition=MatchConditions.IfNotModified,
            ),
        )
        if unmapped:
            try:
                await self.note_deletion(record.user_key, reason, utcnow())
            except Exception as err:  # noqa: BLE001 - the identity is gone either way; the note is a courtesy
                log.warning("could not note a deletion: %s", type(err).__name__)
        await self.forget_owner(record.communication_user_id)
        # The Graph row serves the user, whichever identity: it goes only with the user's mapping.
        if graph_row := self._graph_row(record):
            await self.forget_graph_row(record.user_key, graph_row)
        await self._unfile(record)

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
        await self._ensure_table()
        rows = [keys.ended_user_row(key) for key in dict.fromkeys(user_keys)]
        if entra:
            rows.append(keys.ended_entra_row(*entra))
        entities = [
            {"PartitionKey": keys.INDEX_PARTITION, "RowKey": row, "endedAt": when, "reason": reason}
            for row in rows
        ]
        for start in range(0, len(entities), 100):  # an entity-group transaction takes 100
            await self._upsert_together(entities[start : start + 100])
        for record in mapped or []:
            try:
                await self.table.update_entity(
                    {"PartitionKey": record.user_key, "RowKey": keys.IDENTITY_ROW, "sessionsEndedAt": when},
                    mode=UpdateMode.MERGE,
                )
            except ResourceNotFoundError:
                pass  # deleted meanwhile: the index row still stands

    @telemetry.table_operation("sessions_ended")
    async def sessions_ended(
        self, user_key: str, tenant_id: str | None = None, object_id: str | None = None
    ) -> dt.datetime | None:
        """When an event last ended this caller's sessions, by user key or Entra user: one query."""
        await self._ensure_table()
        rows = [keys.ended_user_row(user_key)]
        if tenant_id and object_id:
            rows.append(keys.ended_entra_row(tenant_id, object_id))
        names = {f"r{i}": row for i, row in enumerate(rows)}
        # Spaces around the parentheses: azure-data-tables substitutes @names word by word.
        query = "PartitionKey eq @p and ( " + " or ".join(f"RowKey eq @{name}" for name in names) + " )"
        found = [
            entity["endedAt"]
            async for entity in self.table.query_entities(
                query, parameters={"p": keys.INDEX_PARTITION, **names}, select=["endedAt"]
            )
        ]
        return max(found) if found else None

    @telemetry.table_operation("sessions_checked")
    async def sessions_checked(
        self, record: IdentityRecord, ended_at: dt.datetime | None
    ) -> IdentityRecord | None:
        """Mark a new mapping checked for events that ended its user's sessions (and when the
        latest did, if its bearer is newer), only while it names the identity that was checked:
        the mapping as marked, or None when it is gone or names another identity by now."""
        values: dict = {"sessionsUnchecked": False}
        if ended_at is not None:
            values["sessionsEndedAt"] = ended_at
        current: IdentityRecord | None = record
        for _ in range(3):
            if current is None or current.communication_user_id != record.communication_user_id:
                return None
            if current.etag is not None:
                etag = await self._merge_if_unchanged(
                    record.user_key, keys.IDENTITY_ROW, current.etag, values
                )
                if etag is not None:
                    return replace(
                        current,
                        sessions_checked=True,
                        sessions_ended_at=ended_at or current.sessions_ended_at,
                        etag=etag,
                    )
            current = await self.get(record.user_key)  # changed since (a use, a block): look again
        return None  # still unchecked: the next request looks again

    @telemetry.table_operation("note_deletion")
    async def note_deletion(self, user_key: str, reason: str, when: dt.datetime) -> None:
        await self.table.upsert_entity(
            {"PartitionKey": user_key, "RowKey": keys.DELETED_ROW, "deletedAt": when, "reason": reason},
            mode=UpdateMode.REPLACE,
        )

    @telemetry.table_operation("deletion")
    async def deletion(self, user_key: str) -> tuple[dt.datetime, str] | None:
        """When and why this user's last identity was deleted, if the service noted it."""
        entity = await self._get(user_key, keys.DELETED_ROW)
        if entity is None:
            return None
        return entity["deletedAt"], str(entity.get("reason") or "deleted")

    @telemetry.table_operation("forget_graph_row")
    async def forget_graph_row(self, user_key: str, graph_row: str) -> None:
        """Drop a user's Graph lookup row once they have no mapping.

        Read the row, then the mapping, then delete only the row as read: a first issue that filed
        it again after the first read keeps it. One that filed it before and inserts its mapping
        after the second read loses it; `refile` writes it again for users still active.
        """
        entity = await self._get(keys.INDEX_PARTITION, graph_row)
        if entity is None or await self._get(user_key, keys.IDENTITY_ROW) is not None:
            return
        try:
            await self._delete(keys.INDEX_PARTITION, graph_row, entity.metadata["etag"])
        except ResourceModifiedError:
            pass

    # ---- pending work --------------------------------------------------------------------------

    @telemetry.table_operation("mark_pending")
    async def mark_pending(
        self, record: IdentityRecord, op: str, now: dt.datetime, retry_in: dt.timedelta
    ) -> None:
        """Durably queue `op` for the timer, then block the mapping. Queue first: a crash between
        the two leaves queued work (a revoke the timer drops once it is clearly abandoned, a delete
        it carries out), never a user blocked with no work queued. A mapping that names another
        identity by now is not blocked: the timer drops the queue row, and cleanup sweeps the old
        identity as unmapped."""
        pending_id = uuid.uuid4().hex
        await self._ensure_table()
        await self._queue(replace(record, pending_id=pending_id), op, now, retry_in)
        block = {
            "PartitionKey": record.user_key,
            "RowKey": keys.IDENTITY_ROW,
            "pending": op,
            "pendingId": pending_id,
        }

        async def write(current: IdentityRecord) -> None:
            if current.pending == "delete" and op != "delete":
                return  # never downgrade: a pending delete revokes too
            await self.table.update_entity(
                block, mode=UpdateMode.MERGE, etag=current.etag, match_condition=MatchConditions.IfNotModified
            )

        await self._if_still_mapped(record, write)

    # ---- retention's two steps -----------------------------------------------------------------

    @telemetry.table_operation("claim_retirement")
    async def claim_retirement(
        self, record: IdentityRecord, now: dt.datetime, grace: dt.timedelta, retention_row: str = ""
    ) -> bool:
        """Retention's claim on a stale identity: `pending="retire"` on the mapping, but only as it
        was judged (its etag), so that a use in between (the user's last-use write), or another
        pass, wins; and queued work for a later run. A use cancels the claim (`keep_in_use`)
        and never waits for it. False when the mapping changed since it was judged."""
        pending_id = uuid.uuid4().hex
        claim = {"pending": "retire", "pendingId": pending_id}
        if await self._merge_if_unchanged(record.user_key, keys.IDENTITY_ROW, record.etag, claim) is None:
            return False
        # After the mark: a queue row without a mark would only be dropped; a mark without a row
        # (a crash here) is queued again by the next retention pass (`queue_retirement`).
        await self._queue(replace(record, pending_id=pending_id), "retire", now, grace, retention_row)
        return True

    @telemetry.table_operation("queue_retirement")
    async def queue_retirement(
        self, record: IdentityRecord, now: dt.datetime, grace: dt.timedelta, retention_row: str = ""
    ) -> bool:
        """Queue the work of a claim whose queue row a crash lost; False when it is queued."""
        row = keys.pending_row(record.user_key, record.communication_user_id, "retire")
        queued = await self._get(keys.PENDING_PARTITION, row)
        if queued is not None and queued.get("pendingId") == record.pending_id:
            return False
        await self._queue(record, "retire", now, grace, retention_row)
        return True

    @telemetry.table_operation("requeue_blocked")
    async def requeue_blocked(self, record: IdentityRecord, now: dt.datetime) -> bool:
        """A mapping blocked for a revoke or delete whose queued work is gone (its block landed
        after the timer had finished the work): queue it again, so the user is not blocked for
        good. True when it had to be queued."""
        op = record.pending
        queued = await self._get(
            keys.PENDING_PARTITION, keys.pending_row(record.user_key, record.communication_user_id, op)
        )
        if queued is not None:
            return False
        await self._queue(record, op, now, dt.timedelta(0))
        return True

    @telemetry.table_operation("keep_in_use")
    async def keep_in_use(self, record: IdentityRecord, now: dt.datetime) -> IdentityRecord | None:
        """Record a use before a token is issued, cancelling retention's claim: one etag-guarded
        write, so that either it lands before retention commits (`commit_retirement` then fails) or
        it finds the delete committed. The mapping as it now is (a pending revoke or delete left as
        it was, for the caller to refuse), or None when it no longer names this identity."""
        current: IdentityRecord | None = record
        for _ in range(5):
            if current is None or current.communication_user_id != record.communication_user_id:
                return None
            if current.pending in BLOCKING:
                return current
            try:
                metadata = await self.table.update_entity(
                    {
                        "PartitionKey": record.user_key,
                        "RowKey": keys.IDENTITY_ROW,
                        "pending": "",
                        "pendingId": "",
                        "lastUsedOn": now.date().isoformat(),
                        "lastIssuedAt": now,
                    },
                    mode=UpdateMode.MERGE,
                    etag=current.etag,
                    match_condition=MatchConditions.IfNotModified,
                )
            except ResourceNotFoundError:
                return None
            except ResourceModifiedError:
                current = await self.get(record.user_key)
                continue
            return replace(
                current,
                pending="",
                pending_id="",
                last_used_on=now.date().isoformat(),
                last_issued_at=now,
                etag=metadata["etag"],
            )
        raise ResourceModifiedError(message="The identity mapping keeps changing; try again.")

    @telemetry.table_operation("commit_retirement")
    async def commit_retirement(self, record: IdentityRecord) -> IdentityRecord | None:
        """Retention's point of no return: the claim becomes `retiring`, etag-guarded on the mapping
        as just judged still claimed and stale. A use that landed first has won (None); from here
        on a request gets 409 delete_pending, and a request's own revoke or delete replaces it."""
        etag = await self._merge_if_unchanged(
            record.user_key, keys.IDENTITY_ROW, record.etag, {"pending": "retiring"}
        )
        return replace(record, pending="retiring", etag=etag) if etag else None

    @telemetry.table_operation("reopen_retirement")
    async def reopen_retirement(self, record: IdentityRecord) -> None:
        """ACS refused the delete (throttled): back to a claim a use may cancel."""
        current = await self.get(record.user_key)
        if (
            current is not None
            and current.communication_user_id == record.communication_user_id
            and current.pending == "retiring"
            and current.pending_id == record.pending_id
        ):
            # Anything else is someone else's request by now: theirs stands.
            await self._merge_if_unchanged(
                record.user_key, keys.IDENTITY_ROW, current.etag, {"pending": "retire"}
            )

    @telemetry.table_operation("lease_retention_rows")
    async def lease_retention_rows(self, rows: list[str], lease_until: dt.datetime) -> None:
        """Hold an identity's retention rows while retention deletes it, so that another run's scan,
        which may find its mapping gone before the rows, does not sweep it again."""
        for row in dict.fromkeys(rows):
            try:
                await self.table.update_entity(
                    {"PartitionKey": keys.INDEX_PARTITION, "RowKey": row, "leaseUntil": lease_until},
                    mode=UpdateMode.MERGE,
                )
            except ResourceNotFoundError:
                pass

    async def _queue(
        self,
        record: IdentityRecord,
        op: str,
        now: dt.datetime,
        retry_in: dt.timedelta,
        retention_row: str = "",
    ) -> None:
        """Queue `op` on the identity under the mapping's `pending_id`, for the timer."""
        entity = {
            "PartitionKey": keys.PENDING_PARTITION,
            "RowKey": keys.pending_row(record.user_key, record.communication_user_id, op),
            "op": op,
            "pendingId": record.pending_id,
            "communicationUserId": record.communication_user_id,
            "userKey": record.user_key,
            "attempts": 0,
            "requestedAt": now,
            "nextAttemptAt": now + retry_in,
        }
        if retention_row:
            entity["retentionRow"] = retention_row
        await self.table.upsert_entity(entity, mode=UpdateMode.REPLACE)

    @telemetry.table_operation("forget_pending")
    async def forget_pending(self, record: IdentityRecord, op: str) -> None:
        """Drop queued work the request itself completed (a durable delete that went through)."""
        await self._delete(
            keys.PENDING_PARTITION, keys.pending_row(record.user_key, record.communication_user_id, op)
        )

    @telemetry.table_operation("queue_discard")
    async def queue_discard(self, communication_user_id: str, now: dt.datetime) -> None:
        await self._ensure_table()
        await self.table.upsert_entity(
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
            },
            mode=UpdateMode.REPLACE,
        )

    @telemetry.table_operation("queue_settle")
    async def queue_settle(self, record: IdentityRecord, now: dt.datetime) -> None:
        """A new identity whose mapping insert may still land: the timer keeps it if it did, and
        deletes it once no late write can land any more if it did not (`Cleanup`)."""
        await self._queue(replace(record, pending_id=uuid.uuid4().hex), "settle", now, dt.timedelta(0))

    @telemetry.table_operation("pending_work")
    async def pending_work(self) -> AsyncIterator[PendingWork]:
        await self._ensure_table()
        async for entity in self.table.query_entities(
            "PartitionKey eq @p", parameters={"p": keys.PENDING_PARTITION}
        ):
            yield PendingWork(
                row_key=entity["RowKey"],
                op=entity["op"],
                pending_id=entity["pendingId"],
                communication_user_id=entity["communicationUserId"],
                user_key=entity.get("userKey", ""),
                attempts=entity.get("attempts", 0),
                next_attempt_at=entity["nextAttemptAt"],
                lease_until=entity.get("leaseUntil"),
                etag=entity.metadata["etag"],
                requested_at=entity.get("requestedAt"),
                retention_row=entity.get("retentionRow", ""),
            )

    @telemetry.table_operation("claim")
    async def claim(self, work: PendingWork, lease_until: dt.datetime) -> PendingWork | None:
        """Take a lease on one piece of work; None when another cleanup run got it first."""
        etag = await self._merge_if_unchanged(
            keys.PENDING_PARTITION, work.row_key, work.etag, {"leaseUntil": lease_until}
        )
        return replace(work, lease_until=lease_until, etag=etag) if etag else None

    @telemetry.table_operation("retry_later")
    async def retry_later(self, work: PendingWork, next_attempt_at: dt.datetime) -> None:
        try:
            await self.table.update_entity(
                {
                    "PartitionKey": keys.PENDING_PARTITION,
                    "RowKey": work.row_key,
                    "attempts": work.attempts + 1,
                    "nextAttemptAt": next_attempt_at,
                    "leaseUntil": RELEASED,
                },
                mode=UpdateMode.MERGE,
                etag=work.etag,
                match_condition=MatchConditions.IfNotModified,
            )
        except (ResourceModifiedError, ResourceNotFoundError):
            pass

    @telemetry.table_operation("finish")
    async def finish(self, work: PendingWork) -> None:
        try:
            await self._delete(keys.PENDING_PARTITION, work.row_key, work.etag)
        except ResourceModifiedError:
            pass  # a newer request replaced it: that one stays for the next run

    @telemetry.table_operation("clear_pending")
    async def clear_pending(self, record: IdentityRecord) -> bool:
        """Unblock the user after a revoke completed, unless a newer request replaced this one."""
        unblocked = {"pending": "", "pendingId": ""}
        return (
            await self._merge_if_unchanged(record.user_key, keys.IDENTITY_ROW, record.etag, unblocked)
            is not None
        )

    # ---- retention -----------------------------------------------------------------------------

    @telemetry.table_operation("filed_before")
    async def filed_before(self, day: str) -> AsyncIterator[Filed]:
        """Retention rows older than `day`, oldest first."""
        await self._ensure_table()
        query = "PartitionKey eq @p and RowKey ge @lo and RowKey lt @hi"
        params = {"p": keys.INDEX_PARTITION, "lo": keys.RETENTION_PREFIX, "hi": keys.retention_bound(day)}
        async for entity in self.table.query_entities(query, parameters=params):
            yield Filed(
                row_key=entity["RowKey"],
                user_key=entity["userKey"],
                communication_user_id=entity["communicationUserId"],
                graph_row=entity.get("graphRow", ""),
                etag=entity.metadata.get("etag"),
                lease_until=entity.get("leaseUntil"),
            )

    @telemetry.table_operation("refile")
    async def refile(self, filed: Filed, record: IdentityRecord) -> None:
        """An identity was used after its retention row's day: move the row to that day. The user's
        Graph row goes in the same transaction, so one lost to a race is back within a retention
        period."""
        await self._upsert_together(self._filed_rows(record))
        await self._delete(keys.INDEX_PARTITION, filed.row_key)

    @telemetry.table_operation("claim_sweep")
    async def claim_sweep(self, filed: Filed, lease_until: dt.datetime) -> bool:
        """A lease on an unmapped identity's retention row, so that of two cleanup runs at once one
        deletes it; False when another run has it, or it is gone (retired meanwhile)."""
        leased = {"leaseUntil": lease_until}
        return (
            await self._merge_if_unchanged(keys.INDEX_PARTITION, filed.row_key, filed.etag, leased)
            is not None
        )

    @telemetry.table_operation("drop_retention_row")
    async def drop_retention_row(self, filed: Filed | str) -> None:
        await self._delete(keys.INDEX_PARTITION, filed if isinstance(filed, str) else filed.row_key)

    # ---- events --------------------------------------------------------------------------------

    @telemetry.table_operation("event_seen")
    async def event_seen(self, mark: str) -> bool:
        """Was this event (or one identity's part of it) marked done? `mark` is the row key,
        `keys.event_mark` or `keys.identity_mark`: the webhook names what an event is by its
        schema's guarantees, the store only keeps the rows."""
        return await self._get(keys.EVENTS_PARTITION, mark) is not None

    @telemetry.table_operation("mark_event_done")
    async def mark_event_done(self, mark: str, now: dt.datetime) -> None:
        """Marked after acting, never before: a delivery cut off midway (a timeout, a crash) leaves
        no mark, so Event Grid's retry acts again instead of skipping what was never done."""
        await self._ensure_table()
        try:
            await self.table.create_entity(
                {"PartitionKey": keys.EVENTS_PARTITION, "RowKey": mark, "receivedAt": now}
            )
        except ResourceExistsError:
            pass  # a concurrent delivery of the same event marked it first

    @telemetry.table_operation("forget_events")
    async def forget_events_before(self, cutoff: dt.datetime) -> int:
        """Drop event-id markers older than Event Grid's redelivery window; returns how many."""
        await self._ensure_table()
        query = "PartitionKey eq @p and receivedAt lt @cutoff"
        old = [
            entity["RowKey"]
            async for entity in self.table.query_entities(
                query, parameters={"p": keys.EVENTS_PARTITION, "cutoff": cutoff}, select=["RowKey"]
            )
        ]
        for row in old:
            await self._delete(keys.EVENTS_PARTITION, row)
        return len(old)

    # ---- the Microsoft Graph subscription ------------------------------------------------------------

    @telemetry.table_operation("graph_subscription")
    async def graph_subscription(self) -> GraphSubscriptionState | None:
        entity = await self._get(keys.GRAPH_SUBSCRIPTION_PARTITION, keys.GRAPH_SUBSCRIPTION_ROW)
        return GraphSubscriptionState.from_entity(entity) if entity is not None else None

    @telemetry.table_operation("save_graph_subscription")
    async def save_graph_subscription(self, state: GraphSubscriptionState) -> None:
        """Replace the row whole: each write states the latest attempt, so the last one wins."""
        await self._ensure_table()
        await self.table.upsert_entity(state.to_entity(), mode=UpdateMode.REPLACE)

    @telemetry.table_operation("ping")
    async def ping(self) -> None:
        """A cheap round trip for health checks (a point read that usually finds nothing)."""
        await self._get("health", "probe")
