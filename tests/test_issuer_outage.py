"""The caller's IdP down or hanging, over HTTP through the dev host (issue 15, item 3).

The service caches the issuer's keys per worker. While the IdP fails, a request must never wait in
turn behind one slow fetch: known keys serve from the stale cache (bounded), one refresh at a
time runs in the background and backs off when it fails, a kid the cache lacks starts a refresh
at most once a minute whatever became of the last one, and a request that needs the IdP while it
fails gets 503 issuer_unavailable with Retry-After at once, never a 500.

These tests run on a stack of their own: they need a worker whose key cache starts cold, and the
dev issuer sends `Cache-Control: max-age=5` on its JWKS throughout (`maxAgeSeconds`), so that the
cache goes stale within the test instead of after an hour.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests

from devstack.layout import HOST_LOG_FILE
from devstack.running import RunningStack
from shared.auth.jwks import KEYS_MIN_TTL_SECONDS, REFRESH_TIMEOUT_SECONDS
from tests.conftest import TLS_DIR
from tests.service_helpers import Users

pytestmark = pytest.mark.slow

# aiohttp retries a GET once when the server hangs up: one refresh against a down IdP is 2 requests.
REQUESTS_PER_FAILED_FETCH = 2
HANG_MS = 120_000  # longer than any timeout on the way: the IdP accepts and never answers
FAST = 1.5  # seconds: an answer that waited on no fetch
MAX_AGE = KEYS_MIN_TTL_SECONDS


class IssuerHooks:
    def __init__(self, issuer: str) -> None:
        self.base = f"{issuer}/_issuer/"

    def faults(self, **faults) -> dict:
        response = requests.post(self.base + "faults", json=faults, timeout=10)
        response.raise_for_status()
        return response.json()

    def reset(self) -> None:
        requests.post(self.base + "reset", timeout=10).raise_for_status()
        self.faults(maxAgeSeconds=MAX_AGE)

    def discovery_calls(self) -> int:
        response = requests.get(self.base + "stats", timeout=10)
        response.raise_for_status()
        return response.json()["calls"]["discovery"]


@pytest.fixture(scope="module")
def outage(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningStack, IssuerHooks]]:
    stack = RunningStack.launch(tmp_path_factory.mktemp("issuer-outage"), TLS_DIR)
    try:
        issuer = IssuerHooks(stack["issuer"])
        issuer.reset()  # before any request: every key set the worker ever loads expires in 5 s
        yield stack, issuer
    finally:
        stack.close()


def _get_identity(stack: RunningStack, token: str) -> tuple[requests.Response, float]:
    started = time.monotonic()
    response = requests.get(
        f"{stack['api']}/identity", headers={"Authorization": f"Bearer {token}"}, timeout=120
    )
    return response, time.monotonic() - started


def _concurrently(stack: RunningStack, tokens: list[str]) -> list[tuple[requests.Response, float]]:
    with ThreadPoolExecutor(len(tokens)) as pool:
        return list(pool.map(lambda token: _get_identity(stack, token), tokens))


def _assert_issuer_unavailable(response: requests.Response) -> None:
    assert response.status_code == 503, response
    assert response.headers["Content-Type"].startswith("application/problem+json")
    assert response.json()["code"] == "issuer_unavailable"
    assert int(response.headers["Retry-After"]) >= 1


def _wait_until_authenticated(stack: RunningStack, token: str, within: float = 90) -> None:
    """Until the worker has keys again: a known user without an identity gets 404, not 503."""
    deadline = time.monotonic() + within
    while True:
        response, _ = _get_identity(stack, token)
        if response.status_code == 404:
            return
        assert response.status_code == 503 and time.monotonic() < deadline, response
        time.sleep(min(int(response.headers.get("Retry-After", "1")), 5))


def _unknown_kid_token(users: Users, kid: str) -> str:
    return users.claims_token(users.base_claims("outage-forger"), headers={"kid": kid})


def test_a_cold_cache_shares_one_fetch_and_backs_off_while_the_issuer_fails(outage):
    """Nothing cached yet. With the IdP down, 20 lookups cost one discovery request (before: 20).
    With it hanging, five concurrent callers share one fetch and its deadline, then get 503
    (before: one after the other, 11, 22, 33, 44, 55 s); while the refresh backs off, the next
    caller gets 503 at once."""
    stack, issuer = outage
    assert issuer.discovery_calls() == 0, "needs the module's fresh stack: its worker's cache is cold"
    users = Users(stack)
    tokens = [users.token(f"cold-{i}") for i in range(5)]

    issuer.faults(down=True)
    for i in range(20):
        token = tokens[0] if i % 2 else _unknown_kid_token(users, f"cold-forged-{i}")
        response, elapsed = _get_identity(stack, token)
        _assert_issuer_unavailable(response)
        assert elapsed < FAST
    assert issuer.discovery_calls() <= REQUESTS_PER_FAILED_FETCH  # one refresh
    time.sleep(int(response.headers["Retry-After"]))  # the backoff is over: the next one fetches

    issuer.faults(down=False, latencyMs=HANG_MS)
    before = issuer.discovery_calls()
    answers = _concurrently(stack, tokens)
    for response, elapsed in answers:
        _assert_issuer_unavailable(response)
        assert elapsed < REFRESH_TIMEOUT_SECONDS + 3, [round(e, 1) for _, e in answers]
    response, elapsed = _get_identity(stack, tokens[0])
    _assert_issuer_unavailable(response)
    assert elapsed < FAST  # backing off: no new fetch, no wait
    assert issuer.discovery_calls() == before + 1  # one fetch for all six

    issuer.faults(latencyMs=0)
    _wait_until_authenticated(stack, tokens[0])


def test_known_keys_serve_from_the_stale_cache_while_the_issuer_hangs(outage):
    """Past the key set's TTL with the IdP hanging, cached kids answer at once; one refresh runs
    in the background, not one per request."""
    stack, issuer = outage
    users = Users(stack)
    tokens = [users.token(f"stale-{i}") for i in range(5)]
    issuer.reset()
    _wait_until_authenticated(stack, tokens[0])  # keys fetched moments ago, max-age 5 s
    issuer.faults(latencyMs=HANG_MS)
    time.sleep(MAX_AGE + 1)  # the key set is stale now
    before = issuer.discovery_calls()

    answers = _concurrently(stack, tokens)
    for response, elapsed in answers:
        assert response.status_code == 404, response  # authenticated: the user has no identity
        assert elapsed < FAST, [round(e, 1) for _, e in answers]
    for token in tokens * 2:
        response, elapsed = _get_identity(stack, token)
        assert response.status_code == 404 and elapsed < FAST, (response, elapsed)
    assert issuer.discovery_calls() == before + 1  # the one background refresh, still hanging

    # A kid the cache lacks needs the IdP: it waits at most for the refresh in flight, then 503.
    response, elapsed = _get_identity(stack, _unknown_kid_token(users, "rotated-in-during-outage"))
    _assert_issuer_unavailable(response)
    assert elapsed < REFRESH_TIMEOUT_SECONDS + 3

    issuer.faults(latencyMs=0, down=True)  # refused outright now: still served from the cache
    for token in tokens:
        response, elapsed = _get_identity(stack, token)
        assert response.status_code == 404 and elapsed < FAST, (response, elapsed)
    issuer.reset()


def test_unknown_kids_during_an_outage_refetch_at_most_once_a_minute(outage):
    """Keys cached, IdP down, a refresh just failed: 20 forged kids over 5 s (past the first
    backoffs) start no refresh at all (before the fix each started one) and get 503 at once; a
    cached kid keeps working."""
    stack, issuer = outage
    users = Users(stack)
    known = users.token("outage-known")
    issuer.reset()
    _wait_until_authenticated(stack, known)
    issuer.faults(down=True)
    time.sleep(MAX_AGE + 1)
    response, _ = _get_identity(stack, known)  # stale: served, and its refresh fails
    assert response.status_code == 404, response
    time.sleep(0.5)
    before = issuer.discovery_calls()
    for i in range(20):
        time.sleep(0.25)
        response, elapsed = _get_identity(stack, _unknown_kid_token(users, f"forged-{i}"))
        _assert_issuer_unavailable(response)  # it may be a key rotated in during the outage
        assert elapsed < FAST
    assert issuer.discovery_calls() == before  # the failed refresh was under a minute ago
    response, _ = _get_identity(stack, known)
    assert response.status_code == 404, response
    issuer.reset()


def test_the_host_log_has_no_traceback_from_the_outage(outage):
    """Every failure above was a problem answer: none reached the log as an unexpected error."""
    stack, _issuer = outage
    logged = (stack.state_dir / HOST_LOG_FILE).read_text()
    assert " ERROR " not in logged and "Traceback" not in logged, logged[-3000:]
