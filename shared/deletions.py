"""Identities that are gone: what a user is told when they have none (never had one, or had one
that was deleted, and by whom or what: the reason `Identities.remove` noted), and forgetting one
that ACS no longer has."""

from __future__ import annotations

import datetime as dt
import logging
import time

from .errors import Code, NotFound, Unavailable
from .store.record import IdentityRecord
from .store.stores import Stores

log = logging.getLogger("acs_token_service.tokens")

# More identities gone than this within the window is a wrong ACS resource, not deletions.
GONE_BUDGET = 5
GONE_WINDOW_SECONDS = 600

# What a refresh after a deletion says, by who or what deleted the identity (Identities.remove's reason).
DELETION_DETAIL = {
    "user": "You deleted your ACS identity on {day}: POST /api/token creates a new one.",
    "admin": "An administrator deleted your ACS identity on {day}: POST /api/token creates a new one.",
    "event": "Your ACS identity was deleted on {day}: your identity provider reported your account "
    "deleted or disabled.",
    "retired": "Your ACS identity was retired on {day} after a long time without use: POST /api/token "
    "creates a new one.",
    "gone": "Your ACS identity no longer exists in Azure Communication Services (noticed on {day}): "
    "POST /api/token creates a new one.",
    "deleted": "Your ACS identity was deleted on {day}: POST /api/token creates a new one.",
}


def missing(deletion: tuple[dt.datetime, str] | None) -> NotFound:
    """404 for a caller without a mapping: `deletion` is (when, reason), None if there never was one."""
    if deletion is None:
        return NotFound("You have no ACS identity yet: POST /api/token first.", code=Code.IDENTITY_NOT_FOUND)
    when, reason = deletion
    detail = DELETION_DETAIL.get(reason, DELETION_DETAIL["deleted"]).format(day=when.date().isoformat())
    return NotFound(detail, code=Code.IDENTITY_DELETED)


class GoneIdentities:
    def __init__(self, store: Stores) -> None:
        self.store = store
        self._seen: list[float] = []  # when ACS last said a mapped identity does not exist

    async def forget(self, record: IdentityRecord) -> None:
        """ACS no longer has the identity the mapping names (deleted elsewhere, or a crash between
        ACS's delete and ours): forget it, so the user gets a working identity instead of a mapping
        that fails forever. A burst of these is a wrong ACS resource (ACS_ENDPOINT), not deleted
        identities: then nothing is forgotten and the operator is told."""
        now = time.monotonic()
        self._seen = [t for t in self._seen if now - t < GONE_WINDOW_SECONDS] + [now]
        if len(self._seen) > GONE_BUDGET:
            log.error(
                "ACS says %d identities the table names do not exist within %d s: is ACS_ENDPOINT the "
                "resource that created them? Nothing is forgotten until this stops.",
                len(self._seen),
                GONE_WINDOW_SECONDS,
            )
            raise Unavailable(
                "ACS does not know identities this service created; the operator must check the ACS "
                "resource it is configured for.",
                code=Code.ACS_IDENTITY_MISMATCH,
                retry_after=60,
            )
        log.warning("ACS no longer has a mapped identity: the mapping is forgotten")
        await self.store.identities.remove(record, reason="gone")
