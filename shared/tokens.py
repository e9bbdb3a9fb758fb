"""The token service: get-or-create the caller's ACS identity and issue tokens for it.

Cost per request is the floor ACS and Table Storage set: a repeated issue or a refresh is one
point read and one ACS call (plus, once a day per user, a last-use write); a first issue is a
point read, a query for sessions an event ended, one create-and-issue, one entity-group transaction
filing the identity's index rows (the reverse lookup, the day's last-use row and, only for Entra
users keyed by `sub`, the Graph lookup), the mapping insert, and the query again (an event may
have ended the user while the identity was being created) (`make bench` counts them; README,
Performance).
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from dataclasses import dataclass, replace

from azure.core.exceptions import HttpResponseError, ResourceExistsError

from . import telemetry
from .acs import AcsGateway, IssuedToken
from .auth import Caller
from .clock import Clock, utcnow
from .errors import Conflict, NotFound, ServiceError, SessionEnded, Unavailable
from .keys import user_key
from .policy import TokenRequest
from .revocation import RevocationService
from .store import BLOCKING, IdentityRecord, IdentityStore

log = logging.getLogger("acs_token_service.tokens")


@dataclass(frozen=True)
class TokenResult:
    communication_user_id: str
    token: IssuedToken
    scopes: tuple[str, ...]
    identity_created: bool


CREATIONS_IN_FLIGHT = 4  # ACS creations not yet on file, per worker: what one crash can leak at most
IDENTITY_GONE = "identity_gone"  # shared/acs.py: ACS says it does not own (any more) the identity
# More identities gone than this within the window is a wrong ACS resource, not deletions.
GONE_BUDGET = 5
GONE_WINDOW_SECONDS = 600

# A use this close to retention's cutoff (days) is written before the token is issued, and must
# land: were it best effort, a failed write would let retention take an identity in use.
AT_RISK_DAYS = 2

# A bearer without `iat` is refused this long after an event ended its user's sessions: longer than
# any access token should live (Entra's default is 60 to 90 minutes; a day is the usual maximum).
NO_IAT_GRACE = dt.timedelta(hours=24)

# What a refresh after a deletion says, by who or what deleted the identity (store.remove's reason).
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


class TokenService:
    def __init__(
        self,
        store: IdentityStore,
        acs: AcsGateway,
        clock: Clock = utcnow,
        *,
        revocation: RevocationService | None = None,
        retention_days: int | None = None,
    ) -> None:
        self.store = store
        self.acs = acs
        self.clock = clock
        self.revocation = revocation or RevocationService(store, acs)
        self.retention_days = retention_days
        self._gone: list[float] = []  # when ACS last said a mapped identity does not exist
        self._creating = asyncio.Semaphore(CREATIONS_IN_FLIGHT)

    @telemetry.counts_tokens
    async def issue(self, caller: Caller, request: TokenRequest) -> TokenResult:
        key = user_key(caller.issuer, caller.subject)
        record = await self.store.get(key)
        if record is not None:
            record = await self._checked(caller, record)
            try:
                return await self._issue_existing(record, request)
            except NotFound as err:
                if err.code != IDENTITY_GONE:
                    raise
                await self._forget_gone(record)  # the mapping heals: a new identity below
                return await self._create(caller, key, request, sessions_ended_at=record.sessions_ended_at)
        # A first issue (or one after a deletion): was the user ended by an event meanwhile?
        ended = await self.store.sessions_ended(key, caller.tenant_id, caller.object_id)
        self._check_session(caller, ended)
        return await self._create(caller, key, request, sessions_ended_at=ended)

    @telemetry.counts_tokens
    async def refresh(self, caller: Caller, request: TokenRequest) -> TokenResult:
        key = user_key(caller.issuer, caller.subject)
        record = await self.store.get(key)
        if record is None:
            raise await self._missing(caller, key)
        record = await self._checked(caller, record)
        try:
            return await self._issue_existing(record, request)
        except NotFound as err:
            if err.code != IDENTITY_GONE:
                raise
            await self._forget_gone(record)  # refresh never creates: the next POST /api/token does
            today = self.clock().date().isoformat()
            raise NotFound(DELETION_DETAIL["gone"].format(day=today), code="identity_deleted") from None

    async def _forget_gone(self, record: IdentityRecord) -> None:
        """ACS no longer has the identity the mapping names (deleted elsewhere, or a crash between
        ACS's delete and ours): forget it, so the user gets a working identity instead of a mapping
        that fails forever. A burst of these is a wrong ACS resource (ACS_ENDPOINT), not deleted
        identities: then nothing is forgotten and the operator is told."""
        now = time.monotonic()
        self._gone = [t for t in self._gone if now - t < GONE_WINDOW_SECONDS] + [now]
        if len(self._gone) > GONE_BUDGET:
            log.error(
                "ACS says %d identities the table names do not exist within %d s: is ACS_ENDPOINT the "
                "resource that created them? Nothing is forgotten until this stops.",
                len(self._gone),
                GONE_WINDOW_SECONDS,
            )
            raise Unavailable(
                "ACS does not know identities this service created; the operator must check the ACS "
                "resource it is configured for.",
                code="acs_identity_mismatch",
                retry_after=60,
            )
        log.warning("ACS no longer has a mapped identity: the mapping is forgotten")
        await self.store.remove(record, reason="gone")

    async def identity(self, caller: Caller) -> IdentityRecord:
        key = user_key(caller.issuer, caller.subject)
        record = await self.store.get(key)
        if record is None:
            raise await self._missing(caller, key)
        return await self._checked(caller, record)

    async def _checked(self, caller: Caller, record: IdentityRecord) -> IdentityRecord:
        """The caller's mapping, if their sessions were not ended since their bearer was issued.
        One whose first issue never got to look again for an event (a crash, a failure between
        the insert and the look) is looked at now, and on every request until a look succeeds."""
        self._check_session(caller, record.sessions_ended_at)
        if record.sessions_checked:
            return record
        return await self._recheck_sessions(caller, record)

    def _check_session(self, caller: Caller, ended_at: dt.datetime | None) -> None:
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
        if issued is None and self.clock() - ended_at > NO_IAT_GRACE:
            return
        raise SessionEnded(
            "Your identity provider ended your sessions (your account was deleted or disabled, or its "
            "credentials changed) after this bearer token was issued: sign in again."
        )

    async def _missing(self, caller: Caller, key: str) -> ServiceError:
        """Why the caller has no identity: never had one, or had one that was deleted (and how)."""
        self._check_session(caller, await self.store.sessions_ended(key, caller.tenant_id, caller.object_id))
        deletion = await self.store.deletion(key)
        if deletion is None:
            return NotFound("You have no ACS identity yet: POST /api/token first.", code="identity_not_found")
        when, reason = deletion
        detail = DELETION_DETAIL.get(reason, DELETION_DETAIL["deleted"]).format(day=when.date().isoformat())
        return NotFound(detail, code="identity_deleted")

    async def _issue_existing(self, record: IdentityRecord, request: TokenRequest) -> TokenResult:
        record = await self._in_use(record)
        if record.pending in BLOCKING:
            if record.pending == "retiring":
                await self._note_blocked_use(record)
            # No token may outlive a revocation or deletion that ACS has not confirmed yet.
            kind = "revoke" if record.pending == "revoke" else "delete"  # retiring: retention's delete
            raise Conflict(
                f"A {kind} of your ACS identity is pending; try again later.",
                code=f"{kind}_pending",
                retry_after=30,
            )
        token = await self.acs.issue(record.communication_user_id, request.scopes, request.minutes)
        now = self.clock()
        if record.last_used_on != now.date().isoformat():
            try:
                await self.store.touch(record, now)
            except Exception as err:  # noqa: BLE001 - the token is good; last-use is best effort
                log.warning("could not record last use: %s", type(err).__name__)
        return TokenResult(record.communication_user_id, token, request.scopes, identity_created=False)

    async def _in_use(self, record: IdentityRecord) -> IdentityRecord:
        """A use wins over retention: a claimed identity (`pending="retire"`), or one near the
        retention cutoff, has its use written before its token is issued, etag-guarded, so either
        retention's commit fails or this sees the delete committed (shared/cleanup.py). Other uses
        are written after the token, best effort, once a day."""
        if record.pending in BLOCKING:
            return record  # refused by the caller
        now = self.clock()
        if record.pending != "retire" and (
            record.last_used_on == now.date().isoformat()
            or self.retention_days is None
            or record.last_used_on
            > (now - dt.timedelta(days=self.retention_days - AT_RISK_DAYS)).date().isoformat()
        ):
            return record
        kept = await self.store.keep_in_use(record, now)
        if kept is None:  # deleted or replaced since it was read
            raise Conflict(
                "Your ACS identity changed during this request; retry.",
                code="identity_changed",
                retry_after=1,
            )
        return kept

    async def _note_blocked_use(self, record: IdentityRecord) -> None:
        """Retention committed, and ACS has not answered its delete yet: should the identity turn
        out not deleted, the timer finds this use and gives the identity back (shared/cleanup.py)."""
        now = self.clock()
        if record.last_used_on == now.date().isoformat():
            return
        try:
            await self.store.note_use(record, now)
        except Exception as err:  # noqa: BLE001 - the answer is 409 either way
            log.warning("could not record a blocked use: %s", type(err).__name__)

    async def _create(
        self, caller: Caller, key: str, request: TokenRequest, *, sessions_ended_at: dt.datetime | None = None
    ) -> TokenResult:
        # From ACS creating the identity until its index rows land, a crash leaks it: ACS has no
        # way to list identities or to create one idempotently. Only CREATIONS_IN_FLIGHT of them
        # are ever in that window per worker; the rest wait before calling ACS, where a crash costs
        # nothing. SECURITY.md states what a crash leaks, measured.
        async with self._creating:
            record, token = await self._create_filed(caller, key, request, sessions_ended_at)
        result = await self._map(record, token, request)
        if result.communication_user_id == record.communication_user_id:
            await self._recheck_sessions(caller, record)
        return result

    async def _create_filed(
        self, caller: Caller, key: str, request: TokenRequest, sessions_ended_at: dt.datetime | None
    ) -> tuple[IdentityRecord, IssuedToken]:
        """A new ACS identity and its index rows (file_new): from here on cleanup can find it."""
        communication_user_id, token = await self.acs.create_with_token(request.scopes, request.minutes)
        now = self.clock()
        record = IdentityRecord(
            user_key=key,
            communication_user_id=communication_user_id,
            issuer=caller.issuer,
            subject=caller.subject,
            created_at=now,
            last_used_on=now.date().isoformat(),
            last_issued_at=now,
            object_id=caller.object_id,
            tenant_id=caller.tenant_id,
            sessions_ended_at=sessions_ended_at,  # older bearers stay refused on the new identity too
            sessions_checked=False,  # until it looked for an event that came meanwhile (_recheck_sessions)
        )
        try:
            await self.store.file_new(record)
        except Exception:
            if await self._discard(communication_user_id):  # no mapping was tried: none names it
                await self.store.forget_lost(record, user_mapped=False)
            raise
        return record, token

    async def _map(self, record: IdentityRecord, token: IssuedToken, request: TokenRequest) -> TokenResult:
        """Insert the mapping of an identity already on file (outside the creation window)."""
        communication_user_id = record.communication_user_id
        try:
            await self.store.insert(record)
        except Exception as err:  # noqa: BLE001 - settled from the mapping itself
            return await self._settle(record, token, request, err)
        log.info("identity created")
        return TokenResult(communication_user_id, token, request.scopes, identity_created=True)

    async def _settle(
        self, record: IdentityRecord, token: IssuedToken, request: TokenRequest, err: Exception
    ) -> TokenResult:
        """The mapping insert failed: 409 when another request won the user, or when a retried
        insert finds its own first try landed; any other failure may hide a landed insert too.
        The mapping says which: ours stands, or theirs is used, or there is none."""
        ours = record.communication_user_id
        try:
            current = await self.store.get(record.user_key)
        except Exception:  # noqa: BLE001 - unknown: the timer settles it from the mapping
            await self._leave_for_timer(record)
            raise err from None
        if current is not None and current.communication_user_id == ours:
            log.info("identity created")
            return TokenResult(ours, token, request.scopes, identity_created=True)
        if current is None and not _refused(err):
            # The insert's outcome is unknown (a timeout, 500 OperationTimedOut): it may still land,
            # after this look. Discarding the identity now would leave a mapping naming a deleted
            # one; the timer settles it from the mapping once a late write can no longer land.
            await self._leave_for_timer(record)
            raise err
        # Not ours: delete our identity, and only then its rows, which until then let cleanup find it.
        if await self._discard(ours):
            await self.store.forget_lost(record, user_mapped=current is not None)
        if current is not None:  # a concurrent first request mapped this user first: use its identity
            return await self._issue_existing(current, request)
        if isinstance(err, ResourceExistsError):  # mapped and deleted in between: safe to ask again
            raise NotFound(
                "Your identity changed while it was being created; retry.", code="identity_conflict"
            )
        raise err

    async def _leave_for_timer(self, record: IdentityRecord) -> None:
        try:
            await self.store.queue_settle(record, self.clock())
        except Exception as store_err:  # noqa: BLE001 - its retention row still finds it later
            log.error("unsettled ACS identity not queued: %s; retention sweeps it", type(store_err).__name__)

    async def _recheck_sessions(self, caller: Caller, record: IdentityRecord) -> IdentityRecord:
        """An event that ended the user while their first identity was being created found no
        mapping to act on: it wrote its rows (shared/webhook.py) before it looked, and this looks
        after the insert, so one of the two sees the other. A bearer older than the event does not
        keep what it created: the new identity, which nothing has used yet, is deleted. The
        mapping is inserted marked unchecked, and the mark goes only once a look succeeded."""
        ended = await self.store.sessions_ended(record.user_key, caller.tenant_id, caller.object_id)
        if ended is not None and ended != record.sessions_ended_at:
            try:
                self._check_session(caller, ended)
            except SessionEnded:
                log.info("an event ended the user while their identity was created: it is deleted")
                await self.revocation.delete(record, source="event")
                raise
        newer = (
            ended
            if ended and (record.sessions_ended_at is None or ended > record.sessions_ended_at)
            else None
        )
        try:
            await self.store.sessions_checked(record, newer)
        except Exception as err:  # noqa: BLE001 - still unchecked: the next request looks again
            log.warning("could not mark a mapping checked: %s", type(err).__name__)
        return replace(record, sessions_checked=True, sessions_ended_at=newer or record.sessions_ended_at)

    async def _discard(self, communication_user_id: str) -> bool:
        """Delete an ACS identity nobody maps to, or queue that for the timer; False if neither."""
        try:
            await self.acs.delete(communication_user_id)
            return True
        except ServiceError as err:
            log.warning("could not delete an unmapped ACS identity now (%s); cleanup will", err.code)
        try:
            await self.store.queue_discard(communication_user_id, self.clock())
            return True
        except Exception as store_err:  # noqa: BLE001 - its retention row still finds it later
            log.error("unmapped ACS identity not queued: %s; retention sweeps it", type(store_err).__name__)
            return False


def _refused(err: Exception) -> bool:
    """A clear no from the Table service (4xx, 409 included): that write will never land. Anything
    else (a timeout, a lost connection, 500 OperationTimedOut) may have committed, or still may."""
    status = getattr(err, "status_code", None) if isinstance(err, HttpResponseError) else None
    return status is not None and 400 <= status < 500 and status != 408
