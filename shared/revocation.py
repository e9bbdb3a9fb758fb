"""Revoking tokens and deleting identities, now if ACS answers, durably later if it does not.

Nothing is lost: when ACS is throttled or down, the request is written to the pending queue and
the user's mapping is blocked (no new token) *before* we answer 202; the cleanup timer completes
it. The request path tries ACS once with a single retry so that callers get their answer quickly.
"""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import dataclass
from typing import Literal

from . import telemetry
from .acs import QUEUED_OPTIONS, AcsGateway
from .clock import Clock, utcnow
from .errors import NotFound, Unavailable
from .store.record import IdentityRecord
from .store.stores import Stores

log = logging.getLogger("acs_token_service.revocation")

FIRST_RETRY = dt.timedelta(seconds=30)


@dataclass(frozen=True)
class Outcome:
    status: Literal["revoked", "deleted", "pending"]  # pending: queued for the timer (202)
    communication_user_id: str


def _ref(record: IdentityRecord) -> str:
    """A log handle for the user: a prefix of its hashed key, never the subject itself."""
    return record.user_key[:12]


class RevocationService:
    def __init__(self, store: Stores, acs: AcsGateway, clock: Clock = utcnow) -> None:
        self.store = store
        self.acs = acs
        self.clock = clock

    @telemetry.counts_revocations("revoke")
    async def revoke(self, record: IdentityRecord, *, source: str) -> Outcome:
        # A request's pending delete revokes too, and a pending revoke covers this one; retention's
        # claim or commit ("retire", "retiring") is not a revocation: this one goes ahead.
        if record.pending in ("revoke", "delete"):
            return Outcome("pending", record.communication_user_id)
        # Marked first: from here no worker answers a token issued before again (shared/storm.py);
        # if the mark cannot be written, ACS is not asked and the caller retries (503).
        # The mapping as marked, so that a write after ACS's answer needs no re-read (a new etag).
        record = await self.store.identities.note_revoked(record, self.clock()) or record
        try:
            await self.acs.revoke(record.communication_user_id, **QUEUED_OPTIONS)
        except NotFound:
            log.info("revoke found the identity gone source=%s user=%s", source, _ref(record))
            await self.store.identities.remove(record, reason="gone")
            return Outcome("revoked", record.communication_user_id)
        except Unavailable as err:
            await self.store.identities.mark_pending(record, "revoke", self.clock(), FIRST_RETRY)
            log.info("revoke pending source=%s user=%s reason=%s", source, _ref(record), err.code)
            return Outcome("pending", record.communication_user_id)
        log.info("revoke done source=%s user=%s", source, _ref(record))
        return Outcome("revoked", record.communication_user_id)

    @telemetry.counts_revocations("delete")
    async def delete(self, record: IdentityRecord, *, source: str) -> Outcome:
        """Retention's claim or commit on the identity ("retire", "retiring") gives way to it: the
        mapping is marked for this delete, which ACS's answer to retention no longer undoes."""
        if record.pending == "delete":
            return Outcome("pending", record.communication_user_id)
        # Durable before ACS is asked: queued and blocked first, so that a crash after ACS deleted
        # the identity leaves work the timer completes (ACS's 404 then counts as done), never a
        # mapping that names an identity ACS no longer has.
        await self.store.identities.mark_pending(record, "delete", self.clock(), FIRST_RETRY)
        try:
            await self.acs.delete(record.communication_user_id, **QUEUED_OPTIONS)
        except Unavailable as err:
            log.info("delete pending source=%s user=%s reason=%s", source, _ref(record), err.code)
            return Outcome("pending", record.communication_user_id)
        try:
            await self.store.identities.remove(
                record, reason=source if source in ("user", "admin") else "event"
            )
            await self.store.pending.forget(record.user_key, record.communication_user_id, "delete")
        except Exception as err:  # noqa: BLE001 - ACS is done; let the timer tidy the rows
            log.warning(
                "delete left rows behind source=%s user=%s error=%s", source, _ref(record), type(err).__name__
            )
            return Outcome("pending", record.communication_user_id)  # still queued: the timer tidies
        log.info("delete done source=%s user=%s", source, _ref(record))
        return Outcome("deleted", record.communication_user_id)
