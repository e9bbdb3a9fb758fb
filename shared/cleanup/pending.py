"""Queued work: revocations and deletions ACS did not answer in the request, retention's
commits, and new identities whose mapping insert had no clear answer (settled from the mapping).

Every piece is claimed with an etag lease before ACS is called, and every step is idempotent or
etag-guarded (unblocking the user only succeeds if nobody blocked the mapping again since it was
read), so a revocation is applied once and never after the user has been unblocked, and a queued
delete is never lost to a revoke.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter

from ..errors import NotFound, ServiceError
from ..store.pending import PendingWork
from ..store.record import IdentityRecord
from .common import CONCURRENCY, LEASE, TIMER_OPTIONS, Budget, backoff
from .retention import RETIRE_GRACE, RetentionSteps

log = logging.getLogger("acs_token_service.cleanup")

# A revoke queued this recently whose block is not on the mapping yet may be a request still on
# its way, not one that crashed: keep it until it is clearly abandoned.
BLOCK_GRACE = dt.timedelta(minutes=10)
# Before an identity whose mapping insert had no clear answer is deleted as unmapped: the Table
# service gives up on a write after at most 30 s ("Setting timeouts for Table service operations",
# Microsoft Learn), and the SDK's retries of it land within minutes.
LATE_WRITE_GRACE = dt.timedelta(minutes=10)


class PendingSteps(RetentionSteps):
    async def _pending(self, counts: Counter, budget: Budget, deadline: float, ignore_backoff: bool) -> None:
        now = self.clock()
        due = [work async for work in self.store.pending.pending_work() if _due(work, now, ignore_backoff)]
        counts["pending_due"] += len(due)
        gate = asyncio.Semaphore(CONCURRENCY)

        async def one(work: PendingWork) -> None:
            async with gate:
                if time.monotonic() > deadline:
                    counts["deferred_deadline"] += 1
                    return
                if not budget.take("revoke" if work.op == "revoke" else "delete"):
                    counts["deferred_budget"] += 1
                    return
                try:
                    await self._complete(work, counts, budget)
                except Exception as err:  # noqa: BLE001 - its lease lapses; the next run takes it up
                    counts["pending_failed"] += 1
                    log.warning("pending work step failed: %s", type(err).__name__)

        await asyncio.gather(*(one(work) for work in due))

    async def _complete(self, work: PendingWork, counts: Counter, budget: Budget) -> None:
        claimed = await self.store.pending.claim(work, self.clock() + LEASE)
        if claimed is None:
            counts["skipped_claimed_elsewhere"] += 1
            return
        record = await self.store.identities.get(work.user_key) if work.user_key else None
        if work.op == "retire":
            try:
                await self._commit_retirement(claimed, record, counts)
            except Exception as err:  # noqa: BLE001 - its lease lapses; a later run judges it again
                await self.store.pending.retry_later(claimed, self.clock() + backoff(work.attempts))
                counts["retry_retire"] += 1
                log.info("cleanup retire retry attempts=%d reason=%s", work.attempts + 1, type(err).__name__)
            return
        mapped = record is not None and record.communication_user_id == work.communication_user_id
        try:
            if work.op in ("settle", "discard"):
                await self._unmapped(claimed, mapped, counts)
            elif record is not None and mapped:
                await self._requested(claimed, record, counts, budget)
            else:
                await self.store.pending.finish(claimed)  # done already, or the user has another identity
                counts["dropped_stale"] += 1
        except Exception as err:  # noqa: BLE001 - one failed item must not stop the run
            reason = err.code if isinstance(err, ServiceError) else type(err).__name__
            await self.store.pending.retry_later(claimed, self.clock() + backoff(work.attempts))
            counts[f"retry_{work.op}"] += 1
            log.info("cleanup %s retry attempts=%d reason=%s", work.op, work.attempts + 1, reason)

    async def _unmapped(self, work: PendingWork, mapped: bool, counts: Counter) -> None:
        """An identity nobody maps: a lost race's, or one whose mapping insert had no clear answer
        (`settle`: kept if the insert landed after all, deleted once no late insert can land)."""
        if work.op == "settle" and mapped:
            await self.store.pending.finish(work)
            counts["settled_mapped"] += 1
            return
        await self.acs.delete(work.communication_user_id, **TIMER_OPTIONS)
        if work.op == "settle":  # its retention row stays: the sweep drops it with the Graph row
            await self.store.lookups.forget_owner(work.communication_user_id)
        await self.store.pending.finish(work)
        counts["settled_discarded" if work.op == "settle" else "discarded"] += 1

    async def _requested(
        self, work: PendingWork, record: IdentityRecord, counts: Counter, budget: Budget
    ) -> None:
        """A revoke or delete a request asked for, on the identity the user is still mapped to."""
        now = self.clock()
        op = work.op
        if op == "revoke" and not record.pending:
            if await self._block_may_land(work, counts):
                return
            await self.store.pending.finish(work)  # done: the user is unblocked
            counts["dropped_stale"] += 1
            return
        # Whichever request blocked the mapping last (racing requests may cross their ids), do
        # the stronger of the two, so that no blocked user waits for work nobody will do.
        if op == "revoke" and record.pending == "delete":
            if not budget.take("delete"):
                await self.store.pending.retry_later(work, now)
                counts["deferred_budget"] += 1
                return
            op = "delete"
        if op == "revoke":
            await self._revoke(work, record, counts)
            return
        await self.acs.delete(work.communication_user_id, **TIMER_OPTIONS)
        await self.store.identities.remove(record)
        await self.store.pending.finish(work)
        counts["deleted"] += 1

    async def _block_may_land(self, work: PendingWork, counts: Counter) -> bool:
        """A request's revoke whose block may still be on its way (BLOCK_GRACE): taken again after a
        LEASE instead of finished now, when its block would land on nobody's work."""
        now = self.clock()
        if work.requested_at is None or now - work.requested_at >= BLOCK_GRACE:
            return False
        await self.store.pending.retry_later(work, now + LEASE)
        counts["waiting_for_block"] += 1
        return True

    async def _revoke(self, work: PendingWork, record: IdentityRecord, counts: Counter) -> None:
        # Marked first, as a request's revocation is (shared/storm.py).
        marked = await self.store.identities.note_revoked(record, self.clock())
        try:
            await self.acs.revoke(work.communication_user_id, **TIMER_OPTIONS)
        except NotFound:
            # The identity is gone: so are its tokens.
            await self.store.identities.remove(record, reason="gone")
            await self.store.pending.finish(work)
            counts["revoked_identity_gone"] += 1
            return
        if record.pending != "revoke":  # its block has not landed; retention's claim stays its own
            if await self._block_may_land(work, counts):
                return
            await self.store.pending.finish(work)
            counts["revoked"] += 1
            return
        current = marked  # the mapping as the mark left it: changed since, the clear below fails
        if current is None or current.pending_id != record.pending_id:
            await self.store.pending.retry_later(work, self.clock())  # changed meanwhile: judged again
            counts["revoked_still_blocked"] += 1
            return
        if not await self.store.identities.clear_pending(current):
            # Blocked again (or touched) since it was read: keep the work, the next run sees why.
            await self.store.pending.retry_later(work, self.clock())
            counts["revoked_still_blocked"] += 1
            return
        await self.store.pending.finish(work)
        counts["revoked"] += 1


GRACE = {"retire": RETIRE_GRACE, "settle": LATE_WRITE_GRACE}


def _due(work: PendingWork, now: dt.datetime, ignore_backoff: bool) -> bool:
    """Due unless leased, or backing off; a retention claim or a settlement never before its grace
    has passed, not even when backoff is ignored (`make timer`): what may still land must have."""
    if work.lease_until and work.lease_until > now:
        return False
    grace = GRACE.get(work.op)
    if grace is not None and work.requested_at is not None and now < work.requested_at + grace:
        return False
    return ignore_backoff or work.next_attempt_at <= now
