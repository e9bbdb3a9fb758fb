"""Adaptive throttling against ACS (issue 18, item 3; shared/throttle.py): refused here before ACS
is called into, with 429 and a Retry-After derived from ACS's; retries from a per-worker budget;
while ACS refuses, ACS's calls go to the tokens about to expire. The throttle's logic with a clock
and a chance of our own; the service against the emulator over HTTP, through the real SDK.

ACS's own guidance (learn.microsoft.com, "Service limits for Azure Communication Services"): over a
limit it answers 429, and "all requests accrue against your usage limits", so a client should
"avoid immediate retries". azure-core retries any answer carrying Retry-After, and POST 500/503/504, by itself
(azure/core/pipeline/policies/_retry.py, RetryPolicyBase.is_retry); the service turns that off
(`retry_status` 0) so that the gateway decides, and a refusing ACS is not retried into.
"""

from __future__ import annotations

import asyncio
import datetime as dt

import pytest

from shared.compose import services
from shared.errors import Throttled
from shared.throttle import (
    ADAPTIVE_RETRY_AFTER,
    ISSUE,
    MIN_REQUESTS,
    RETRY_CAP,
    RETRY_RATIO,
    WINDOW_SECONDS,
    RetryBudget,
    Throttle,
)
from tests.service_fixtures import configure
from tests.service_helpers import Users, body_of, post_as

# ---- the throttle's logic ----------------------------------------------------------------------------


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _throttle(chance: float = 0.0) -> tuple[Throttle, Clock]:
    clock = Clock()
    return Throttle(clock=clock, chance=lambda: chance), clock


def test_a_retry_after_closes_the_gate_until_then_and_one_call_reopens_it():
    throttle, clock = _throttle()
    assert throttle.admit(ISSUE) is False
    throttle.answered(ISSUE, False, refused=True, retry_after=5)
    with pytest.raises(Throttled) as refused:
        throttle.admit(ISSUE)
    assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "5"
    clock.now += 4.2
    with pytest.raises(Throttled) as refused:
        throttle.admit(ISSUE)
    assert refused.value.headers["Retry-After"] == "1"  # what is left of ACS's, rounded up
    throttle.admit("revokeAccessTokens")  # ACS limits each operation on its own
    clock.now += 1
    assert throttle.admit(ISSUE) is True  # the probe
    with pytest.raises(Throttled):
        throttle.admit(ISSUE)  # one call at a time until ACS has accepted one
    throttle.answered(ISSUE, True, refused=False)
    assert throttle.admit(ISSUE) is False and throttle.admit(ISSUE) is False


def test_only_the_probes_answer_reopens_the_gate():
    """A call sent before the gate closed and accepted after it does not let everyone through."""
    throttle, clock = _throttle()
    early = throttle.admit(ISSUE)
    throttle.answered(ISSUE, False, refused=True, retry_after=2)
    throttle.answered(ISSUE, early, refused=False)  # the early call's late answer
    clock.now += 2
    assert throttle.admit(ISSUE) is True
    with pytest.raises(Throttled):
        throttle.admit(ISSUE)


def test_429s_with_retry_after_are_the_gates_not_counted_against_the_next_window():
    """A reconnect wave refused with Retry-After, then ACS accepts again: nobody is refused here."""
    throttle, clock = _throttle(chance=0.0)
    for _ in range(3 * MIN_REQUESTS):  # in flight together when ACS said "in 1 s"
        throttle.answered(ISSUE, False, refused=True, retry_after=1)
    clock.now += 1
    throttle.answered(ISSUE, throttle.admit(ISSUE), refused=False)
    assert not throttle.refusing(ISSUE)
    throttle.admit(ISSUE)


def test_a_probe_that_gets_no_answer_lets_the_next_call_probe():
    throttle, clock = _throttle()
    throttle.answered(ISSUE, False, refused=True, retry_after=1)
    clock.now += 1
    probe = throttle.admit(ISSUE)
    throttle.abandoned(ISSUE, probe)  # ACS unreachable, or the request cancelled
    assert throttle.admit(ISSUE) is True


def test_a_refused_probe_closes_the_gate_again():
    throttle, clock = _throttle()
    throttle.answered(ISSUE, False, refused=True, retry_after=1)
    clock.now += 1
    throttle.answered(ISSUE, throttle.admit(ISSUE), refused=True, retry_after=3)
    with pytest.raises(Throttled) as refused:
        throttle.admit(ISSUE)
    assert refused.value.headers["Retry-After"] == "3"


