"""A per-user token bucket, per worker: the cheap first line against a caller hammering ACS.

Per worker, not global: a global limiter would cost a Table write per request, which is the very
load it protects against. With N instances a user gets at most N x the limit, which still caps
abuse at a known multiple; ACS's own per-resource limits are the hard backstop.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable

from .errors import TooManyRequests

MAX_TRACKED_USERS = 100_000
# Revocations and deletions reach ACS, whose limit is per resource (500 of each per 30 s), so one
# caller repeating them could push everyone else's into the pending queue. Always on: nobody needs
# to revoke their own tokens more than a few times a minute; an admin acting on many users gets more.
REVOCATIONS_PER_MINUTE = 3
MANAGE_PER_MINUTE = 60


class RateLimiter:
    def __init__(
        self, per_minute: int, clock: Callable[[], float] = time.monotonic, *, what: str = "token requests"
    ) -> None:
        self.what = what
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self.clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)

    def check(self, key: str) -> None:
        """Take one request from `key`'s bucket or raise TooManyRequests saying when to retry."""
        now = self.clock()
        tokens, at = self._buckets.pop(key, (self.capacity, now))
        tokens = min(self.capacity, tokens + (now - at) * self.rate)
        if tokens < 1.0:
            self._buckets[key] = (tokens, now)
            raise TooManyRequests(
                f"Too many {self.what}; slow down.", retry_after=math.ceil((1.0 - tokens) / self.rate)
            )
        self._buckets[key] = (tokens - 1.0, now)
        if len(self._buckets) > MAX_TRACKED_USERS:
            self._buckets.popitem(last=False)  # the least recently seen user starts afresh
