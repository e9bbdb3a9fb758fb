"""The per-user rate limit on token routes: off by default, 429 + Retry-After when on."""

from __future__ import annotations

import pytest

import function_app
from shared.compose import reset_services
from shared.errors import TooManyRequests
from shared.ratelimit import RateLimiter
from shared.settings import load, reset_settings
from tests.service_fixtures import configure
from tests.service_helpers import Users, body_of, request


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_allows_the_limit_then_refills_over_time():
    clock = Clock()
    limiter = RateLimiter(6, clock=clock)  # one token every 10 s
    for _ in range(6):
        limiter.check("u")
    with pytest.raises(TooManyRequests) as caught:
        limiter.check("u")
    assert caught.value.status == 429 and caught.value.headers["Retry-After"] == "10"
    limiter.check("other")  # per user
    clock.now += 10
    limiter.check("u")
    with pytest.raises(TooManyRequests):
        limiter.check("u")


def test_limit_is_off_unless_set():
    base = {
        "AUTH_ISSUER": "https://i.example",
        "AUTH_AUDIENCE": "a",
        "ACS_ENDPOINT": "https://a.example",
        "TABLES_ENDPOINT": "https://t.example",
    }
    assert load(base).rate_limit_per_minute is None
    assert load({**base, "RATE_LIMIT_PER_MINUTE": "0"}).rate_limit_per_minute is None
    assert load({**base, "RATE_LIMIT_PER_MINUTE": "30"}).rate_limit_per_minute == 30


async def test_token_routes_answer_429_with_retry_after_over_the_limit(stack, emulator, monkeypatch):
    await configure(monkeypatch, stack, managed_identity=False, RATE_LIMIT_PER_MINUTE="3")
    users = Users(stack)
    try:
        codes = []
        for route, handler in [("token", function_app.issue_token)] * 2 + [
            ("token/refresh", function_app.refresh_token)
        ] * 2:
            response = await handler(request("POST", route, token=users.token("limited")))
            codes.append(response.status_code)
        assert codes == [200, 200, 200, 429]
        assert body_of(response)["code"] == "rate_limited" and int(response.headers["Retry-After"]) >= 1
        other = await function_app.issue_token(request("POST", "token", token=users.token("not-limited")))
        assert other.status_code == 200
        identity = await function_app.get_identity(request("GET", "identity", token=users.token("limited")))
        assert identity.status_code == 200  # only token routes are limited
    finally:
        await reset_services()
        reset_settings()
