"""Retention, the one deletion nobody asked for, in two steps that a use always wins over.

A run *claims* a stale identity (`pending="retire"` on the mapping, etag-guarded on the row it
judged), and a run at least RETIRE_GRACE later *commits* the claim (`pending="retiring"`,
etag-guarded on the mapping judged still claimed and still stale) before it asks ACS to delete. A
token request that finds a claim cancels it with its last-use write before it asks ACS for a token;
one that read the mapping before the claim writes its use within RETIRE_GRACE. Either way the
commit fails, and the identity stays (README, "Retention").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter
from typing import TypeIs

from ..errors import Code, ServiceError
from ..store.keys import retention_row
from ..store.pending import PendingWork
from ..store.record import IdentityRecord
from ..store.retention import RetentionEntry
from .common import LEASE, TIMER_OPTIONS, Budget, Parts, backoff

log = logging.getLogger("acs_token_service.cleanup")

# Between a retention claim and its commit: longer than any request may hold a mapping it read
# before the claim (host.json's functionTimeout, 5 min; tests/test_retention.py checks).
RETIRE_GRACE = dt.timedelta(minutes=10)
# Retention's ACS delete is given up on after this, well inside LEASE: the run that holds the work
# is done with ACS before another run may take it over.
ACS_DELETE_DEADLINE = dt.timedelta(seconds=60)
PROBE_DEADLINE = dt.timedelta(seconds=15)  # asking ACS whether an identity is still there
# Whether an identity is still there is asked once (the gateway does not retry `exists`), and
# azure-core does not retry a connection either: a failed answer only defers it to the next run.
PROBE_OPTIONS = {"retry_total": 0}
# ACS answers that say it did not act (shared/acs.py): a retirement may give way to a use then.
ACS_REFUSALS = (Code.ACS_THROTTLED, Code.ACS_AUTH_FAILED, Code.ACS_REJECTED)


class RetentionSteps(Parts):
    def cutoff(self) -> str:
        """Identities last used before this day are stale."""
        return (self.clock() - dt.timedelta(days=self.retention_days)).date().isoformat()

    async def _retention(self, counts: Counter, budget: Budget, deadline: float) -> None:
        cutoff = self.cutoff()
        async for entry in self.store.retention.entries_before(cutoff):
            if time.monotonic() > deadline:
                counts["deferred_deadline"] += 1
                return
            try:
                if not await self._move_or_claim(entry, cutoff, counts, budget):
                    counts["deferred_budget"] += 1
                    return
            except Exception as err:  # noqa: BLE001 - the row stays: the next run tries again
                counts["retention_failed"] += 1
                log.warning("retention step failed: %s", type(err).__name__)

    async def _move_or_claim(
        self, entry: RetentionEntry, cutoff: str, counts: Counter, budget: Budget
    ) -> bool:
        """One retention row; False when the run's budget is spent. A stale identity is only
        claimed here: `_commit_retirement`, a later run, deletes it if nobody used it meanwhile."""
        record = await self.store.identities.get(entry.user_key)
        if record is not None and entry.communication_user_id == record.communication_user_id:
            if record.last_used_on >= cutoff:
                await self.store.retention.move_forward(entry, record)
                counts["retention_refiled"] += 1
                return True
            if record.pending == "retire":  # claimed by an earlier run; its work may have been lost
                if await self.store.retention.queue_retirement(
                    record, self.clock(), RETIRE_GRACE, entry.row_key
                ):
                    counts["retention_requeued"] += 1
                return True
            if record.pending:
                counts["retention_pending_elsewhere"] += 1
                return True
            if not budget.take("claim"):
                return False
            if await self.store.retention.claim_retirement(record, self.clock(), RETIRE_GRACE, entry.row_key):
                counts["retention_claimed"] += 1
            else:
                counts["retention_used_meanwhile"] += 1  # or another run claimed it first
            return True
        if entry.lease_until is not None and entry.lease_until > self.clock():
            counts["retention_claimed_elsewhere"] += 1
            return True
        if not budget.take("delete"):
            return False
        if not await self.store.retention.claim_sweep(entry, self.clock() + LEASE):
            counts["retention_claimed_elsewhere"] += 1  # or retired meanwhile: its row is gone
            return True
        await self._sweep(entry, counts)
        return True

    async def _sweep(self, entry: RetentionEntry, counts: Counter) -> None:
        """Its user maps to another identity, or to none: this one was deleted, or a crash (or a lost
        race whose cleanup failed) left it unmapped. Deleting it again is harmless: ACS says so.
        A retention row is older than any mapping insert still on its way (`tokens._settle`)."""
        await self.acs.delete(entry.communication_user_id, **TIMER_OPTIONS)
        await self.store.lookups.forget_owner(entry.communication_user_id)
        if entry.graph_row:  # a first issue that never got its mapping filed one
            await self.store.lookups.forget_graph_row(entry.user_key, entry.graph_row)
        await self.store.retention.drop_entry(entry.row_key)
        counts["retention_unmapped_deleted"] += 1

    async def _commit_retirement(
        self, work: PendingWork, record: IdentityRecord | None, counts: Counter
    ) -> None:
        """A claim's second step: delete only what is still claimed, by this claim, and still stale
        now. A use since, a user's or admin's request, or an event has replaced or cancelled it."""
        if not _claimed_by(record, work):
            await self.store.pending.finish(work)
            counts["retention_cancelled"] += 1
            return
        if record.pending == "retiring":
            if not await self._still_in_acs(record):
                await self._forget_retired(work, record, counts)  # an earlier attempt's delete landed
                return
            # Read again: a use refused (409) while ACS was asked was noted on the mapping since.
            record = await self.store.identities.get(work.user_key)
            if not _claimed_by(record, work):
                await self.store.pending.finish(work)
                counts["retention_cancelled"] += 1
                return
        # Claimed, or committed by an earlier attempt that got no answer from ACS (and the identity
        # is still there): a use since wins, one while it was blocked included (409, shared/tokens.py).
        if record.last_used_on >= self.cutoff():
            if await self.store.identities.clear_pending(record):
                await self.store.pending.finish(work)
                counts["retention_cancelled"] += 1
            else:
                await self.store.pending.retry_later(work, self.clock())
            return
        if record.pending == "retire":
            committed = await self.store.retention.commit_retirement(record)
            if committed is None:  # changed since it was read: judged again by the next run
                await self.store.pending.retry_later(work, self.clock())
                counts["retention_changed"] += 1
                return
            record = committed
        # Committed, now or by a run that stopped before ACS answered: no use can cancel it now.
        # Its rows are held, so that another run's scan does not sweep it as unmapped meanwhile,
        # and the work's lease renewed to outlast the ACS call, so that no other run reopens the
        # claim while this one's delete may still land; a run that lost the lease stops here.
        lease = self.clock() + LEASE
        own_row = retention_row(record.last_used_on, record.user_key, record.communication_user_id)
        await self.store.retention.lease_entries([r for r in (own_row, work.retention_row) if r], lease)
        held = await self.store.pending.claim(work, lease)
        if held is None:
            counts["skipped_claimed_elsewhere"] += 1
            return
        try:
            async with asyncio.timeout(ACS_DELETE_DEADLINE.total_seconds()):
                await self.acs.delete(record.communication_user_id, **TIMER_OPTIONS)
        except Exception as err:  # noqa: BLE001 - throttled, failing, or no answer
            await self._retirement_failed(held, record, err, counts)
            return
        await self._forget_retired(held, record, counts)

    async def _still_in_acs(self, record: IdentityRecord) -> bool:
        """Did an earlier attempt's delete land? Asked at least backoff(0) after that attempt gave
        up, by when ACS has long finished with it; once, and briefly: a run has other work."""
        async with asyncio.timeout(PROBE_DEADLINE.total_seconds()):
            return await self.acs.exists(record.communication_user_id, **PROBE_OPTIONS)

    async def _retirement_failed(
        self, work: PendingWork, record: IdentityRecord, err: Exception, counts: Counter
    ) -> None:
        """ACS did not delete. A clear refusal (throttled, forbidden) reverts to a claim, so that a
        returning user is not kept waiting for ACS to recover. Without a clear answer the delete
        may still land: the user stays refused (409) until the next attempt gets an answer."""
        refused = isinstance(err, ServiceError) and err.code in ACS_REFUSALS
        if refused:
            await self.store.retention.reopen_retirement(record)
        await self.store.pending.retry_later(
            work, self.clock() + (backoff(work.attempts) if refused else backoff(0))
        )
        counts["retry_retire"] += 1
        reason = err.code if isinstance(err, ServiceError) else type(err).__name__
        log.info("cleanup retire retry attempts=%d reason=%s", work.attempts + 1, reason)

    async def _forget_retired(self, work: PendingWork, record: IdentityRecord, counts: Counter) -> None:
        """ACS deleted it: drop the mapping while it is still this retirement's (a request's own
        revoke or delete may have replaced it, and its work then finds the identity gone), and
        the rows, the judged one too if a crash mid-move left it on another day."""
        current = await self.store.identities.get(record.user_key)
        if current is not None and current.communication_user_id == record.communication_user_id:
            if current.pending == "retiring" and current.pending_id == record.pending_id:
                await self.store.identities.remove(current, reason="retired")
        else:
            await self.store.identities.remove(
                record, reason="retired"
            )  # its rows (the mapping is gone already)
        if work.retention_row:
            await self.store.retention.drop_entry(work.retention_row)
        await self.store.pending.finish(work)
        counts["retention_deleted"] += 1


def _claimed_by(record: IdentityRecord | None, work: PendingWork) -> TypeIs[IdentityRecord]:
    """The mapping still carries this retirement's claim or commit, not a request's block or a use."""
    return (
        record is not None
        and record.communication_user_id == work.communication_user_id
        and record.pending_id == work.pending_id
        and record.pending in ("retire", "retiring")
    )
