"""What retention would delete next, and not before when: the timer's dry run for operators."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Literal

from .retention import RETIRE_GRACE, RetentionSteps

# unmapped: no user maps it; deleting: committed, ACS asked; claimed: waits for a use; stale: next
State = Literal["unmapped", "deleting", "claimed", "stale"]


@dataclass(frozen=True)
class Candidate:
    communication_user_id: str
    user_key: str
    last_used_on: str | None  # None: unmapped
    state: State
    not_before: dt.datetime


@dataclass(frozen=True)
class RetentionPreview:
    retention_days: int
    cutoff: str  # identities last used before this day are stale
    grace: dt.timedelta  # between a claim and its commit
    candidates: list[Candidate]
    truncated: bool


async def preview(cleanup: RetentionSteps, limit: int = 100) -> RetentionPreview:
    """What retention would delete next, and not before when, changing nothing: a dry run of
    the timer for operators (GET /api/manage/retention, `python -m devstack timer cleanup
    --dry-run`). A use before then still saves a mapped identity; an unmapped one has no user."""
    now, cutoff = cleanup.clock(), cleanup.cutoff()
    retiring = {
        (work.user_key, work.communication_user_id): work
        async for work in cleanup.store.pending.pending_work()
        if work.op == "retire"
    }
    listed: dict[str, Candidate] = {}
    truncated = False

    def add(
        key: str, communication_user_id: str, last_used_on: str | None, state: State, when: dt.datetime
    ) -> None:
        listed[communication_user_id] = Candidate(
            communication_user_id, key, last_used_on, state, max(when, now)
        )

    # One read a retention row: a committed retirement's rows are held until ACS deleted it.
    async for entry in cleanup.store.retention.entries_before(cutoff):
        if entry.communication_user_id in listed:
            continue
        if len(listed) >= limit:
            truncated = True
            break
        key, communication_user_id = entry.user_key, entry.communication_user_id
        record = await cleanup.store.identities.get(key)
        work = retiring.get((key, communication_user_id))
        if record is None or record.communication_user_id != communication_user_id:
            add(key, communication_user_id, None, "unmapped", now)
        elif record.last_used_on >= cutoff:
            continue  # used since: the row moves forward, or the timer gives the identity back
        elif record.pending == "retiring" and work and work.pending_id == record.pending_id:
            add(key, communication_user_id, record.last_used_on, "deleting", work.next_attempt_at)
        elif record.pending == "retire" and work:
            due = max(work.next_attempt_at, (work.requested_at or now) + RETIRE_GRACE)
            add(key, communication_user_id, record.last_used_on, "claimed", due)
        elif record.pending in ("", "retire"):  # a claim whose queued work a crash lost: as stale
            add(key, communication_user_id, record.last_used_on, "stale", now + RETIRE_GRACE)
        # Otherwise a request's revoke or delete: its work, not retention's.
    return RetentionPreview(cleanup.retention_days, cutoff, RETIRE_GRACE, list(listed.values()), truncated)