def test_adaptive_rejection_follows_how_much_acs_refuses():
    """SRE book, "Handling Overload": p = max(0, (requests - K * accepts) / (requests + 1))."""
    throttle, _ = _throttle(chance=0.5)
    for _ in range(MIN_REQUESTS):
        throttle.answered(ISSUE, False, refused=True)  # 429s without Retry-After
    assert throttle.refusing(ISSUE)
    with pytest.raises(Throttled) as refused:  # p = 10/11 > 0.5
        throttle.admit(ISSUE)
    assert 1 <= int(refused.value.headers["Retry-After"]) <= ADAPTIVE_RETRY_AFTER
    for _ in range(MIN_REQUESTS + 1):  # the local refusal counts too: (2n - 2n) = 0 with n accepted
        throttle.answered(ISSUE, False, refused=False)
    assert not throttle.refusing(ISSUE)
    throttle.admit(ISSUE)


def test_random_refusals_of_30_percent_are_never_answered_here():
    throttle, _ = _throttle(chance=0.0)  # any p > 0 would refuse
    for i in range(1000):
        throttle.answered(ISSUE, throttle.admit(ISSUE), refused=i % 10 < 3)
    assert not throttle.refusing(ISSUE)


def test_a_few_refusals_are_too_few_to_refuse_anyone():
    throttle, _ = _throttle(chance=0.0)
    for _ in range(MIN_REQUESTS - 1):
        throttle.answered(ISSUE, False, refused=True)
    throttle.admit(ISSUE)


def test_refusals_older_than_the_window_are_forgotten():
    throttle, clock = _throttle(chance=0.0)
    for _ in range(50):
        throttle.answered(ISSUE, False, refused=True)
    with pytest.raises(Throttled):
        throttle.admit(ISSUE)
    clock.now += WINDOW_SECONDS + 1
    assert not throttle.refusing(ISSUE)
    throttle.admit(ISSUE)


def test_the_retry_budget_rations_retries_to_a_share_of_calls():
    clock = Clock()
    budget = RetryBudget(clock)
    spent = 0
    while budget.withdraw():
        spent += 1
    assert spent == RETRY_CAP  # it starts full
    for _ in range(10):
        budget.deposit()
    assert [budget.withdraw() for _ in range(10)].count(True) == round(10 * RETRY_RATIO)
    clock.now += 1  # it refills a little with time
    assert budget.withdraw()


def test_off_nothing_is_refused_here_and_retries_are_not_rationed():
    throttle = Throttle(enabled=False, chance=lambda: 0.0)
    for _ in range(100):
        throttle.answered(ISSUE, False, refused=True, retry_after=30)
    throttle.admit(ISSUE)
    assert not throttle.refusing(ISSUE)
    assert all(throttle.may_retry() for _ in range(1000))


# ---- the service against the emulator ------------------------------------------------------------------


def _calls(emulator, operation: str = "issueAccessToken") -> int:
    return emulator.stats()["calls"].get(operation, 0)


def _throttled(response) -> bool:
    return (
        response.status_code == 429
        and body_of(response)["code"] == "acs_throttled"
        and int(response.headers["Retry-After"]) >= 1
    )


async def _fast_backoff(monkeypatch) -> None:
    """The same six retries without the production waits (7.75 s) the test is not about."""
    import shared.acs
    from shared.compose import reset_services

    monkeypatch.setattr(shared.acs, "RETRY_BACKOFF_SECONDS", (0.01,) * 6)
    await reset_services()


def _later(throttle: Throttle, seconds: float) -> None:
    real = throttle.clock
    throttle.clock = lambda: real() + seconds


async def test_a_429_with_retry_after_is_answered_at_once_and_acs_is_not_asked_until_then(service, emulator):
    for user in ("ra-ann", "ra-ben"):
        assert (await post_as(service, "token", user)).status_code == 200
    emulator.faults(throttleRate=1.0, retryAfterSeconds=30)
    before = _calls(emulator)
    first = await post_as(service, "token/refresh", "ra-ann", {"expiresInMinutes": 61})
    assert _throttled(first) and 29 <= int(first.headers["Retry-After"]) <= 30
    assert _calls(emulator) == before + 1  # not retried: neither by azure-core nor by the gateway
    emulator.faults(throttleRate=0.0)  # ACS would answer now; it asked for 30 s
    second = await post_as(service, "token/refresh", "ra-ben", {"expiresInMinutes": 61})
    assert _throttled(second) and int(second.headers["Retry-After"]) <= 30
    assert _calls(emulator) == before + 1  # answered here
    _later(services().tokens.acs.throttle, 31)
    third = await post_as(service, "token/refresh", "ra-ben", {"expiresInMinutes": 61})
    assert third.status_code == 200 and _calls(emulator) == before + 2


