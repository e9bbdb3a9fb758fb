"""Adaptive throttling against ACS: once ACS refuses (429), refuse here first instead of into it.

ACS limits each resource per operation per 30 s (REFERENCE.md, "Service limits"). Past a limit
every call it gets is a 429, and retrying into it only keeps it there: Microsoft's "Service limits
for Azure Communication Services" says to "avoid immediate retries because all requests accrue
against your usage limits", refused ones included. Per worker and per ACS operation:
- a 429 carrying Retry-After closes the operation's gate until then: calls are answered here with
  our own 429 and the time left. When it has passed one call goes first (half-open), and the rest
  follow once ACS has accepted a call again;
- 429s without it (ACS's docs promise none on Identity) are met with client-side adaptive
  throttling (Google SRE book, "Handling Overload"): a call is refused here with probability
  max(0, (requests - K * accepts) / (requests + 1)) over the last WINDOW_SECONDS, so ACS is sent
  about K times what it accepts, and random refusals (30% of calls) never trigger it;
- retries come from a per-worker budget (`RetryBudget`): random faults are retried, a refusing ACS
  is not retried into.
Off (`enabled=False`, STORM_PROTECTION=off), nothing is refused here and retries are not rationed.
"""

from __future__ import annotations

import math
import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .errors import Throttled

# The operations ACS limits, as it names them (each has its own limit: REFERENCE.md).
CREATE_AND_ISSUE = "createIdentityAndIssueAccessToken"
ISSUE = "issueAccessToken"
REVOKE = "revokeAccessTokens"
DELETE = "deleteIdentity"
TEAMS_EXCHANGE = "exchangeTeamsToken"

WINDOW_SECONDS = 30  # ACS counts its limits per 30 s; so do we
K = 2.0  # the SRE book's multiplier: ACS is sent up to twice what it accepts
# Fewer answers than this in the window are too few to tell a refusing ACS from bad luck: a few
# throttled calls are retried, not answered by refusing everybody for the rest of the window.
MIN_REQUESTS = 30
# An adaptive refusal has no Retry-After of ACS's to pass on: it asks for up to this many seconds,
# more the more ACS refuses.
ADAPTIVE_RETRY_AFTER = 10

# Retries: each call deposits RETRY_RATIO, each retry withdraws one. The fault suite's 30% 429 +
# 10% 500 needs 0.67 retries per call on average (0.4 / 0.6), so 0.8 retries them all while a
# saturated ACS, which would need ten, gets less than one. The balance starts full and refills
# a little with time, so that a quiet worker's first faults are retried too.
RETRY_RATIO = 0.8
RETRY_CAP = 100.0
RETRY_REFILL_PER_SECOND = 2.0


class RetryBudget:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.balance = RETRY_CAP
        self._updated = clock()

    def _refill(self) -> None:
        now = self.clock()
        self.balance = min(RETRY_CAP, self.balance + (now - self._updated) * RETRY_REFILL_PER_SECOND)
        self._updated = now

    def deposit(self) -> None:
        self._refill()
        self.balance = min(RETRY_CAP, self.balance + RETRY_RATIO)

    def withdraw(self) -> bool:
        self._refill()
        if self.balance < 1 - 1e-9:  # ten deposits of 0.8 are eight retries, rounding aside
            return False
        self.balance -= 1
        return True


class _Answers:
    """ACS's answers over the last WINDOW_SECONDS, in one-second buckets, with running totals."""

    def __init__(self) -> None:
        self.buckets: deque[list[int]] = deque()  # [second, requests, accepts]
        self.requests = self.accepts = 0

    def add(self, now: float, *, accepted: bool) -> None:
        second = int(now)
        if not self.buckets or self.buckets[-1][0] != second:
            self.buckets.append([second, 0, 0])
        self.buckets[-1][1] += 1
        self.buckets[-1][2] += accepted
        self.requests += 1
        self.accepts += accepted

    def rejection(self, now: float) -> float:
        while self.buckets and self.buckets[0][0] <= now - WINDOW_SECONDS:
            _, requests, accepts = self.buckets.popleft()
            self.requests -= requests
            self.accepts -= accepts
        if self.requests < MIN_REQUESTS:
            return 0.0
        return max(0.0, (self.requests - K * self.accepts) / (self.requests + 1))


@dataclass
class _Gate:
    closed_until: float = 0.0
    half_open: bool = False  # reopened after a Retry-After: one call at a time until one is accepted
    probing: bool = False
    answers: _Answers = field(default_factory=_Answers)


class Throttle:
    """One per worker, shared by every call to ACS (`AcsGateway`)."""

    def __init__(
        self,
        *,
        enabled: bool = True,
        clock: Callable[[], float] = time.monotonic,
        chance: Callable[[], float] = random.random,
    ) -> None:
        self.enabled = enabled
        self.clock = clock
        self.chance = chance
        self.budget = RetryBudget(clock)
        self._gates: dict[str, _Gate] = {}

    def _gate(self, operation: str) -> _Gate:
        gate = self._gates.get(operation)
        if gate is None:
            gate = self._gates[operation] = _Gate()
        return gate

    def admit(self, operation: str) -> bool:
        """Before a call: raises Throttled when it must not go to ACS now. True: it is the probe
        that reopens the gate (the answer must be reported, with `answered` or `abandoned`)."""
        if not self.enabled:
            return False
        gate, now = self._gate(operation), self.clock()
        if now < gate.closed_until:
            raise _throttled(math.ceil(gate.closed_until - now))
        if gate.half_open:
            if gate.probing:
                raise _throttled(1)
            gate.probing = True
            return True
        refused = gate.answers.rejection(now)
        if refused > 0 and self.chance() < refused:
            gate.answers.add(now, accepted=False)  # a refusal here counts as a request (SRE book)
            raise _throttled(max(1, math.ceil(refused * ADAPTIVE_RETRY_AFTER)))
        return False

    def answered(self, operation: str, probe: bool, *, refused: bool, retry_after: int | None = None) -> None:
        """ACS answered a call: `refused` for a 429, with its Retry-After if it had one."""
        if not self.enabled:
            return
        gate, now = self._gate(operation), self.clock()
        if probe:
            gate.probing = False
            gate.half_open = refused  # only the probe's own answer reopens the gate
        if refused and retry_after:  # the gate's to answer: not counted against the next window
            gate.closed_until = max(gate.closed_until, now + retry_after)
            gate.half_open = True
            return
        gate.answers.add(now, accepted=not refused)

    def abandoned(self, operation: str, probe: bool) -> None:
        """A call that got no answer (unreachable, cancelled): it tells nothing about ACS's limits."""
        if probe:
            self._gate(operation).probing = False

    def refusing(self, operation: str) -> bool:
        """Is ACS refusing this operation now (gate closed or reopening, or calls being refused)?"""
        if not self.enabled:
            return False
        gate, now = self._gate(operation), self.clock()
        return now < gate.closed_until or gate.half_open or gate.answers.rejection(now) > 0

    def started(self) -> None:
        """A new call (not a retry): it earns the budget its share of a retry."""
        if self.enabled:
            self.budget.deposit()

    def may_retry(self) -> bool:
        return not self.enabled or self.budget.withdraw()


def _throttled(retry_after: int) -> Throttled:
    return Throttled(
        "ACS is refusing more calls of this kind for now; retry after the time given.",
        retry_after=retry_after,
    )
