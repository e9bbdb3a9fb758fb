"""What retention would delete next, and not before when: the timer's dry run for operators."""

from __future__ import annotations

import datetime as dt

from .retention import RETIRE_GRACE, RetentionSteps


async def preview(cleanup: RetentionSteps, limit: int = 100) -> dict:
    """What retention would delete next, and not before when, changing nothing: a dry run of
    the timer for operators (GET /api/manage/retention, `python -m devstack timer cleanup
    --dry-run`). A use before then still saves a mapped identity; an unmapped one has no user."""
    now, cutoff = cleanup.clock(), cleanup.cutoff()
    retiring = {
        (work.user_key, work.communication_user_id): work
        async for work in cleanup.store.pending.pending_work()
        if work.op == "retire"
    }
    listed: list[dict] = []
    seen: set[str] = set()
    truncated = False

    def add(communication_user_id: str, user_key: str, last_used_on: str | None, state: str, when) -> None:
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
    async for entry in cleanup.store.retention.entries_before(cutoff):
        if entry.communication_user_id in seen:
            continue
        if len(listed) >= limit:
            truncated = True
            break
        record = await cleanup.store.identities.get(entry.user_key)
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
        "retentionDays": cleanup.retention_days,
        "cutoff": cutoff,
        "graceMinutes": int(RETIRE_GRACE.total_seconds() // 60),
        "identities": listed[:limit],
        "truncated": truncated or len(listed) > limit,
    }


def _iso(value: dt.datetime) -> str:
    return value.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
