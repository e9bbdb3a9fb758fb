"""The issuer's signing keys, read through its OpenID Connect discovery document and cached per worker.

Keys are refetched at most once a minute for an unknown `kid`, so forged kids cannot make us hammer
the IdP; while the IdP fails, known keys serve from the stale cache (bounded) and refreshes back off.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time

import aiohttp
import jwt

from ..errors import Code, Unauthenticated, Unavailable

log = logging.getLogger("acs_token_service.auth")

KEYS_TTL_SECONDS = 3600  # a fetched key set is fresh this long, or as long as its max-age says
KEYS_MIN_TTL_SECONDS = 5  # ... but never less: at most one refresh per 5 s per worker, whatever it says
KEYS_MAX_STALE_SECONDS = 6 * 3600  # known keys serve this long after their fetch while refreshes fail
UNKNOWN_KID_REFETCH_SECONDS = 60
REFRESH_TIMEOUT_SECONDS = 5.0  # discovery + JWKS together; a slower IdP counts as down
REFRESH_BACKOFF_SECONDS = 1.0  # after a failed refresh; doubling per failure in a row
REFRESH_BACKOFF_MAX_SECONDS = 60.0
_MAX_AGE = re.compile(r"(?:^|[,\s])max-age\s*=\s*\"?(\d{1,9})", re.IGNORECASE)


class JwksCache:
    """The issuer's signing keys, from its discovery document, fetched lazily and shared per worker.

    One refresh at a time, as a task of its own, and no request waits for it while the cache has
    its key: past the key set's TTL (an hour, or the JWKS's shorter max-age) a known kid is served
    from the stale set while the refresh runs, and while refreshes fail, for at most
    KEYS_MAX_STALE_SECONDS after the last good fetch. A failed refresh backs off (1 s doubling to
    60 s); a kid the set lacks starts one at most once a minute, whatever became of the last.
    Requests that need a fetch share the one in flight, bounded by its deadline; while the IdP
    fails and nothing usable is cached, they get 503 issuer_unavailable with Retry-After at once.
    """

    def __init__(
        self,
        issuer: str,
        session_factory=aiohttp.ClientSession,
        clock=time.monotonic,
        *,
        metadata_url: str | None = None,
    ) -> None:
        self.issuer = issuer
        # The discovery document: the issuer's own, or one given (an Entra multi-tenant template's
        # is the `common` tenant's, whose `issuer` is the template itself: shared/issuers.py).
        self.metadata_url = metadata_url or issuer.rstrip("/") + "/.well-known/openid-configuration"
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self.clock = clock
        self._keys: dict[str, jwt.PyJWK] = {}
        self._fetched_at: float | None = None  # the last good refresh
        self._ttl: float = KEYS_TTL_SECONDS
        self._max_age: int | None = None  # Cache-Control max-age of the last answer read
        self._attempted_at: float | None = None  # the last refresh started, whatever its outcome
        self._failures = 0  # failed refreshes in a row
        self._retry_at = 0.0  # no refresh starts before this while failing (backoff)
        self._error: Unavailable | None = None  # why the last refresh failed
        self._refreshing: asyncio.Task[bool] | None = None
        self.fetches = 0  # how many times the JWKS was downloaded; benchmarks and tests read it
        self.attempts = 0  # refreshes started, failed ones included

    async def close(self) -> None:
        task, self._refreshing = self._refreshing, None
        if task is not None and not task.done():
            try:
                task.cancel()
            except RuntimeError:  # its event loop is gone already (tests): nothing left to stop
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def settled(self) -> None:
        """Wait for the refresh in flight, if any (tests: a stale key's refresh runs in the background)."""
        if self._refreshing is not None:
            await asyncio.shield(self._refreshing)

    async def _get_json(self, url: str) -> dict:
        if self._session is None:
            self._session = self._session_factory(
                timeout=aiohttp.ClientTimeout(total=REFRESH_TIMEOUT_SECONDS)
            )
        try:
            async with self._session.get(url) as response:
                if response.status != 200:
                    raise Unavailable(
                        f"The identity provider answered {response.status} for {url}.",
                        code=Code.ISSUER_UNAVAILABLE,
                    )
                body = await response.json(content_type=None)
                found = _MAX_AGE.search(response.headers.get("Cache-Control", ""))
                self._max_age = int(found.group(1)) if found else None
        except (TimeoutError, aiohttp.ClientError, ValueError, RecursionError) as err:
            # ValueError: JSONDecodeError, UnicodeDecodeError, the int-digit limit
            raise Unavailable(
                f"The identity provider could not be reached ({type(err).__name__}).",
                code=Code.ISSUER_UNAVAILABLE,
            ) from None
        if not isinstance(body, dict):
            raise Unavailable(f"{url} did not return a JSON object.", code=Code.ISSUER_UNAVAILABLE)
        return body

    async def _refresh(self) -> None:
        discovery = await self._get_json(self.metadata_url)
        if discovery.get("issuer") != self.issuer:
            raise Unavailable(
                "The discovery document names another issuer than the one configured.",
                code=Code.ISSUER_MISMATCH,
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str):
            raise Unavailable("The discovery document has no jwks_uri.", code=Code.ISSUER_UNAVAILABLE)
        document = await self._get_json(jwks_uri)
        max_age = self._max_age
        entries = document.get("keys")
        keys: dict[str, jwt.PyJWK] = {}
        for entry in entries if isinstance(entries, list) else []:
            if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
                continue
            kid = entry.get("kid")
            if not isinstance(kid, str) or not kid:
                continue
            try:
                keys[kid] = jwt.PyJWK(entry)
            except (jwt.PyJWTError, ValueError, TypeError, KeyError):
                continue  # a key type we do not use, or a malformed entry
        if not keys:  # keep the keys we have rather than refuse every caller
            raise Unavailable(
                "The issuer's JWKS has no signing key we can use.", code=Code.ISSUER_UNAVAILABLE
            )
        ttl = KEYS_TTL_SECONDS if max_age is None else min(max_age, KEYS_TTL_SECONDS)
        self._keys, self._fetched_at, self._ttl = keys, self.clock(), max(KEYS_MIN_TTL_SECONDS, ttl)
        self.fetches += 1

    async def _run_refresh(self) -> bool:
        """One refresh under its deadline; never raises: the outcome is the cache's state."""
        try:
            async with asyncio.timeout(REFRESH_TIMEOUT_SECONDS):
                await self._refresh()
        except Exception as err:  # noqa: BLE001 - a failed refresh is a 503 or a stale key, never a 500
            if isinstance(err, Unavailable):
                error = err
            elif isinstance(err, TimeoutError):
                error = Unavailable(
                    f"The identity provider did not answer within {REFRESH_TIMEOUT_SECONDS:g} s.",
                    code=Code.ISSUER_UNAVAILABLE,
                )
            else:
                error = Unavailable(
                    f"The identity provider's keys could not be read ({type(err).__name__}).",
                    code=Code.ISSUER_UNAVAILABLE,
                )
            self._failures += 1
            doubled = REFRESH_BACKOFF_SECONDS * 2 ** min(self._failures - 1, 16)
            backoff = min(REFRESH_BACKOFF_MAX_SECONDS, doubled)
            self._retry_at, self._error = self.clock() + backoff, error
            log.warning(
                "issuer keys not refreshed (%s: %s); failure %d in a row, next try in %g s, cached keys %s",
                error.code,
                error.detail,
                self._failures,
                backoff,
                "none" if self._fetched_at is None else f"{self.clock() - self._fetched_at:.0f} s old",
            )
            return False
        finally:
            self._refreshing = None
        if self._failures:
            log.info("issuer keys refreshed after %d failed attempts", self._failures)
        self._failures, self._retry_at, self._error = 0, 0.0, None
        return True

    def _start_refresh(self, now: float) -> asyncio.Task[bool]:
        self._attempted_at = now
        self.attempts += 1
        self._refreshing = asyncio.get_running_loop().create_task(self._run_refresh(), name="jwks-refresh")
        return self._refreshing

    def _age(self, now: float) -> float:
        return math.inf if self._fetched_at is None else now - self._fetched_at

    def _wait_for_fetch(self, now: float, *, unknown_kid: bool) -> float:
        """Seconds until a request that needs the IdP may start a refresh (<= 0: now)."""
        wait = self._retry_at - now
        if unknown_kid and self._attempted_at is not None:
            wait = max(wait, self._attempted_at + UNKNOWN_KID_REFETCH_SECONDS - now)
        return wait

    def _unavailable(self, wait: float) -> Unavailable:
        error = self._error
        return Unavailable(
            error.detail if error else "The identity provider is unavailable.",
            code=error.code if error else Code.ISSUER_UNAVAILABLE,
            retry_after=max(1, math.ceil(wait)),
        )

    def is_current(self, kid: str, key: jwt.PyJWK) -> bool:
        """`key` is what `key(kid)` would return now, without a refetch (no I/O)."""
        return self._keys.get(kid) is key and self._age(self.clock()) < self._ttl

    async def key(self, kid: str) -> jwt.PyJWK:
        now = self.clock()
        age = self._age(now)
        cached = self._keys.get(kid)
        if cached is not None and age < self._ttl:
            return cached
        usable = age < KEYS_MAX_STALE_SECONDS  # the set we have may still answer for its kids
        if cached is not None and usable:
            if self._refreshing is None and now >= self._retry_at:
                self._start_refresh(now)  # in the background: this request does not wait for it
            return cached
        # Nothing usable for this kid: it needs the IdP's current key set.
        task = self._refreshing
        if task is None:
            wait = self._wait_for_fetch(now, unknown_kid=usable)
            if wait > 0:
                if self._failures:
                    raise self._unavailable(wait)
                raise Unauthenticated("The token is signed with a key the issuer does not publish.")
            task = self._start_refresh(now)
        # Shared with every request that needs it; shielded, so a caller that gives up does not
        # cancel it for the others. Bounded by the refresh's own deadline.
        if not await asyncio.shield(task):
            now = self.clock()
            usable = self._age(now) < KEYS_MAX_STALE_SECONDS
            raise self._unavailable(self._wait_for_fetch(now, unknown_kid=usable))
        cached = self._keys.get(kid)
        if cached is None:
            raise Unauthenticated("The token is signed with a key the issuer does not publish.")
        return cached
