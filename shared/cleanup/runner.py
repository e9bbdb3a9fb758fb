"""The cleanup timer's run: finish queued work, then retention, within a budget and a deadline.

Safe to run twice at once and to stop midway (each part claims its work before ACS is called). It
stays well under ACS's limits (500 revokes and 500 deletes per 30 s): each run spends at most
RUN_BUDGET of each, so even two overlapping runs stay below them, and a run stops taking work
near its deadline. Alongside, it keeps the Microsoft Graph subscription alive: the lifecycle
notification that asks for a renewal may never come.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING

from ..acs import AcsGateway
from ..clock import Clock, utcnow
from ..errors import ServiceError
from ..store.stores import Stores
from .common import RUN_BUDGET, Budget
from .pending import PendingSteps
from .preview import RetentionPreview, preview

if TYPE_CHECKING:
    from ..graph import GraphSubscriptions

log = logging.getLogger("acs_token_service.cleanup")

# Event Grid redelivers for at most 24 hours; remembering ids for a week is ample.
EVENT_MEMORY = dt.timedelta(days=7)


class Cleanup(PendingSteps):
    def __init__(
        self,
        store: Stores,
        acs: AcsGateway,
        *,
        retention_days: int,
        clock: Clock = utcnow,
        graph: GraphSubscriptions | None = None,
    ) -> None:
        self.store = store
        self.acs = acs
        self.retention_days = retention_days
        self.clock = clock
        self.graph = graph

    async def run(self, *, ignore_backoff: bool = False, deadline_seconds: float = 50.0) -> dict[str, int]:
        counts: Counter[str] = Counter()
        budget = Budget(RUN_BUDGET)
        deadline = time.monotonic() + deadline_seconds
        started = time.monotonic()
        # Concurrent with the rest, so that its Graph and Table calls add nothing to the run's
        # slowest finish (host.json's functionTimeout is sized for that; tests/test_infra.py).
        graph = asyncio.create_task(self._graph(self.graph, counts)) if self.graph is not None else None
        try:
            await self._pending(counts, budget, deadline, ignore_backoff)
            await self._retention(counts, budget, deadline)
            forgotten = await self.store.marks.forget_before(self.clock() - EVENT_MEMORY)
            if forgotten:
                counts["event_ids_forgotten"] = forgotten
        finally:
            if graph is not None:
                await graph
        report = dict(sorted(counts.items()))
        log.info(
            "cleanup run done in %.1fs: %s",
            time.monotonic() - started,
            " ".join(f"{k}={v}" for k, v in report.items()) or "nothing to do",
        )
        return report

    async def _graph(self, graph: GraphSubscriptions, counts: Counter) -> None:
        """Renew (or create) the Graph subscription when due; a failure is recorded for health by
        `shared.graph` and retried by the next run, and never stops this one."""
        try:
            counts.update(await graph.maintain())
        except ServiceError as err:
            counts["graph_renewal_failed"] += 1
            log.warning("graph subscription step failed: %s", err.code)
        except Exception as err:  # noqa: BLE001 - Table Storage down: the next run tries again
            counts["graph_renewal_failed"] += 1
            log.warning("graph subscription step failed: %s", type(err).__name__)

    async def preview(self, limit: int = 100) -> RetentionPreview:
        return await preview(self, limit)