async def test_past_the_issue_limit_acs_refuses_one_call_and_the_rest_are_answered_here(service, emulator):
    users = [f"limit-{i}" for i in range(12)]
    for user in users:
        assert (await post_as(service, "token", user)).status_code == 200
    emulator.faults(limits={"issueAccessToken": 5, "windowSeconds": 60})
    before, limited = _calls(emulator), emulator.stats()["limited"]["issueAccessToken"]
    answers = [await post_as(service, "token/refresh", u, {"expiresInMinutes": 62}) for u in users]
    assert [a.status_code for a in answers] == [200] * 5 + [429] * 7
    assert all(_throttled(a) for a in answers[5:])
    assert emulator.stats()["limited"]["issueAccessToken"] - limited == 1
    assert _calls(emulator) - before == 6


async def test_a_refusing_acs_without_retry_after_is_not_retried_into(service, emulator, monkeypatch):
    """ACS's 429s carry no Retry-After: after MIN_REQUESTS refusals the worker refuses itself."""
    await _fast_backoff(monkeypatch)
    assert (await post_as(service, "token", "adaptive-amy")).status_code == 200
    throttle = services().tokens.acs.throttle
    throttle.chance = lambda: 0.0  # refuse whenever p > 0: the count below is exact
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    before = _calls(emulator)
    answers = [
        await post_as(service, "token/refresh", "adaptive-amy", {"expiresInMinutes": 61 + i})
        for i in range(20)
    ]
    assert all(_throttled(a) for a in answers)
    # Every attempt reaches ACS until MIN_REQUESTS refusals are on file, then none: 20 requests.
    assert _calls(emulator) - before == MIN_REQUESTS
    emulator.faults(throttleRate=0.0)
    _later(throttle, WINDOW_SECONDS + 1)  # the refusals have left the window
    assert (
        await post_as(service, "token/refresh", "adaptive-amy", {"expiresInMinutes": 90})
    ).status_code == 200


async def test_with_the_retry_budget_spent_a_throttled_call_is_not_retried(service, emulator):
    assert (await post_as(service, "token", "budget-bo")).status_code == 200
    services().tokens.acs.throttle.budget.balance = 0.0
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    before = _calls(emulator)
    answer = await post_as(service, "token/refresh", "budget-bo", {"expiresInMinutes": 61})
    assert _throttled(answer) and _calls(emulator) == before + 1


async def test_while_acs_refuses_its_calls_go_to_tokens_about_to_expire(service, emulator, monkeypatch):
    """Kim holds a token this worker issued 20 minutes ago (two thirds of its life left): while ACS
    is refusing, kim's refresh is answered that token and costs no call. Lee's has less than half
    left: lee's refresh is the one ACS is asked for."""
    await _fast_backoff(monkeypatch)
    tokens = services().tokens
    throttle = tokens.acs.throttle
    throttle.chance = lambda: 1.0  # never refuse here: only the choice of who calls ACS is tested
    real = tokens.clock
    kim = await post_as(service, "token", "expiring-kim")
    assert (await post_as(service, "token", "expiring-mo")).status_code == 200
    tokens.clock = lambda: real() - dt.timedelta(minutes=30)  # lee's token was issued earlier
    lee = await post_as(service, "token", "expiring-lee")
    tokens.clock = lambda: real() + dt.timedelta(minutes=20)
    emulator.faults(throttleRate=1.0, retryAfterSeconds=None)
    for i in range(5):  # another user's refused calls (7 each, over MIN_REQUESTS): ACS is refusing
        assert _throttled(
            await post_as(service, "token/refresh", "expiring-mo", {"expiresInMinutes": 70 + i})
        )
    emulator.faults(throttleRate=0.0)
    assert throttle.refusing(ISSUE)
    before = _calls(emulator)
    again = await post_as(service, "token/refresh", "expiring-kim")
    assert again.status_code == 200 and body_of(again)["token"] == body_of(kim)["token"]
    assert body_of(again)["expiresOn"] == body_of(kim)["expiresOn"]  # its real expiry
    assert _calls(emulator) == before
    renewed = await post_as(service, "token/refresh", "expiring-lee")
    assert renewed.status_code == 200 and body_of(renewed)["token"] != body_of(lee)["token"]
    assert _calls(emulator) == before + 1


