"""Fewer ACS calls in a token storm (everyone reconnecting at once): identical requests in flight
share one call, and a token this worker issued moments ago is answered again while it is fresh.

Both are per worker and in memory only: a token is never written anywhere. ACS allows 1000 issues
per 30 s per resource (REFERENCE.md, "Service limits"); a storm past that is answered from here
instead of becoming 429s.

Never across a revocation: a revocation marks the user's mapping (`tokensRevokedAt`, only ever
forward) *before* it asks ACS, and every request reads the mapping. A token is answered again, or
shared, only among requests that read the same mark, and none at all for REVOCATION_QUIET after
a mark, longer than any revocation's ACS call takes: so a token ACS issued before it carried out
a revocation is never handed to a request that read that revocation's mark, on any worker, and no
clocks are compared across workers but against a margin of minutes.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass

from .acs import AcsGateway, IssuedToken
from .clock import Clock
from .errors import Throttled
from .store.record import IdentityRecord
from .throttle import ISSUE

# A token is answered again only while at least this share of its lifetime remains: 90% of a
# 60-minute token is 54 minutes, so it is reused for its first 6. Clients refresh well before
# expiry (the JS credential 10 minutes before), so a reused token costs them nothing.
FRESH_SHARE = 0.9
# While ACS is refusing issues (shared/throttle.py), a token this worker issued that still has at
# least this share of its lifetime is answered again instead of calling ACS: its holder is not
# about to lose its session, and ACS's scarce calls go to the refreshes of tokens about to expire.
STILL_GOOD_SHARE = 0.5
# Per worker, bounded: an entry holds an ACS token (~1.5 KB) and its key, about 2 KB in all.
FRESH_TOKENS_MAX = 10_000
# After a revocation's mark, its ACS call: at most a request's timeouts and one retry (well under a
# minute), a timer run's (under LEASE) or an event's (cut off at 25 s). Minutes of margin.
REVOCATION_QUIET = dt.timedelta(minutes=5)


class SingleFlight[K: Hashable, V]:
    """One call per key in flight: who asks while it runs awaits the same answer (or error). A
    caller that goes away does not cancel the call for the others."""

    def __init__(self) -> None:
        self._flights: dict[K, asyncio.Future[V]] = {}

    async def run(self, key: K, call: Callable[[], Awaitable[V]]) -> V:
        flight = self._flights.get(key)
        if flight is None:
            flight = asyncio.ensure_future(call())
            self._flights[key] = flight
            flight.add_done_callback(lambda done: self._done(key, done))
        return await asyncio.shield(flight)

    def _done(self, key: K, flight: asyncio.Future[V]) -> None:
        if self._flights.get(key) is flight:
            del self._flights[key]
        if not flight.cancelled():
            flight.exception()  # retrieved here: nobody may be waiting any more

    def in_flight(self, key: K) -> bool:
        return key in self._flights

    async def wait(self, key: K) -> V:
        """The answer of the call in flight for `key` (which must be in flight)."""
        return await asyncio.shield(self._flights[key])


@dataclass(frozen=True)
class Issued:
    token: IssuedToken
    at: dt.datetime  # when this worker asked ACS for it


class FreshTokens:
    """Tokens this worker issued, answered again while fresh. The key carries the revocation mark
    the issuing request read, so a token is only ever found by requests that read the same one."""

    def __init__(self, limit: int = FRESH_TOKENS_MAX) -> None:
        self._tokens: OrderedDict[Hashable, Issued] = OrderedDict()
        self.limit = limit

    def get(self, key: Hashable, now: dt.datetime, *, share: float = FRESH_SHARE) -> IssuedToken | None:
        """The token issued under `key`, if at least `share` of its lifetime remains."""
        issued = self._tokens.get(key)
        if issued is None:
            return None
        lifetime = issued.token.expires_on - issued.at
        if now - issued.at > lifetime * (1 - STILL_GOOD_SHARE):
            del self._tokens[key]  # no use of it remains
            return None
        return issued.token if now - issued.at <= lifetime * (1 - share) else None

    def put(self, key: Hashable, token: IssuedToken, at: dt.datetime) -> None:
        self._tokens[key] = Issued(token, at)
        self._tokens.move_to_end(key)
        while len(self._tokens) > self.limit:
            self._tokens.popitem(last=False)

    def forget_all(self) -> None:
        self._tokens.clear()


class Issuer:
    """ACS's issue call for the token service: a fresh token this worker issued is answered again,
    and identical requests in flight share one call. Off (`enabled=False`), every request calls ACS."""

    def __init__(self, acs: AcsGateway, *, clock: Clock, enabled: bool = True) -> None:
        self.acs = acs
        self.clock = clock
        self.enabled = enabled
        self.fresh = FreshTokens()
        self._flights: SingleFlight[Hashable, tuple[IssuedToken, dt.datetime]] = SingleFlight()

    async def token(
        self, record: IdentityRecord, scopes: tuple[str, ...], minutes: int, *, reuse: bool = True
    ) -> IssuedToken:
        """`reuse=False` (POST /api/token): a token from ACS, shared only with requests in flight,
        so that a mapping whose identity ACS no longer has is found out, and heals, at once. With
        `reuse`, while ACS refuses issues, a token with half its life left is answered again."""
        key = self._key(record, scopes, minutes)
        if key is None:
            return await self.acs.issue(record.communication_user_id, scopes, minutes)
        if reuse and (fresh := self.fresh.get(key, self.clock())) is not None:
            return fresh
        if reuse and self.acs.throttle.refusing(ISSUE) and (held := self._still_good(key)):
            return held  # ACS's few calls are for those whose tokens are about to expire

        async def from_acs() -> tuple[IssuedToken, dt.datetime]:
            asked_at = self.clock()
            return await self.acs.issue(record.communication_user_id, scopes, minutes), asked_at

        try:
            token, asked_at = await self._flights.run(key, from_acs)
        except Throttled:
            if reuse and (held := self._still_good(key)):
                return held
            raise
        self.fresh.put(key, token, asked_at)
        return token

    def _still_good(self, key: Hashable) -> IssuedToken | None:
        return self.fresh.get(key, self.clock(), share=STILL_GOOD_SHARE)

    def remember(
        self,
        record: IdentityRecord,
        scopes: tuple[str, ...],
        minutes: int,
        token: IssuedToken,
        at: dt.datetime,
    ) -> None:
        """A token issued outside `token` (with a new identity): answered again like its own."""
        if (key := self._key(record, scopes, minutes)) is not None:
            self.fresh.put(key, token, at)

    def _key(self, record: IdentityRecord, scopes: tuple[str, ...], minutes: int) -> Hashable | None:
        """What a token may be shared under; None when it may not be (off, or a revocation is recent)."""
        if not self.enabled:
            return None
        mark = record.tokens_revoked_at
        if mark is not None and self.clock() - mark < REVOCATION_QUIET:
            return None
        return (record.user_key, record.communication_user_id, scopes, minutes, mark)
