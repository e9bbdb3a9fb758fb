"""The issuer key cache's policy, as pure logic: a fake clock and a fake IdP behind the real refresh.

What HTTP cannot reach in a test's time: a key set an hour or six old, and a minute's worth of
backoff. tests/test_issuer_outage.py shows the same rules through the dev host.
"""

from __future__ import annotations

import asyncio
import itertools
import time

import pytest

from devstack.signing import SigningKey
from shared.auth.jwks import (
    KEYS_MAX_STALE_SECONDS,
    KEYS_MIN_TTL_SECONDS,
    KEYS_TTL_SECONDS,
    REFRESH_BACKOFF_MAX_SECONDS,
    UNKNOWN_KID_REFETCH_SECONDS,
    JwksCache,
)
from shared.errors import Unauthenticated, Unavailable

ISSUER = "https://idp.example"


class Clock:
    def __init__(self) -> None:
        self.now = 10_000.0

    def __call__(self) -> float:
        return self.now


class FakeIdp(JwksCache):
    """The real cache; only the HTTP GET is a stand-in that can be down, slow or set a max-age."""

    def __init__(self, clock: Clock) -> None:
        super().__init__(ISSUER, clock=clock)
        self.signing_key = SigningKey.generate()
        self.up, self.delay, self.max_age, self.gets = True, 0.0, None, 0

    async def _get_json(self, url: str) -> dict:
        self.gets += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if not self.up:
            raise Unavailable("The identity provider could not be reached (test).", code="issuer_unavailable")
        self._max_age = self.max_age
        if url.endswith("/.well-known/openid-configuration"):
            return {"issuer": ISSUER, "jwks_uri": f"{ISSUER}/keys"}
        return {"keys": [self.signing_key.jwk()]}

    @property
    def kid(self) -> str:
        return self.signing_key.kid


async def _warm(clock: Clock) -> FakeIdp:
    idp = FakeIdp(clock)
    await idp.key(idp.kid)
    assert idp.attempts == 1
    return idp


async def test_unknown_kids_while_the_idp_is_down_start_one_refresh_a_minute():
    """Keys fetched over a minute ago, IdP down: 20 forged kids cost one refresh, not 20."""
    clock = Clock()
    idp = await _warm(clock)
    clock.now += UNKNOWN_KID_REFETCH_SECONDS + 1
    idp.up = False
    for i in range(20):
        clock.now += 1
        with pytest.raises(Unavailable) as caught:
            await idp.key(f"forged-{i}")
        assert caught.value.code == "issuer_unavailable" and int(caught.value.headers["Retry-After"]) >= 1
        assert (await idp.key(idp.kid)) is not None  # the cached kid still works
    assert idp.attempts == 2
    clock.now += UNKNOWN_KID_REFETCH_SECONDS
    with pytest.raises(Unavailable):
        await idp.key("forged-again")
    assert idp.attempts == 3
    await idp.close()


async def test_unknown_kids_with_the_idp_up_are_401_and_refetch_once_a_minute():
    clock = Clock()
    idp = await _warm(clock)
    for _ in range(5):
        with pytest.raises(Unauthenticated):
            await idp.key("not-published")
    assert idp.attempts == 1
    clock.now += UNKNOWN_KID_REFETCH_SECONDS
    with pytest.raises(Unauthenticated):
        await idp.key("not-published")
    assert idp.attempts == 2
    await idp.close()


async def test_failed_refreshes_back_off_doubling_to_a_cap():
    """A cold cache and a dead IdP, a request every second for five minutes: refreshes start
    1, 2, 4, ... 60 s apart, and every request in between is a 503 with no fetch."""
    clock = Clock()
    idp = FakeIdp(clock)
    idp.up = False
    started: list[float] = []
    for _ in range(300):
        before = idp.attempts
        with pytest.raises(Unavailable) as caught:
            await idp.key(idp.kid)
        if idp.attempts > before:
            started.append(clock.now)
        assert int(caught.value.headers["Retry-After"]) >= 1
        clock.now += 1
    gaps = [round(b - a) for a, b in itertools.pairwise(started)]
    assert gaps[:7] == [1, 2, 4, 8, 16, 32, 60] and set(gaps[6:]) == {REFRESH_BACKOFF_MAX_SECONDS}
    idp.up = True
    clock.now += REFRESH_BACKOFF_MAX_SECONDS
    assert (await idp.key(idp.kid)) is not None  # recovered: the next refresh after the backoff
    await idp.close()


async def test_a_known_kid_serves_stale_while_refreshes_fail_but_only_so_long():
    clock = Clock()
    idp = await _warm(clock)
    key = await idp.key(idp.kid)
    idp.up = False
    clock.now += KEYS_TTL_SECONDS + 1
    assert await idp.key(idp.kid) is key  # stale, at once; the refresh runs in the background
    await idp.settled()
    assert idp.attempts == 2 and idp.fetches == 1
    assert not idp.is_current(idp.kid, key)  # remembered tokens are checked again meanwhile
    clock.now = idp._fetched_at + KEYS_MAX_STALE_SECONDS - 1
    assert await idp.key(idp.kid) is key
    await idp.settled()
    clock.now = idp._fetched_at + KEYS_MAX_STALE_SECONDS + REFRESH_BACKOFF_MAX_SECONDS
    with pytest.raises(Unavailable):  # too old to trust: a fetch or nothing
        await idp.key(idp.kid)
    idp.up = True
    clock.now += REFRESH_BACKOFF_MAX_SECONDS
    assert (await idp.key(idp.kid)).key_id == idp.kid
    await idp.close()


async def test_a_stale_known_kid_never_waits_for_a_hanging_refresh():
    clock = Clock()
    idp = await _warm(clock)
    idp.delay = 30.0  # hangs
    clock.now += KEYS_TTL_SECONDS + 1
    started = time.perf_counter()
    for _ in range(10):
        await idp.key(idp.kid)
    assert time.perf_counter() - started < 0.5
    assert idp.attempts == 2  # one refresh in flight for all ten
    await idp.close()  # cancels it


async def test_concurrent_callers_share_one_refresh():
    idp = FakeIdp(Clock())
    idp.delay = 0.05
    keys = await asyncio.gather(*(idp.key(idp.kid) for _ in range(10)))
    assert len({id(k) for k in keys}) == 1
    assert (idp.attempts, idp.gets) == (1, 2)  # discovery + JWKS, once
    await idp.close()


@pytest.mark.parametrize(
    ("max_age", "ttl"),
    [(None, KEYS_TTL_SECONDS), (0, KEYS_MIN_TTL_SECONDS), (30, 30), (10**6, KEYS_TTL_SECONDS)],
)
async def test_the_jwks_max_age_shortens_the_ttl_within_bounds(max_age, ttl):
    clock = Clock()
    idp = FakeIdp(clock)
    idp.max_age = max_age
    key = await idp.key(idp.kid)
    clock.now += ttl - 0.5
    assert idp.is_current(idp.kid, key)
    clock.now += 1
    assert not idp.is_current(idp.kid, key)
    await idp.close()
