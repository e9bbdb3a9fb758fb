"""The mapping's writes (`record.py` has the row): `create`, the whole protocol of filing a new
identity; uses; and the blocks revocations and deletions put on it.

Creation is race-safe because the mapping insert is an insert, not an upsert: of two concurrent
first requests exactly one wins; the loser deletes its identity, then its rows, and uses the
winner's identity. Writes that act on an identity the user may have replaced since (remove,
mark_pending) are etag-guarded and touch the mapping only while it names it.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TYPE_CHECKING

from .. import telemetry
from ..clock import Clock, utcnow
from . import keys
from .errors import AlreadyExists, Changed, Missing, Refused
from .record import DeletionReason, IdentityRecord, owner_entity, read_mapping
from .table import Entity, Table

if TYPE_CHECKING:  # the stores this one works with import the record from here: types only
    from .lookups import Lookups
    from .pending import Pending, PendingOp
    from .retention import Retention

log = logging.getLogger("acs_token_service.store")

Discard = Callable[[str], Awaitable[bool]]  # delete an ACS identity (or queue that): False if neither


class Identities:
    def __init__(self, table: Table, lookups: Lookups, retention: Retention, pending: Pending) -> None:
        self.table = table
        self.lookups = lookups
        self.retention = retention
        self.pending = pending

    async def get(self, user_key: str) -> IdentityRecord | None:
        return await read_mapping(self.table, user_key)

    # ---- creation --------------------------------------------------------------------------------

    def index_rows(self, record: IdentityRecord) -> list[Entity]:
        """What a new identity files before its mapping: owner, retention entry and, when Graph
        events need it, the user's Graph row (the bench measures what filing them costs)."""
        return [owner_entity(record), *self.retention.entry_rows(record)]

    async def create(
        self,
        record: IdentityRecord,
        *,
        discard: Discard,
        on_filed: Callable[[], object] = lambda: None,
        clock: Clock = utcnow,
    ) -> IdentityRecord | None:
        """File a new identity, then map its user to it: the mapping that stands, ours or a
        concurrent first request's; None when the user was mapped and unmapped meanwhile (ask again).

        The index rows land first, in one transaction, so every mapping has them and an identity
        left unmapped (a crash, a lost race whose cleanup failed) is still on file for cleanup;
        `on_filed` is called once they have landed or failed. A lost race deletes our identity
        (`discard`), then its rows. A StoreError is raised when filing failed, and when the insert's
        outcome is unknown: then the timer settles it from the mapping (`queue_settle`, at `clock()`).
        """
        try:
            try:
                await self._file(record)
            except Exception:
                if await discard(record.communication_user_id):  # no mapping was tried: none names it
                    await self._forget_lost(record, user_mapped=False)
                raise
        finally:
            on_filed()
        try:
            etag = await self._insert(record)
        except Exception as err:  # noqa: BLE001 - settled from the mapping itself
            return await self._settle(record, err, discard, clock)
        return replace(record, etag=etag)

    @telemetry.table_operation("file_new")
    async def _file(self, record: IdentityRecord) -> None:
        # The Graph row names only the user: a racing request writes what the winner writes.
        await self.table.upsert_together(self.index_rows(record))

    @telemetry.table_operation("insert")
    async def _insert(self, record: IdentityRecord) -> str:
        """The mapping insert, which two racing first requests can't both win: AlreadyExists."""
        return await self.table.insert(record.to_entity())

    async def _settle(
        self, record: IdentityRecord, err: Exception, discard: Discard, clock: Clock
    ) -> IdentityRecord | None:
        """The insert failed: 409 when another request won the user, or when a retried insert found
        its own first try landed; any other failure may hide a landed insert too. The mapping says
        which: ours stands, or theirs is used, or there is none."""
        try:
            current = await self.get(record.user_key)
        except Exception:  # noqa: BLE001 - unknown: the timer settles it from the mapping
            await self._leave_for_timer(record, clock())
            raise err from None
        if current is not None and current.communication_user_id == record.communication_user_id:
            return current
        if current is None and not isinstance(err, Refused):
            # The outcome is unknown (a timeout, 500 OperationTimedOut): the insert may still land,
            # after this look. Discarding the identity now would leave a mapping naming a deleted
            # one; the timer settles it once a late write can no longer land.
            await self._leave_for_timer(record, clock())
            raise err
        # Not ours: delete our identity, and only then its rows, which until then let cleanup find it.
        if await discard(record.communication_user_id):
            await self._forget_lost(record, user_mapped=current is not None)
        if current is not None or isinstance(err, AlreadyExists):
            return current  # a concurrent first request's, or None: mapped and deleted in between
        raise err

    async def _leave_for_timer(self, record: IdentityRecord, now: dt.datetime) -> None:
        try:
            await self.pending.queue_settle(record.user_key, record.communication_user_id, now)
        except Exception as store_err:  # noqa: BLE001 - its retention entry still finds it later
            log.error("unsettled ACS identity not queued: %s; retention sweeps it", type(store_err).__name__)

    @telemetry.table_operation("forget_lost")
    async def _forget_lost(self, record: IdentityRecord, *, user_mapped: bool) -> None:
        """The rows of an identity no mapping names, once it is deleted or queued for deletion.

        The Graph row names only the user: with `user_mapped` (a lost race) it is the winner's.
        Without, it may be, too: a concurrent first request of the same user may have filed it and
        be about to insert its mapping, so it is not deleted now. The retention entry, which names
        it, stays instead, and cleanup's sweep drops both once the retention period has passed, if
        the user still has no mapping then (the identity's deletion is repeated; ACS says gone).
        """
        rows = [self.lookups.forget_owner(record.communication_user_id)]
        if user_mapped or self.lookups.graph_row(record) is None:
            rows.append(self.retention.forget(record))
        outcomes = await asyncio.gather(*rows, return_exceptions=True)
        if any(isinstance(outcome, BaseException) for outcome in outcomes):
            log.warning("a lost race's rows stay for cleanup to sweep")

    # ---- uses --------------------------------------------------------------------------------------

    @telemetry.table_operation("touch")
    async def touch(self, record: IdentityRecord, now: dt.datetime) -> None:
        """Record use (issue or refresh) once per day: the retention cleanup reads it."""
        values = {"lastUsedOn": now.date().isoformat(), "lastIssuedAt": now}
        await self.table.merge(record.user_key, keys.IDENTITY_ROW, values)

    @telemetry.table_operation("note_use")
    async def note_use(self, record: IdentityRecord, now: dt.datetime) -> None:
        """Record a use that got no token (its identity was blocked): the day only."""
        try:
            await self.table.merge(record.user_key, keys.IDENTITY_ROW, {"lastUsedOn": now.date().isoformat()})
        except Missing:
            pass

    @telemetry.table_operation("sessions_checked")
    async def sessions_checked(
        self, record: IdentityRecord, ended_at: dt.datetime | None
    ) -> IdentityRecord | None:
        """Mark a new mapping checked for events that ended its user's sessions (and when the
        latest did, if its bearer is newer), only while it names the identity that was checked:
        the mapping as marked, or None when it is gone or names another identity by now."""
        values: Entity = {"sessionsUnchecked": False}
        if ended_at is not None:
            values["sessionsEndedAt"] = ended_at
        current: IdentityRecord | None = record
        for _ in range(3):
            if current is None or current.communication_user_id != record.communication_user_id:
                return None
            if current.etag is not None:
                etag = await self.table.merge_if_unchanged(
                    record.user_key, keys.IDENTITY_ROW, current.etag, values
                )
                if etag is not None:
                    ended = ended_at or current.sessions_ended_at
                    return replace(current, sessions_checked=True, sessions_ended_at=ended, etag=etag)
            current = await self.get(record.user_key)  # changed since (a use, a block): look again
        return None  # still unchecked: the next request looks again

    # ---- revocations and deletions -----------------------------------------------------------------

    async def _if_still_mapped(
        self, record: IdentityRecord, write: Callable[[IdentityRecord], Awaitable[object]]
    ) -> bool:
        """Run `write(current)` on the mapping while it names `record`'s identity; False once it
        doesn't. `write` guards itself with `current.etag`: a revocation, deletion or cleanup acting
        on one identity may find the user on another by now, and never touches the newer mapping."""
        current: IdentityRecord | None = record if record.etag else None
        for _ in range(3):
            if current is None:
                current = await read_mapping(self.table, record.user_key)
                if current is None or current.communication_user_id != record.communication_user_id:
                    return False
            try:
                await write(current)
                return True
            except Missing:
                return False
            except Changed:
                current = None  # touched or marked meanwhile: look again
        raise Changed("The identity mapping keeps changing; try again.")

    @telemetry.table_operation("mark_pending")
    async def mark_pending(
        self, record: IdentityRecord, op: PendingOp, now: dt.datetime, retry_in: dt.timedelta
    ) -> None:
        """Durably queue `op` for the timer, then block the mapping. Queue first: a crash between
        the two leaves queued work (a revoke the timer drops once it is clearly abandoned, a delete
        it carries out), never a user blocked with no work queued. A mapping that names another
        identity by now is not blocked: the timer drops the queue row, and cleanup sweeps the old
        identity as unmapped."""
        pending_id = uuid.uuid4().hex
        await self.pending.queue(
            op,
            user_key=record.user_key,
            communication_user_id=record.communication_user_id,
            pending_id=pending_id,
            now=now,
            retry_in=retry_in,
        )

        async def write(current: IdentityRecord) -> None:
            if current.pending == "delete" and op != "delete":
                return  # never downgrade: a pending delete revokes too
            block = {"pending": op, "pendingId": pending_id}
            await self.table.merge(record.user_key, keys.IDENTITY_ROW, block, etag=current.etag)

        await self._if_still_mapped(record, write)

    @telemetry.table_operation("clear_pending")
    async def clear_pending(self, record: IdentityRecord) -> bool:
        """Unblock the user after a revoke completed, unless a newer request replaced this one."""
        unblocked: Entity = {"pending": "", "pendingId": ""}
        return (
            await self.table.merge_if_unchanged(record.user_key, keys.IDENTITY_ROW, record.etag, unblocked)
            is not None
        )

    @telemetry.table_operation("note_revoked")
    async def note_revoked(self, record: IdentityRecord, when: dt.datetime) -> IdentityRecord | None:
        """Mark the identity's tokens revoked as of `when`, before ACS is asked: no worker answers a
        token again across it (shared/storm.py). Only ever forward: a late, older mark never
        replaces a newer one, which would make tokens the newer revocation revoked current again.
        The mapping as marked (its etag, for a write that follows), None once it is gone."""
        current = record
        for _ in range(5):
            if current.tokens_revoked_at is not None and current.tokens_revoked_at >= when:
                return current
            try:
                etag = await self.table.merge(
                    record.user_key, keys.IDENTITY_ROW, {"tokensRevokedAt": when}, etag=current.etag
                )
                return replace(current, tokens_revoked_at=when, etag=etag)
            except Missing:
                return None  # deleted meanwhile: nothing can be answered for it any more
            except Changed:
                pass
            latest = await self.get(record.user_key)
            if latest is None:
                return None
            current = latest
        raise Changed("The identity mapping keeps changing; try again.")

    @telemetry.table_operation("remove")
    async def remove(self, record: IdentityRecord, *, reason: DeletionReason = "deleted") -> None:
        """Forget a deleted identity: mapping first (so no token is issued for it), then lookups.

        The user's partition keeps a note of when and why (`reason`: user, admin, event, retired,
        gone, deleted), so that their next refresh can say what happened instead of "no identity
        yet". Only when the mapping still named this identity: a user already on a newer one has
        nothing to be told.
        """

        async def delete(current: IdentityRecord) -> None:
            if not await self.table.delete(record.user_key, keys.IDENTITY_ROW, etag=current.etag):
                raise Missing("The mapping went meanwhile.")

        if await self._if_still_mapped(record, delete):
            try:
                await self.lookups.note_deletion(record.user_key, reason, utcnow())
            except Exception as err:  # noqa: BLE001 - the identity is gone either way; the note is a courtesy
                log.warning("could not note a deletion: %s", type(err).__name__)
        await self.lookups.forget_owner(record.communication_user_id)
        # The Graph row serves the user, whichever identity: it goes only with the user's mapping.
        if graph_row := self.lookups.graph_row(record):
            await self.lookups.forget_graph_row(record.user_key, graph_row)
        await self.retention.forget(record)
