"""The cleanup timer: finish pending revocations and deletions, and retire unused identities.

Safe to run twice at once and to stop midway: every piece of work is claimed with an etag lease
before ACS is called, and every step is idempotent or etag-guarded (unblocking the user only
succeeds if nobody blocked the mapping again since it was read), so a revocation is applied once
and never after the user has been unblocked, and a queued delete is never lost to a revoke. It
stays well under ACS's limits (500 revokes and 500 deletes per 30 s): each run spends at most
RUN_BUDGET of each, so even two overlapping runs stay below them, and a run stops taking work
near its deadline. Alongside, it keeps the Microsoft Graph subscription alive (`shared.graph`):
the lifecycle notification that asks for a renewal may never come.

Retention is the system's choice, never the user's, so a use always wins over it, in two steps:
a run *claims* a stale identity (`pending="retire"` on the mapping, etag-guarded on the row it
judged), and a run at least RETIRE_GRACE later *commits* the claim (`pending="delete"`, etag-guarded
on the mapping judged still claimed and still stale) before it asks ACS to delete. A token request
that finds a claim cancels it with its last-use write before it asks ACS for a token; one that read
the mapping before the claim writes its use within RETIRE_GRACE. Either way the commit fails, and
the identity stays (README, "Retention").
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, TypeIs

from .acs import AcsGateway
from .clock import Clock, utcnow
from .errors import NotFound, ServiceError
from .store.identities import IdentityRecord
from .store.keys import retention_row
from .store.pending import PendingWork
from .store.retention import RetentionEntry
from .store.stores import Stores

if TYPE_CHECKING:
    from .graph import GraphSubscriptions

log = logging.getLogger("acs_token_service.cleanup")

RUN_BUDGET = 240  # ACS calls of each kind per run
CONCURRENCY = 16
LEASE = dt.timedelta(minutes=2)
# A revoke queued this recently whose block is not on the mapping yet may be a request still on
# its way, not one that crashed: keep it until it is clearly abandoned.
BLOCK_GRACE = dt.timedelta(minutes=10)
MAX_BACKOFF = dt.timedelta(hours=1)
# Between a retention claim and its commit: longer than any request may hold a mapping it read
# before the claim (host.json's functionTimeout, 5 min; tests/test_retention.py checks).
RETIRE_GRACE = dt.timedelta(minutes=10)
# Before an identity whose mapping insert had no clear answer is deleted as unmapped: the Table
# service gives up on a write after at most 30 s ("Setting timeouts for Table service operations",
# Microsoft Learn), and the SDK's retries of it land within minutes.
LATE_WRITE_GRACE = dt.timedelta(minutes=10)
# Retention's ACS delete is given up on after this, well inside LEASE: the run that holds the work
# is done with ACS before another run may take it over.
ACS_DELETE_DEADLINE = dt.timedelta(seconds=60)
PROBE_DEADLINE = dt.timedelta(seconds=15)  # asking ACS whether an identity is still there
# ACS answers that say it did not act (shared/acs.py): a retirement may give way to a use then.
ACS_REFUSALS = ("acs_throttled", "acs_auth_failed", "acs_rejected")
# Event Grid redelivers for at most 24 hours; remembering ids for a week is ample.
EVENT_MEMORY = dt.timedelta(days=7)
TIMER_OPTIONS = {"retry_total": 1, "retry_backoff_factor": 0.2}
# Whether an identity is still there is asked once: azure-core honours Retry-After uncapped, and a
# throttled answer only defers the question to the next run.
PROBE_OPTIONS = {"retry_total": 0}


def backoff(attempts: int) -> dt.timedelta:
    """30 s, 1 min, 2 min, ... up to an hour between attempts."""
    return min(dt.timedelta(seconds=30) * (2 ** min(attempts, 12)), MAX_BACKOFF)


class Budget:
    def __init__(self, limit: int) -> None:
        self.left = {"revoke": limit, "delete": limit, "claim": limit}

    def take(self, kind: str) -> bool:
        if self.left[kind] <= 0:
            return False
        self.left[kind] -= 1
        return True


class Cleanup:
    def __init__(
        self,
        store: Stores,
        acs: AcsGateway,
        *,
        retention_days: int,
        clock: Clock = utcnow,
        graph: GraphSubscriptions | None = None,
    ) -> None:
        self.store = store
        self.acs = acs
        self.retention_days = retention_days
        self.clock = clock
        self.graph = graph

    async def run(self, *, ignore_backoff: bool = False, deadline_seconds: float = 50.0) -> dict[str, int]:
        counts: Counter[str] = Counter()
        budget = Budget(RUN_BUDGET)
        deadline = time.monotonic() + deadline_seconds
        started = time.monotonic()
        # Concurrent with the rest, so that its Graph and Table calls add nothing to the run's
        # slowest finish (host.json's functionTimeout is sized for that; tests/test_infra.py).
        graph = asyncio.create_task(self._graph(counts)) if self.graph is not None else None
        try:
            await self._pending(counts, budget, deadline, ignore_backoff)
            await self._retention(counts, budget, deadline)
            forgotten = await self.store.marks.forget_before(self.clock() - EVENT_MEMORY)
            if forgotten:
                counts["event_ids_forgotten"] = forgotten
        finally:
            if graph is not None:
                await graph
        report = dict(sorted(counts.items()))
        log.info(
            "cleanup run done in %.1fs: %s",
            time.monotonic() - started,
            " ".join(f"{k}={v}" for k, v in report.items()) or "nothing to do",
        )
        return report

    async def _graph(self, counts: Counter) -> None:
        """Renew (or create) the Graph subscription when due; a failure is recorded for health by
        `shared.graph` and retried by the next run, and never stops this one."""
        try:
            counts.update(await self.graph.maintain())
        except ServiceError as err:
            counts["graph_renewal_failed"] += 1
            log.warning("graph subscription step failed: %s", err.code)
        except Exception as err:  # noqa: BLE001 - Table Storage down: the next run tries again
            counts["graph_renewal_failed"] += 1
            log.warning("graph subscription step failed: %s", type(err).__name__)

    # ---- pending revocations and deletions -------------------------------------------------------

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
                kind = "revoke" if work.op == "revoke" else "delete"
                if not budget.take(kind):
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
        op = work.op
        if op == "retire":
            try:
                await self._commit_retirement(claimed, record, counts)
            except Exception as err:  # noqa: BLE001 - its lease lapses; a later run judges it again
                await self.store.pending.retry_later(claimed, self.clock() + backoff(work.attempts))
                counts["retry_retire"] += 1
                log.info("cleanup retire retry attempts=%d reason=%s", work.attempts + 1, type(err).__name__)
            return
        if op == "settle":  # a mapping insert without a clear answer: did it land?
            if record is not None and record.communication_user_id == work.communication_user_id:
                await self.store.pending.finish(claimed)
                counts["settled_mapped"] += 1
                return
            op = "discard"  # nobody maps it, and no late insert can land any more
        if op != "discard":
            mapped = record is not None and record.communication_user_id == work.communication_user_id
            now = self.clock()
            if mapped and op == "revoke" and not record.pending:
                if work.requested_at is not None and now - work.requested_at < BLOCK_GRACE:
                    await self.store.pending.retry_later(claimed, now + LEASE)  # its block may be on its way
                    counts["waiting_for_block"] += 1
                    return
            # A revoke is done once the user is unblocked; a delete once the identity is unmapped.
            if not mapped or (op == "revoke" and not record.pending):
                await self.store.pending.finish(claimed)  # done already, or the user has another identity
                counts["dropped_stale"] += 1
                return
            # Whichever request blocked the mapping last (racing requests may cross their ids), do
            # the stronger of the two, so that no blocked user waits for work nobody will do.
            if op == "revoke" and record.pending == "delete":
                if not budget.take("delete"):
                    await self.store.pending.retry_later(claimed, now)
                    counts["deferred_budget"] += 1
                    return
                op = "delete"
        try:
            if op == "revoke":
                await self._revoke(claimed, record, counts)
            elif op == "delete":
                await self.acs.delete(work.communication_user_id, **TIMER_OPTIONS)
                await self.store.identities.remove(record)
                await self.store.pending.finish(claimed)
                counts["deleted"] += 1
            else:
                await self.acs.delete(work.communication_user_id, **TIMER_OPTIONS)
                if work.op == "settle":  # its retention row stays: the sweep drops it with the Graph row
                    await self.store.lookups.forget_owner(work.communication_user_id)
                await self.store.pending.finish(claimed)
                counts["settled_discarded" if work.op == "settle" else "discarded"] += 1
        except Exception as err:  # noqa: BLE001 - one failed item must not stop the run
            reason = err.code if isinstance(err, ServiceError) else type(err).__name__
            await self.store.pending.retry_later(claimed, self.clock() + backoff(work.attempts))
            counts[f"retry_{work.op}"] += 1
            log.info("cleanup %s retry attempts=%d reason=%s", work.op, work.attempts + 1, reason)

    async def _revoke(self, work: PendingWork, record: IdentityRecord, counts: Counter) -> None:
        try:
            await self.acs.revoke(work.communication_user_id, **TIMER_OPTIONS)
        except NotFound:
            await self.store.identities.remove(
                record, reason="gone"
            )  # the identity is gone: so are its tokens
            await self.store.pending.finish(work)
            counts["revoked_identity_gone"] += 1
            return
        if record.pending != "revoke":  # its block has not landed; retention's claim stays its own
            if work.requested_at is not None and self.clock() - work.requested_at < BLOCK_GRACE:
                # The block may still be on its way: finished now, it would land on nobody's work.
                await self.store.pending.retry_later(work, self.clock() + LEASE)
                counts["waiting_for_block"] += 1
                return
            await self.store.pending.finish(work)
            counts["revoked"] += 1
            return
        if not await self.store.identities.clear_pending(record):
            # Blocked again (or touched) since it was read: keep the work, the next run sees why.
            await self.store.pending.retry_later(work, self.clock())
            counts["revoked_still_blocked"] += 1
            return
        await self.store.pending.finish(work)
        counts["revoked"] += 1

    # ---- retention -----------------------------------------------------------------------------------

    def _cutoff(self) -> str:
        """Identities last used before this day are stale."""
        return (self.clock() - dt.timedelta(days=self.retention_days)).date().isoformat()

    async def _retention(self, counts: Counter, budget: Budget, deadline: float) -> None:
        cutoff = self._cutoff()
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
        if record.last_used_on >= self._cutoff():
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

    # ---- what retention would do next ------------------------------------------------------------------

    async def preview(self, limit: int = 100) -> dict:
        """What retention would delete next, and not before when, changing nothing: a dry run of
        the timer for operators (GET /api/manage/retention, `python -m devstack timer cleanup
        --dry-run`). A use before then still saves a mapped identity; an unmapped one has no user."""
        now, cutoff = self.clock(), self._cutoff()
        retiring = {
            (work.user_key, work.communication_user_id): work
            async for work in self.store.pending.pending_work()
            if work.op == "retire"
        }
        listed: list[dict] = []
        seen: set[str] = set()
        truncated = False

        def add(
            communication_user_id: str, user_key: str, last_used_on: str | None, state: str, when
        ) -> None:
            seen.add(communication_user_id)
            listed.append(
                {
                    "communicationUserId": communication_user_id,
                    "userKey": user_key,
                    "lastUsedOn": last_used_on,
                    "state": state,
                    "notBefore": _iso(max(when, now)),
                }
            )

        # One read a retention row: a committed retirement's rows are held until ACS deleted it.
        async for entry in self.store.retention.entries_before(cutoff):
            if entry.communication_user_id in seen:
                continue
            if len(listed) >= limit:
                truncated = True
                break
            record = await self.store.identities.get(entry.user_key)
            work = retiring.get((entry.user_key, entry.communication_user_id))
            if record is None or record.communication_user_id != entry.communication_user_id:
                add(entry.communication_user_id, entry.user_key, None, "unmapped", now)
            elif record.last_used_on >= cutoff:
                continue  # used since: the row moves forward, or the timer gives the identity back
            elif record.pending == "retiring" and work and work.pending_id == record.pending_id:
                add(
                    entry.communication_user_id,
                    entry.user_key,
                    record.last_used_on,
                    "deleting",
                    work.next_attempt_at,
                )
            elif record.pending == "retire" and work:
                due = max(work.next_attempt_at, (work.requested_at or now) + RETIRE_GRACE)
                add(entry.communication_user_id, entry.user_key, record.last_used_on, "claimed", due)
            elif record.pending in ("", "retire"):  # a claim whose queued work a crash lost: as stale
                add(
                    entry.communication_user_id,
                    entry.user_key,
                    record.last_used_on,
                    "stale",
                    now + RETIRE_GRACE,
                )
            # Otherwise a request's revoke or delete: its work, not retention's.
        return {
            "retentionDays": self.retention_days,
            "cutoff": cutoff,
            "graceMinutes": int(RETIRE_GRACE.total_seconds() // 60),
            "identities": listed[:limit],
            "truncated": truncated or len(listed) > limit,
        }


def _claimed_by(record: IdentityRecord | None, work: PendingWork) -> TypeIs[IdentityRecord]:
    """The mapping still carries this retirement's claim or commit, not a request's block or a use."""
    return (
        record is not None
        and record.communication_user_id == work.communication_user_id
        and record.pending_id == work.pending_id
        and record.pending in ("retire", "retiring")
    )


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


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
