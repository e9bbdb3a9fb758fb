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
import functools
import logging
from dataclasses import dataclass

from . import telemetry
from .acs import AcsGateway, IssuedToken
from .auth import Caller
from .clock import Clock, utcnow
from .deletions import GoneIdentities, missing
from .errors import Code, Conflict, NotFound, ServiceError, Unavailable
from .policy import TokenRequest
from .revocation import RevocationService
from .sessions import Sessions
from .store.keys import user_key
from .store.record import BLOCKING, IdentityRecord
from .store.stores import Stores
from .storm import Issuer, SingleFlight

log = logging.getLogger("acs_token_service.tokens")


@dataclass(frozen=True)
class TokenResult:
    communication_user_id: str
    token: IssuedToken
    scopes: tuple[str, ...]
    identity_created: bool


CREATIONS_WAITED = 3  # creations of one user's identity a request waits for before it gives up
CREATIONS_IN_FLIGHT = 4  # ACS creations not yet on file, per worker: what one crash can leak at most

# A use this close to retention's cutoff (days) is written before the token is issued, and must
# land: were it best effort, a failed write would let retention take an identity in use.
AT_RISK_DAYS = 2


class TokenService:
    def __init__(
        self,
        store: Stores,
        acs: AcsGateway,
        clock: Clock = utcnow,
        *,
        revocation: RevocationService | None = None,
        retention_days: int | None = None,
        storm_protection: bool = True,
    ) -> None:
        self.store = store
        self.acs = acs
        self.clock = clock
        self.revocation = revocation or RevocationService(store, acs)
        self.sessions = Sessions(store, self.revocation)
        self.retention_days = retention_days
        self.gone = GoneIdentities(store)
        self._creating = asyncio.Semaphore(CREATIONS_IN_FLIGHT)
        # Past ACS's limits (shared/storm.py); off, every request is its own ACS call (the bench's baseline).
        self.storm_protection = storm_protection
        # The service's clock, read when it issues, as tests move it.
        self.issuer = Issuer(acs, clock=lambda: self.clock(), enabled=storm_protection)
        self._creations: SingleFlight[str, TokenResult] = SingleFlight()

    @telemetry.counts_tokens
    async def issue(self, caller: Caller, request: TokenRequest) -> TokenResult:
        return await self._issue(caller, request)

    async def _issue(self, caller: Caller, request: TokenRequest) -> TokenResult:
        key = user_key(caller.issuer, caller.subject)
        for _ in range(CREATIONS_WAITED):
            if self._creations.in_flight(key):  # only ever with storm protection on
                await self._wait_for_creation(key)  # this worker is creating the user's identity now
                continue
            record = await self.store.identities.get(key)
            if record is not None:
                record = await self.sessions.checked(caller, record, self.clock())
                if issued := await self._issue_unless_gone(record, request, reuse=False):
                    return issued
                # The mapping healed: a new identity, older bearers still refused on it.
                return await self._create(caller, key, request, sessions_ended_at=record.sessions_ended_at)
            # A first issue (or one after a deletion): was the user ended by an event meanwhile?
            ended = await self.sessions.ended(key, caller)
            self.sessions.check(caller, ended, self.clock())
            if not self.storm_protection:
                return await self._create(caller, key, request, sessions_ended_at=ended)
            if not self._creations.in_flight(key):  # none began while this one read: it leads
                create = functools.partial(self._create, caller, key, request, sessions_ended_at=ended)
                return await self._creations.run(key, create)
        raise Conflict(
            "Your identity is being created by other requests; retry.",
            code=Code.IDENTITY_CHANGED,
            retry_after=1,
        )

    async def _wait_for_creation(self, key: str) -> None:
        """Wait for the creation in flight, then go on as any request. A failure that is everyone's
        (ACS or Storage down or throttled) is answered at once, not retried by each waiter; one that
        was the leader's own (its bearer, a lost race) is not."""
        try:
            await self._creations.wait(key)
        except Unavailable:
            raise
        except Exception:  # noqa: BLE001, S110 - the leader's own: this request goes on
            pass

    @telemetry.counts_tokens
    async def refresh(self, caller: Caller, request: TokenRequest) -> TokenResult:
        key = user_key(caller.issuer, caller.subject)
        record = await self.store.identities.get(key)
        if record is None:
            raise await self._missing(caller, key)
        record = await self.sessions.checked(caller, record, self.clock())
        if issued := await self._issue_unless_gone(record, request, reuse=True):
            return issued
        raise missing((self.clock(), "gone"))  # refresh never creates: the next POST /api/token does

    async def _issue_unless_gone(
        self, record: IdentityRecord, request: TokenRequest, *, reuse: bool
    ) -> TokenResult | None:
        """A token for the mapped identity; None when ACS no longer has it, and the mapping is forgotten."""
        try:
            return await self._issue_existing(record, request, reuse=reuse)
        except NotFound as err:
            if err.code != Code.IDENTITY_GONE:
                raise
        await self.gone.forget(record)
        return None

    async def identity(self, caller: Caller) -> IdentityRecord:
        key = user_key(caller.issuer, caller.subject)
        record = await self.store.identities.get(key)
        if record is None:
            raise await self._missing(caller, key)
        return await self.sessions.checked(caller, record, self.clock())

    async def _missing(self, caller: Caller, key: str) -> ServiceError:
        """Why the caller has no identity: never had one, or had one that was deleted (and how)."""
        self.sessions.check(caller, await self.sessions.ended(key, caller), self.clock())
        return missing(await self.store.lookups.deletion(key))

    async def _issue_existing(
        self, record: IdentityRecord, request: TokenRequest, *, reuse: bool = False
    ) -> TokenResult:
        record = await self._in_use(record)
        if record.pending in BLOCKING:
            if record.pending == "retiring":
                await self._note_blocked_use(record)
            else:
                await self._requeue_if_lost(record)
            # No token may outlive a revocation or deletion that ACS has not confirmed yet.
            kind = "revoke" if record.pending == "revoke" else "delete"  # retiring: retention's delete
            raise Conflict(
                f"A {kind} of your ACS identity is pending; try again later.",
                code=Code.REVOKE_PENDING if kind == "revoke" else Code.DELETE_PENDING,
                retry_after=30,
            )
        token = await self.issuer.token(record, request.scopes, request.minutes, reuse=reuse)
        now = self.clock()
        if record.last_used_on != now.date().isoformat():
            try:
                await self.store.identities.touch(record, now)
            except Exception as err:  # noqa: BLE001 - the token is good; last-use is best effort
                log.warning("could not record last use: %s", type(err).__name__)
        return TokenResult(record.communication_user_id, token, request.scopes, identity_created=False)

    async def _in_use(self, record: IdentityRecord) -> IdentityRecord:
        """A use wins over retention: a claimed identity (`pending="retire"`), or one near the
        retention cutoff, has its use written before its token is issued, etag-guarded, so either
        retention's commit fails or this sees the delete committed (shared/cleanup/). Other uses
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
        kept = await self.store.retention.keep_in_use(record, now)
        if kept is None:  # deleted or replaced since it was read
            raise Conflict(
                "Your ACS identity changed during this request; retry.",
                code=Code.IDENTITY_CHANGED,
                retry_after=1,
            )
        return kept

    async def _requeue_if_lost(self, record: IdentityRecord) -> None:
        """A block whose queued work is gone would refuse the user for good: queue it again."""
        try:
            if await self.store.pending.requeue_blocked(record, self.clock()):
                log.warning("a blocked mapping had no queued work: queued again")
        except Exception as err:  # noqa: BLE001 - the answer is 409 either way; the next try looks again
            log.warning("could not check a blocked mapping's work: %s", type(err).__name__)

    async def _note_blocked_use(self, record: IdentityRecord) -> None:
        """Retention committed, and ACS has not answered its delete yet: should the identity turn
        out not deleted, the timer finds this use and gives the identity back (shared/cleanup/)."""
        now = self.clock()
        if record.last_used_on == now.date().isoformat():
            return
        try:
            await self.store.identities.note_use(record, now)
        except Exception as err:  # noqa: BLE001 - the answer is 409 either way
            log.warning("could not record a blocked use: %s", type(err).__name__)

    async def _create(
        self, caller: Caller, key: str, request: TokenRequest, *, sessions_ended_at: dt.datetime | None = None
    ) -> TokenResult:
        # From ACS creating the identity until its index rows land, a crash leaks it: ACS has no
        # way to list identities or to create one idempotently. Only CREATIONS_IN_FLIGHT of them
        # are ever in that window per worker; the rest wait before calling ACS, where a crash costs
        # nothing. SECURITY.md states what a crash leaks, measured.
        window = _Window(self._creating)
        async with window:
            asked_at = self.clock()
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
                sessions_checked=False,  # until it looked for an event meanwhile (Sessions.recheck)
            )
            current = await self.store.identities.create(
                record, discard=self.discard, on_filed=window.leave, clock=self.clock
            )
        if current is None:  # mapped and deleted in between: safe to ask again
            raise NotFound(
                "Your identity changed while it was being created; retry.", code=Code.IDENTITY_CONFLICT
            )
        if current.communication_user_id != communication_user_id:
            # A concurrent first request won: its mapping is checked as any is (it may not have
            # looked for an event yet).
            return await self._issue_existing(
                await self.sessions.checked(caller, current, self.clock()), request
            )
        log.info("identity created")
        result = TokenResult(communication_user_id, token, request.scopes, identity_created=True)
        await self.sessions.recheck(caller, current, self.clock())
        # The same user's requests waiting on this creation take its token.
        self.issuer.remember(current, request.scopes, request.minutes, token, asked_at)
        return result

    async def discard(self, communication_user_id: str) -> bool:
        """Delete an ACS identity nobody maps to, or queue that for the timer; False if neither."""
        try:
            await self.acs.delete(communication_user_id)
            return True
        except ServiceError as err:
            log.warning("could not delete an unmapped ACS identity now (%s); cleanup will", err.code)
        try:
            await self.store.pending.queue_discard(communication_user_id, self.clock())
            return True
        except Exception as store_err:  # noqa: BLE001 - its retention row still finds it later
            log.error("unmapped ACS identity not queued: %s; retention sweeps it", type(store_err).__name__)
            return False


class _Window:
    """Holds a semaphore from entering until `leave` (or the block's end), whichever comes first."""

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self.semaphore = semaphore
        self.held = False

    async def __aenter__(self) -> _Window:
        await self.semaphore.acquire()
        self.held = True
        return self

    def leave(self) -> None:
        if self.held:
            self.held = False
            self.semaphore.release()

    async def __aexit__(self, *exc_info: object) -> None:
        self.leave()
