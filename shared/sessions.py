"""Sessions an event ended (a user deleted or disabled, credentials changed): the check on every
request, and the look again after a first issue, so that an event and a first issue that race
each other cannot both miss (README: "Users an event deleted or disabled")."""

from __future__ import annotations

import datetime as dt
import logging
from dataclasses import replace

from .auth import Caller
from .errors import SessionEnded
from .revocation import RevocationService
from .store.record import IdentityRecord
from .store.stores import Stores

log = logging.getLogger("acs_token_service.tokens")

# A bearer without `iat` is refused this long after an event ended its user's sessions: longer than
# any access token should live (Entra's default is 60 to 90 minutes; a day is the usual maximum).
NO_IAT_GRACE = dt.timedelta(hours=24)


class Sessions:
    def __init__(self, store: Stores, revocation: RevocationService) -> None:
        self.store = store
        self.revocation = revocation

    async def ended(self, key: str, caller: Caller) -> dt.datetime | None:
        """When an event last ended this caller's sessions (by user key, or Entra user): one query."""
        return await self.store.lookups.sessions_ended(key, caller.tenant_id, caller.object_id)

    async def checked(self, caller: Caller, record: IdentityRecord, now: dt.datetime) -> IdentityRecord:
        """The caller's mapping, if their sessions were not ended since their bearer was issued.
        One whose first issue never got to look again for an event (a crash, a failure between
        the insert and the look) is looked at now, and on every request until a look succeeds."""
        self.check(caller, record.sessions_ended_at, now)
        if record.sessions_checked:
            return record
        return await self.recheck(caller, record, now)

    def check(self, caller: Caller, ended_at: dt.datetime | None, now: dt.datetime) -> None:
        """Refuse a bearer issued before an event ended the user's sessions (see README: "Users an
        event deleted or disabled"). `iat` is the issuer's word for when it issued the bearer; one
        without `iat` cannot show it is newer, so it is refused for NO_IAT_GRACE after the event,
        longer than any bearer should live."""
        if ended_at is None:
            return
        issued = caller.issued_at
        # `iat` counts whole seconds: a bearer from the event's own second counts as after it.
        if issued is not None and issued >= ended_at.replace(microsecond=0):
            return
        if issued is None and now - ended_at > NO_IAT_GRACE:
            return
        raise SessionEnded(
            "Your identity provider ended your sessions (your account was deleted or disabled, or its "
            "credentials changed) after this bearer token was issued: sign in again."
        )

    async def recheck(self, caller: Caller, record: IdentityRecord, now: dt.datetime) -> IdentityRecord:
        """An event that ended the user while their first identity was being created found no
        mapping to act on: it wrote its rows (shared/events/act.py) before it looked, and this looks
        after the insert, so one of the two sees the other. A bearer older than the event does not
        keep what it created: the new identity, which nothing has used yet, is deleted. The
        mapping is inserted marked unchecked, and the mark goes only once a look succeeded."""
        ended = await self.ended(record.user_key, caller)
        if ended is not None and ended != record.sessions_ended_at:
            try:
                self.check(caller, ended, now)
            except SessionEnded:
                log.info("an event ended the user while their identity was created: it is deleted")
                await self.revocation.delete(record, source="event")
                raise
        newer = (
            ended
            if ended and (record.sessions_ended_at is None or ended > record.sessions_ended_at)
            else None
        )
        checked = replace(record, sessions_checked=True, sessions_ended_at=newer or record.sessions_ended_at)
        try:
            marked = await self.store.identities.sessions_checked(record, newer)
        except Exception as err:  # noqa: BLE001 - still unchecked: the next request looks again
            log.warning("could not mark a mapping checked: %s", type(err).__name__)
            return checked
        return marked or checked