async def test_a_throttled_answer_falls_back_to_a_token_with_half_its_life_left(service, emulator):
    tokens = services().tokens
    real = tokens.clock
    first = body_of(await post_as(service, "token", "fallback-fay"))
    tokens.clock = lambda: real() + dt.timedelta(minutes=10)  # past reuse, within half its life
    emulator.faults(throttleRate=1.0, retryAfterSeconds=30)
    before = _calls(emulator)
    answer = await post_as(service, "token/refresh", "fallback-fay")
    assert answer.status_code == 200 and body_of(answer)["token"] == first["token"]
    assert _calls(emulator) == before + 1  # ACS was asked and refused


async def test_post_token_asks_acs_even_while_a_still_good_token_is_held(service, emulator):
    """POST /api/token never answers a held token (a mapping whose identity is gone must heal)."""
    tokens = services().tokens
    real = tokens.clock
    assert (await post_as(service, "token", "heal-hal")).status_code == 200
    tokens.clock = lambda: real() + dt.timedelta(minutes=10)
    emulator.faults(throttleRate=1.0, retryAfterSeconds=30)
    before = _calls(emulator)
    assert _throttled(await post_as(service, "token", "heal-hal"))
    assert _calls(emulator) == before + 1


async def test_a_revoke_refused_here_is_queued_without_calling_acs(service, emulator):
    for user in ("rv-ann", "rv-ben"):
        assert (await post_as(service, "token", user)).status_code == 200
    emulator.faults(throttleRate=1.0, retryAfterSeconds=30)
    before = _calls(emulator, "revokeAccessTokens")
    for user in ("rv-ann", "rv-ben"):
        response = await post_as(service, "token/revoke", user)
        assert response.status_code == 202 and body_of(response)["status"] == "pending"
    assert _calls(emulator, "revokeAccessTokens") == before + 1  # the second never reached ACS


async def test_protection_off_waits_out_a_retry_after_in_the_request(stack, emulator, monkeypatch):
    """The storm bench's baseline: ACS's Retry-After waited out and retried, as azure-core does."""
    await configure(monkeypatch, stack, managed_identity=False, STORM_PROTECTION="off")
    users = Users(stack)
    assert (await post_as(users, "token", "off-olga")).status_code == 200
    emulator.faults(throttleRate=1.0, retryAfterSeconds=1)
    before = _calls(emulator)

    async def lift_throttle():
        await asyncio.sleep(0.5)
        await asyncio.to_thread(emulator.faults, throttleRate=0.0)

    answer, _ = await asyncio.gather(post_as(users, "token/refresh", "off-olga"), lift_throttle())
    assert answer.status_code == 200 and _calls(emulator) - before == 2


# ---- ACS's answers the emulator cannot give ----------------------------------------------------------
# A fake ACS client, only for the gateway's own logic: which answers it retries and what it raises.


class _Answers:
    """get_token's answers, in order: an HTTP status with headers, or a token."""

    def __init__(self, *answers) -> None:
        self.answers = list(answers)
        self.calls = 0

    async def get_token(self, *args, **kwargs):
        from types import SimpleNamespace

        from azure.core.exceptions import HttpResponseError

        self.calls += 1
        answer = self.answers.pop(0)
        if isinstance(answer, tuple):
            status, headers = answer
            response = type("Response", (), {"status_code": status, "headers": headers, "reason": "x"})()
            raise HttpResponseError(message=f"status {status}", response=response)
        return SimpleNamespace(token=answer, expires_on="2030-01-01T00:00:00+00:00")


async def test_an_unreadable_retry_after_is_no_retry_after_and_never_a_500():
    from shared.acs import AcsGateway

    for value in ("inf", "nan", "1e400", "Wed, 21 Oct 2015 07:28:00 GMT", "-5"):
        client = _Answers((429, {"Retry-After": value}), "token")
        gateway = AcsGateway(client, backoff=(0.0,))  # type: ignore[arg-type]
        issued = await gateway.issue("8:acs:x", ("chat",), 60)  # retried as a 429 without one
        assert issued.token == "token" and client.calls == 2, value
        gateway.throttle.admit(ISSUE)  # and the gate is not left closed or half-open


async def test_a_5xx_with_retry_after_is_retried_in_the_request():
    from shared.acs import AcsGateway

    client = _Answers((503, {"Retry-After": "1"}), (500, {}), "token")
    gateway = AcsGateway(client, backoff=(0.0, 0.0))  # type: ignore[arg-type]
    assert (await gateway.issue("8:acs:x", ("chat",), 60)).token == "token" and client.calls == 3
