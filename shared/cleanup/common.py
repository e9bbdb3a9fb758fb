"""What every part of a cleanup run shares: its budget of ACS calls, leases, backoff, and the
parts' common ground (the stores, ACS, the clock), so that each part can live in its own module."""

from __future__ import annotations

import datetime as dt
from typing import Literal

from ..acs import QUEUED_OPTIONS, AcsGateway
from ..clock import Clock
from ..store.stores import Stores

RUN_BUDGET = 240  # ACS calls of each kind per run
CONCURRENCY = 16
LEASE = dt.timedelta(minutes=2)
MAX_BACKOFF = dt.timedelta(hours=1)
# The run's ACS calls retry once, briefly, as a request's revocation does: the next run is the retry.
TIMER_OPTIONS = QUEUED_OPTIONS

Spend = Literal["revoke", "delete", "claim"]


def backoff(attempts: int) -> dt.timedelta:
    """30 s, 1 min, 2 min, ... up to an hour between attempts."""
    return min(dt.timedelta(seconds=30) * (2 ** min(attempts, 12)), MAX_BACKOFF)


class Budget:
    """ACS calls one run may still make, of each kind (ACS allows 500 revokes and deletes per 30 s)."""

    def __init__(self, limit: int) -> None:
        self.left: dict[Spend, int] = {"revoke": limit, "delete": limit, "claim": limit}

    def take(self, kind: Spend) -> bool:
        if self.left[kind] <= 0:
            return False
        self.left[kind] -= 1
        return True


class Parts:
    """What the run's parts (`PendingSteps`, `RetentionSteps`) work with; `Cleanup` sets it."""

    store: Stores
    acs: AcsGateway
    clock: Clock
    retention_days: int
